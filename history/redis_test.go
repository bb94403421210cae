package history

import (
	"context"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

func TestRedisStore(t *testing.T) {
	c := redistest.Start(t).Client(t)
	testConformance(t, redisFixture(c))
}

func TestRedisClusterStore(t *testing.T) {
	c := redistest.StartCluster(t).Client(t)
	testConformance(t, redisFixture(c))
}

// redisFixture gives every test its own key prefix on a shared server, so
// that the global session index starts empty.
func redisFixture(c redis.UniversalClient) func(t *testing.T) fixture {
	return func(t *testing.T) fixture {
		prefix := "t:" + t.Name()
		s := NewRedis(c, prefix)
		return fixture{
			store: s,
			advance: func(t *testing.T, d time.Duration) {
				// Redis's own clock cannot be moved: delete now what would
				// expire within d, as Redis will.
				ctx := context.Background()
				for _, k := range scanKeys(t, c, prefix+":*") {
					ttl, err := c.PTTL(ctx, k).Result()
					mustNoErr(t, err)
					if ttl > 0 && ttl <= d {
						mustNoErr(t, c.Del(ctx, k).Err())
					}
				}
			},
			held: func(t *testing.T) (msgs, idem int) {
				ctx := context.Background()
				for _, k := range scanKeys(t, c, prefix+":*") {
					switch {
					case strings.HasSuffix(k, ":messages"):
						msgs += int(c.XLen(ctx, k).Val())
					case strings.HasSuffix(k, ":idem"):
						idem += int(c.ZCard(ctx, k).Val())
					}
				}
				return msgs, idem
			},
			checkRetention: func(t *testing.T, session, conv string, d time.Duration) {
				ctx := context.Background()
				ttl, err := c.PTTL(ctx, s.streamKey(session)).Result()
				mustNoErr(t, err)
				if ttl <= d-10*time.Second || ttl > d {
					t.Errorf("conversation stream: got PTTL %s, want about %s", ttl, d)
				}
				ttl, err = c.PTTL(ctx, s.sessionKey(session)).Result()
				mustNoErr(t, err)
				if ttl != -1 {
					t.Errorf("session hash: got PTTL %s, want none (-1)", ttl)
				}
				// Expire it now, as Redis will when the TTL runs out.
				mustNoErr(t, c.PExpire(ctx, s.streamKey(session), time.Millisecond).Err())
				for c.Exists(ctx, s.streamKey(session)).Val() == 1 {
					time.Sleep(time.Millisecond)
				}
			},
			keys: func(t *testing.T, session string) []string {
				return scanKeys(t, c, prefix+":{"+session+"}*")
			},
		}
	}
}

// scanKeys lists the keys matching pattern on every master.
func scanKeys(t *testing.T, c redis.UniversalClient, pattern string) []string {
	t.Helper()
	ctx := context.Background()
	var (
		mu   sync.Mutex
		keys []string
	)
	scan := func(ctx context.Context, n *redis.Client) error {
		it := n.Scan(ctx, 0, pattern, 100).Iterator()
		for it.Next(ctx) {
			mu.Lock()
			keys = append(keys, it.Val())
			mu.Unlock()
		}
		return it.Err()
	}
	switch c := c.(type) {
	case *redis.ClusterClient:
		mustNoErr(t, c.ForEachMaster(ctx, scan))
	case *redis.Client:
		mustNoErr(t, scan(ctx, c))
	default:
		t.Fatalf("scan keys: unexpected client %T", c)
	}
	sort.Strings(keys)
	return keys
}

// TestRedisLayout pins the key layout documented for redis-cli users.
func TestRedisLayout(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	u := Usage{PromptTokens: 10, CompletionTokens: 4, CachedTokens: 2, HistoryTokens: 6, Requests: 1, CostNanos: 37}
	_, err := s.Append(ctx, session, Turn{Messages: qa(0), NowMs: t0, IdempotencyKey: "req-1", Usage: u}, Policy{})
	mustNoErr(t, err)

	const base = "hp:{chat:john@example.com:support}:"
	keys := scanKeys(t, c, "*")
	want := []string{
		"hp:sessions", "hp:sessions:agent:support", "hp:sessions:channel:chat", "hp:sessions:user:john@example.com",
		base + "conversations", base + "idem", base + "messages", base + "session",
	}
	if !reflect.DeepEqual(keys, want) {
		t.Fatalf("got keys %q, want %q", keys, want)
	}

	ms := strconv.FormatInt(t0, 10)
	h, err := c.HGetAll(ctx, base+"session").Result()
	mustNoErr(t, err)
	// Random: only that there is one.
	if h["created_nonce"] == "" {
		t.Errorf("session hash: no created_nonce")
	}
	delete(h, "created_nonce")
	wantHash := map[string]string{
		"conversation": "c1", "created_ms": ms, "last_active_ms": ms, "is_active": "1",
		"messages": "2", "conversations": "1",
		"prompt_tokens": "10", "completion_tokens": "4", "cached_tokens": "2",
		"history_tokens": "6", "requests": "1", "cost_nanos": "37", "retained": "1",
	}
	if !reflect.DeepEqual(h, wantHash) {
		t.Errorf("session hash: got %v, want %v", h, wantHash)
	}

	entries, err := c.XRange(ctx, base+"messages", "-", "+").Result()
	mustNoErr(t, err)
	if len(entries) != 2 {
		t.Fatalf("got %d stream entries, want 2", len(entries))
	}
	// kind message (what role user implies) and status complete are the
	// defaults, left out: see encodeMessage.
	wantEntry := map[string]any{"conversation": "c1", "role": "user", "content": "q0", "tokens": "5", "created_ms": ms, "idem": "req-1"}
	if !reflect.DeepEqual(entries[0].Values, wantEntry) {
		t.Errorf("stream entry: got %v, want %v", entries[0].Values, wantEntry)
	}

	convs, err := c.HGetAll(ctx, base+"conversations").Result()
	mustNoErr(t, err)
	wantConvs := map[string]string{
		"c1:start": entries[0].ID, "c1:last": entries[1].ID, "c1:created_ms": ms, "c1:last_ms": ms,
		"c1:messages": "2", "c1:auto_title": "q0",
	}
	if !reflect.DeepEqual(convs, wantConvs) {
		t.Errorf("conversations hash: got %v, want %v", convs, wantConvs)
	}

	for _, z := range []struct{ key, member string }{
		{base + "idem", "req-1"}, {"hp:sessions", session}, {"hp:sessions:channel:chat", session},
		{"hp:sessions:user:john@example.com", session}, {"hp:sessions:agent:support", session},
	} {
		got, err := c.ZScore(ctx, z.key, z.member).Result()
		mustNoErr(t, err)
		if int64(got) != t0 {
			t.Errorf("%s %s: got score %v, want %d", z.key, z.member, got, t0)
		}
	}
}

// TestRedisLegacyCostMicros checks how a session hash written before costs
// were kept in nano-USD is read: its cost_micros counts as 1000 nano-USD
// each until the next append folds it into cost_nanos, exactly, even past
// what a Lua number holds.
func TestRedisLegacyCostMicros(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	key := s.sessionKey(session)
	for _, tc := range []struct {
		name, micros string
		wantNanos    int64
	}{
		{"zero", "0", 0},
		{"small", "37", 37_000},
		// 2^53 + 1 micro-USD: a Lua number would round it.
		{"beyond a double", "9007199254740993", 9_007_199_254_740_993_000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mustNoErr(t, c.Del(ctx, key).Err())
			mustNoErr(t, c.HSet(ctx, key, "requests", "3", "cost_micros", tc.micros).Err())
			got, _, err := s.Session(ctx, session)
			mustNoErr(t, err)
			if got.Totals.CostNanos != tc.wantNanos {
				t.Errorf("before an append: got %d nano-USD, want %d", got.Totals.CostNanos, tc.wantNanos)
			}
			_, err = s.Append(ctx, session, Turn{NowMs: t0, Usage: Usage{Requests: 1, CostNanos: 500}}, Policy{})
			mustNoErr(t, err)
			got, _, err = s.Session(ctx, session)
			mustNoErr(t, err)
			if want := tc.wantNanos + 500; got.Totals.CostNanos != want || got.Totals.Requests != 4 {
				t.Errorf("after an append: got %d nano-USD and %d requests, want %d and 4", got.Totals.CostNanos, got.Totals.Requests, want)
			}
			h, err := c.HGetAll(ctx, key).Result()
			mustNoErr(t, err)
			if _, ok := h["cost_micros"]; ok {
				t.Errorf("cost_micros still in the hash after an append: %v", h)
			}
			if want := strconv.FormatInt(tc.wantNanos+500, 10); h["cost_nanos"] != want {
				t.Errorf("cost_nanos: got %q, want %q", h["cost_nanos"], want)
			}
		})
	}
}

// TestRedisScriptCacheFlushed checks the EVAL fallback, including the
// pipelined one of Append, after the server lost its scripts (a restart or
// SCRIPT FLUSH).
func TestRedisScriptCacheFlushed(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	appendQA(t, s, session, 0, t0, Policy{})
	for i := 1; i <= 2; i++ {
		mustNoErr(t, c.ScriptFlush(ctx).Err())
		appendQA(t, s, session, i, t0+int64(i), Policy{})
		mustNoErr(t, c.ScriptFlush(ctx).Err())
		w, err := s.Window(ctx, session, 10, t0, Policy{})
		mustNoErr(t, err)
		if len(w.Messages) != 2*(i+1) {
			t.Errorf("round %d: got %d messages, want %d", i, len(w.Messages), 2*(i+1))
		}
	}
	mustNoErr(t, c.ScriptFlush(ctx).Err())
	_, err := s.Erase(ctx, session)
	mustNoErr(t, err)
	if _, ok, err := s.Session(ctx, session); err != nil || ok {
		t.Errorf("after erase: got known=%v, %v, want unknown", ok, err)
	}
}

// TestRedisStoreSurvivesRestart checks that a turn acknowledged by Append
// is there after a crash, with appendfsync always.
func TestRedisStoreSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	srv := redistest.Start(t, redistest.WithAOF())
	c := srv.Client(t)
	s := NewRedis(c, "")
	appendQA(t, s, session, 0, t0, Policy{})
	srv.Stop(t)
	srv.Restart(t)
	w, err := s.Window(ctx, session, 10, t0, Policy{})
	mustNoErr(t, err)
	if got, want := contents(w.Messages), []string{"q0", "a0"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}

// BenchmarkRedisWindow shows that reading a 20-message window costs the
// same whatever the conversation's length: compare 100 with 10,000 (the
// 10-message conversation returns only 10 messages).
func BenchmarkRedisWindow(b *testing.B) {
	ctx := context.Background()
	c := redistest.Start(b).Client(b)
	s := NewRedis(c, "bench")
	p := Policy{IdleTimeout: time.Hour}
	for _, size := range []int{10, 100, 10_000} {
		session := fmt.Sprintf("bench-%d", size)
		fillConversation(b, s, session, size, p)
		b.Run(fmt.Sprintf("messages=%d", size), func(b *testing.B) {
			want := min(20, size)
			b.ReportAllocs()
			for b.Loop() {
				w, err := s.Window(ctx, session, 20, t0+int64(size), p)
				if err != nil {
					b.Fatal(err)
				}
				if len(w.Messages) != want {
					b.Fatalf("got %d messages, want %d", len(w.Messages), want)
				}
			}
		})
	}
}

// fillConversation appends n messages in two-message turns, pipelining
// batches of turns so that 10,000 messages take well under a second.
func fillConversation(b *testing.B, s *RedisStore, session string, n int, p Policy) {
	b.Helper()
	ctx := context.Background()
	mustNoErr(b, appendScript.Load(ctx, s.client).Err())
	const batch = 500
	content := strings.Repeat("Some words of a typical chat message. ", 5)
	for i := 0; i < n/2; i += batch {
		pipe := s.client.Pipeline()
		for j := i; j < min(i+batch, n/2); j++ {
			t := prepareTurn(Turn{
				Messages: []Message{
					{Role: RoleUser, Content: content, Tokens: 40},
					{Role: RoleAssistant, Content: content, Tokens: 40},
				},
				NowMs: t0 + int64(j),
			}, time.Now())
			keys, args := s.appendCall(ctx, session, t, p)
			appendScript.EvalSha(ctx, pipe, keys, args...)
			s.queueIndex(ctx, pipe, session, t)
		}
		_, err := pipe.Exec(ctx)
		mustNoErr(b, err)
	}
	sess, _, err := s.Session(ctx, session)
	mustNoErr(b, err)
	if sess.MessageCount != int64(n) {
		b.Fatalf("filled %d messages, want %d", sess.MessageCount, n)
	}
}

// TestRedisTotalsStayExact checks that the append script adds usage to a
// session's totals exactly however large they grow: it sums in Lua's
// numbers (doubles) only while that is exact, and lets Redis add beyond.
func TestRedisTotalsStayExact(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	key := s.sessionKey(session)
	for _, tc := range []struct {
		name        string
		stored      string // prompt_tokens before the append
		delta, want int64
	}{
		{"small", "7", 5, 12},
		{"just below 2^52", "4503599627370495", 1, 4503599627370496},
		{"stored beyond 2^53", "9007199254740993", 2, 9007199254740995},
		{"delta beyond 2^53", "1", 9007199254740993, 9007199254740994},
		{"near 2^63", "9223372036854775000", 7, 9223372036854775007},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mustNoErr(t, c.Del(ctx, key).Err())
			mustNoErr(t, c.HSet(ctx, key, "prompt_tokens", tc.stored, "cost_nanos", tc.stored).Err())
			_, err := s.Append(ctx, session, Turn{NowMs: t0, Usage: Usage{PromptTokens: tc.delta, CostNanos: tc.delta, Requests: 1}}, Policy{})
			mustNoErr(t, err)
			h, err := c.HGetAll(ctx, key).Result()
			mustNoErr(t, err)
			want := strconv.FormatInt(tc.want, 10)
			if h["prompt_tokens"] != want || h["cost_nanos"] != want || h["requests"] != "1" {
				t.Errorf("got prompt_tokens %s, cost_nanos %s, requests %s; want %s, %s, 1", h["prompt_tokens"], h["cost_nanos"], h["requests"], want, want)
			}
		})
	}
}

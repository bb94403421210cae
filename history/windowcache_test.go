package history

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// takeNow reads the session's window as a request with ordering on does,
// passing the turn on at once.
func takeNow(t *testing.T, s *RedisStore, session string, n int, nowMs int64, p Policy) Window {
	t.Helper()
	w, l, err := s.TakeTurn(context.Background(), session, n, nowMs, p, TurnOptions{Wait: 5 * time.Second})
	mustNoErr(t, err)
	if l != nil {
		t.Fatalf("take without hold: got a lease")
	}
	return w
}

// sameWindow fails unless got (a cached store's) equals want (a store
// without cache), Waited aside.
func sameWindow(t *testing.T, step string, got, want Window) {
	t.Helper()
	got.Waited, want.Waited = 0, 0
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: cached window\n%s\nwant (uncached)\n%s", step, showWindow(got), showWindow(want))
	}
}

func showWindow(w Window) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  conversation %q, %d messages", w.ConversationID, len(w.Messages))
	if w.Summary != nil {
		fmt.Fprintf(&b, ", summary %s %q (covers to %s)", w.Summary.ID, w.Summary.Content, w.Summary.CoversTo)
	}
	for _, m := range w.Messages {
		fmt.Fprintf(&b, "\n  %s %s %s %q", m.ID, m.Conversation, m.Role, m.Content)
	}
	return b.String()
}

// TestWindowCacheMatchesFreshRead: two instances (RedisStores with their
// own window caches) serve one session in random interleaving with
// everything that changes a session, and after every step both windows
// equal those of a store without a cache, for windows of several sizes.
func TestWindowCacheMatchesFreshRead(t *testing.T) {
	ctx := context.Background()
	srv := redistest.Start(t)
	c := srv.Client(t)
	for _, seed := range []uint64{1, 2, 3, 4} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			prefix := fmt.Sprintf("diff%d", seed)
			a, b := NewRedis(c, prefix), NewRedis(c, prefix)
			fresh := NewRedis(c, prefix, WithWindowCacheBytes(0))
			for _, s := range []*RedisStore{a, b, fresh} {
				defer s.Close()
			}
			rng := rand.New(rand.NewPCG(seed, 0))
			now := t0
			idle := Policy{IdleTimeout: time.Hour}
			retained := Policy{IdleTimeout: time.Hour, Retention: 3 * time.Hour}
			sizes := []int{1, 3, 8, 21}
			var hits int
			msg := 0
			turn := func(s *RedisStore, hold bool, p Policy, conv string) {
				t.Helper()
				var l *Lease
				if hold {
					w, lease, err := s.TakeTurn(ctx, session, sizes[rng.IntN(len(sizes))], now, p, TurnOptions{Hold: true, Wait: 5 * time.Second})
					mustNoErr(t, err)
					l = lease
					if conv == "" {
						conv = w.ConversationID
					}
				}
				msg++
				_, err := s.Append(ctx, session, Turn{Messages: qa(msg), NowMs: now, Lease: l, ConversationID: conv}, p)
				mustNoErr(t, err)
			}
			for step := range 150 {
				now += int64(rng.IntN(60_000))
				inst := []*RedisStore{a, b}[rng.IntN(2)]
				var did string
				switch op := rng.IntN(20); {
				case op < 8:
					did = "turn"
					turn(inst, rng.IntN(4) > 0, idle, "")
				case op == 8:
					did = "turn to c1"
					turn(inst, false, idle, "c1")
				case op == 9:
					did = "reset"
					_, err := inst.Reset(ctx, session)
					mustNoErr(t, err)
				case op == 10:
					if rng.IntN(3) == 0 {
						did = "erase"
						_, err := inst.Erase(ctx, session)
						mustNoErr(t, err)
					}
				case op == 11:
					did = "idle, then a turn"
					now += 2 * time.Hour.Milliseconds()
					turn(inst, true, idle, "")
				case op == 12:
					did = "summary"
					tok, err := inst.TakeCompaction(ctx, session, time.Minute)
					if errors.Is(err, ErrCompacting) {
						break
					}
					mustNoErr(t, err)
					in, found, err := inst.Compaction(ctx, session, "", 0)
					mustNoErr(t, err)
					if found && len(in.Messages) > 1 {
						k := 1 + rng.IntN(len(in.Messages)-1)
						w := SummaryWrite{Conversation: in.Conversation, CoversFrom: in.Messages[0].ID, CoversTo: in.Messages[k-1].ID,
							Covers: int64(k), Message: Message{Content: fmt.Sprintf("summary at step %d", step), Tokens: 9}}
						if in.Summary != nil {
							w.Base, w.CoversFrom, w.Covers = in.Summary.ID, in.Summary.CoversFrom, in.Summary.Covers+int64(k)
						}
						_, err = inst.StoreSummary(ctx, session, tok, w)
						mustNoErr(t, err)
					}
					mustNoErr(t, inst.ReleaseCompaction(ctx, session, tok))
				case op == 13:
					did = "admin message"
					msg++
					_, err := inst.Append(ctx, session, Turn{NowMs: now, NewConversation: rng.IntN(3) == 0,
						Messages: []Message{{Role: RoleSystem, Content: fmt.Sprintf("admin %d", msg), Tokens: 3}}}, idle)
					mustNoErr(t, err)
				case op == 14:
					did = "retention"
					now += 4 * time.Hour.Milliseconds()
					turn(inst, true, retained, "")
				case op == 15:
					did = "stream expired"
					mustNoErr(t, c.Del(ctx, inst.streamKey(session)).Err())
				default:
					did = "read"
				}
				for _, n := range sizes {
					want := takeNow(t, fresh, session, n, now, idle)
					for name, s := range map[string]*RedisStore{"a": a, "b": b} {
						before := s.cache.get(session)
						sameWindow(t, fmt.Sprintf("step %d (%s), n %d, instance %s", step, did, n, name), takeNow(t, s, session, n, now, idle), want)
						if before != nil && before.covers(n) {
							hits++
						}
					}
				}
			}
			if hits < 500 {
				t.Errorf("the windows were read from a cached tail %d times, want most of 1,200", hits)
			}
		})
	}
}

// streamReads records the bounds of every XREVRANGE a client sends, and
// counts its round trips.
type streamReads struct {
	mu     sync.Mutex
	bounds [][2]string
	trips  int
}

func (h *streamReads) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *streamReads) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.record([]redis.Cmder{cmd})
		return next(ctx, cmd)
	}
}

func (h *streamReads) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.record(cmds)
		return next(ctx, cmds)
	}
}

func (h *streamReads) record(cmds []redis.Cmder) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.trips++
	for _, c := range cmds {
		if a := c.Args(); len(a) >= 4 && strings.EqualFold(fmt.Sprint(a[0]), "xrevrange") {
			h.bounds = append(h.bounds, [2]string{fmt.Sprint(a[2]), fmt.Sprint(a[3])})
		}
	}
}

func (h *streamReads) take() (trips int, bounds [][2]string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	trips, bounds = h.trips, h.bounds
	h.trips, h.bounds = 0, nil
	return trips, bounds
}

// TestWindowCacheReadsOnlyWhatIsNew: a session's next take reads only the
// entries after the newest its last take read, in the one round trip of
// the take, and the window is the whole window all the same.
func TestWindowCacheReadsOnlyWhatIsNew(t *testing.T) {
	srv := redistest.Start(t)
	c := srv.Client(t)
	h := &streamReads{}
	c.AddHook(h)
	s := NewRedis(c, "t")
	defer s.Close()
	for i := range 5 {
		appendQA(t, s, session, i, t0+int64(i), Policy{})
	}
	takeNow(t, s, "chat:other@example.com:support", 6, t0, Policy{}) // loads the take script
	h.take()
	if w := takeNow(t, s, session, 6, t0+10, Policy{}); !slices.Equal(contents(w.Messages), []string{"q2", "a2", "q3", "a3", "q4", "a4"}) {
		t.Fatalf("first window %v", contents(w.Messages))
	}
	if _, bounds := h.take(); !reflect.DeepEqual(bounds, [][2]string{{"+", "-"}}) {
		t.Fatalf("first take read %v, want the whole stream's newest (+ -)", bounds)
	}
	res := appendQA(t, s, session, 5, t0+11, Policy{})
	h.take()
	w := takeNow(t, s, session, 6, t0+12, Policy{})
	if got := contents(w.Messages); !slices.Equal(got, []string{"q3", "a3", "q4", "a4", "q5", "a5"}) {
		t.Fatalf("second window %v", got)
	}
	trips, bounds := h.take()
	want := [][2]string{{"+", "(" + idBefore(t, c, s.streamKey(session), res.IDs[0])}}
	if trips != 1 || !reflect.DeepEqual(bounds, want) {
		t.Fatalf("second take: %d round trips reading %v, want 1 reading %v (only after the first take's newest entry)", trips, bounds, want)
	}
}

// idBefore is the id of the stream entry just before id.
func idBefore(t *testing.T, c *redis.Client, stream, id string) string {
	t.Helper()
	es, err := c.XRevRangeN(context.Background(), stream, "("+id, "-", 1).Result()
	mustNoErr(t, err)
	if len(es) != 1 {
		t.Fatalf("no entry before %s", id)
	}
	return es[0].ID
}

// TestWindowCacheHandsOutCopies: a caller that changes the window it got
// does not change the next window of the session.
func TestWindowCacheHandsOutCopies(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t")
	defer s.Close()
	for i := range 3 {
		appendQA(t, s, session, i, t0+int64(i), Policy{})
	}
	w := takeNow(t, s, session, 10, t0+10, Policy{})
	want := slices.Clone(w.Messages)
	for i := range w.Messages {
		w.Messages[i].Content, w.Messages[i].Role, w.Messages[i].Tokens = "changed", RoleSystem, 0
	}
	w.Messages = append(w.Messages[:1], w.Messages[2:]...)
	if got := takeNow(t, s, session, 10, t0+11, Policy{}).Messages; !reflect.DeepEqual(got, want) {
		t.Fatalf("next window %v, want %v", contents(got), contents(want))
	}
}

// TestWindowCacheStreamRecreatedBelowItsTail: a session erased and written
// again with entries whose ids are below those a cached tail holds (a
// clock that stepped back; here another session's stream put in its
// place) is read afresh, whether its stream's length or its created_ms
// gives it away. Without either check the take mixes the old entries in.
func TestWindowCacheStreamRecreatedBelowItsTail(t *testing.T) {
	for _, tc := range []struct {
		name         string
		donorTurns   int   // the other session's turns: 3 gives the same length as the cached tail's
		donorCreated int64 // its first turn's time: t0 gives the same created_ms
	}{
		{"another length", 2, t0},
		{"another created_ms", 3, t0 + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			c := redistest.Start(t).Client(t)
			a, b := NewRedis(c, "t"), NewRedis(c, "t")
			fresh := NewRedis(c, "t", WithWindowCacheBytes(0))
			const donor = "chat:donor@example.com:support"
			for i := range tc.donorTurns {
				_, err := b.Append(ctx, donor, Turn{NowMs: tc.donorCreated + int64(i),
					Messages: []Message{{Role: RoleUser, Content: fmt.Sprintf("donor q%d", i)}, {Role: RoleAssistant, Content: fmt.Sprintf("donor a%d", i)}}}, Policy{})
				mustNoErr(t, err)
			}
			for i := range 3 {
				appendQA(t, a, session, i, t0+int64(i), Policy{})
			}
			takeNow(t, a, session, 20, t0+10, Policy{}) // a caches the tail
			_, err := b.Erase(ctx, session)
			mustNoErr(t, err)
			for _, k := range []string{"session", "conversations", "messages"} {
				dump, err := c.Dump(ctx, b.key(donor, k)).Result()
				mustNoErr(t, err)
				mustNoErr(t, c.Restore(ctx, b.key(session, k), 0, dump).Err())
			}
			appendQA(t, b, session, 9, t0+20, Policy{})
			sameWindow(t, "after the stream was recreated", takeNow(t, a, session, 20, t0+21, Policy{}), takeNow(t, fresh, session, 20, t0+21, Policy{}))
		})
	}
}

// TestWindowCacheBound: the cache keeps to its size, dropping the least
// recently used sessions, and a session whose tail alone is larger is
// not kept; windows stay whole.
func TestWindowCacheBound(t *testing.T) {
	c := redistest.Start(t).Client(t)
	const max = 16 << 10
	s := NewRedis(c, "t", WithWindowCacheBytes(max))
	defer s.Close()
	text := strings.Repeat("x", 400)
	for i := range 30 {
		id := fmt.Sprintf("chat:u%d@example.com:support", i)
		for j := range 5 {
			_, err := s.Append(context.Background(), id, Turn{NowMs: t0 + int64(j),
				Messages: []Message{{Role: RoleUser, Content: text}, {Role: RoleAssistant, Content: fmt.Sprint(j)}}}, Policy{})
			mustNoErr(t, err)
		}
		if w := takeNow(t, s, id, 10, t0+10, Policy{}); len(w.Messages) != 10 {
			t.Fatalf("window of %d messages, want 10", len(w.Messages))
		}
		if n, _ := s.cache.size(); n > max {
			t.Fatalf("after %d sessions the cache holds %d bytes, more than its %d", i+1, n, max)
		}
	}
	n, sessions := s.cache.size()
	if sessions == 0 || sessions >= 30 {
		t.Errorf("the cache holds %d sessions (%d bytes), want some but not all 30", sessions, n)
	}
	if s.cache.get("chat:u0@example.com:support") != nil || s.cache.get("chat:u29@example.com:support") == nil {
		t.Errorf("the cache kept the first session or dropped the last: want the least recently used dropped")
	}
	// A session whose tail alone passes the bound is read, not kept.
	big := "chat:big@example.com:support"
	_, err := s.Append(context.Background(), big, Turn{NowMs: t0, Messages: []Message{{Role: RoleUser, Content: strings.Repeat("y", max)}}}, Policy{})
	mustNoErr(t, err)
	if w := takeNow(t, s, big, 10, t0+10, Policy{}); len(w.Messages) != 1 {
		t.Fatalf("window of %d messages, want 1", len(w.Messages))
	}
	if s.cache.get(big) != nil {
		t.Errorf("a tail larger than the cache was kept")
	}
	if n, _ := s.cache.size(); n > max {
		t.Errorf("the cache holds %d bytes, more than its %d", n, max)
	}
}

// TestWindowCacheConcurrent: requests of one instance share its cache,
// turns with ordering on and reads with it off at once (go test -race),
// and the session's window ends as a store without a cache reads it.
func TestWindowCacheConcurrent(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t")
	fresh := NewRedis(c, "t", WithWindowCacheBytes(0))
	defer s.Close()
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 15 {
				sess := fmt.Sprintf("chat:u%d@example.com:support", i%2)
				if g%2 == 1 {
					if _, _, err := s.TakeTurn(ctx, sess, 5+g, t0, Policy{}, TurnOptions{Wait: 10 * time.Second}); err != nil {
						t.Error(err)
						return
					}
					continue
				}
				w, l, err := s.TakeTurn(ctx, sess, 8, t0, Policy{}, TurnOptions{Hold: true, Wait: 10 * time.Second})
				if err == nil {
					_, err = s.Append(ctx, sess, Turn{NowMs: t0, Lease: l, ConversationID: w.ConversationID, Messages: qa(100*g + i)}, Policy{})
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for i := range 2 {
		sess := fmt.Sprintf("chat:u%d@example.com:support", i)
		for _, n := range []int{5, 8, 20} {
			sameWindow(t, fmt.Sprintf("%s n %d", sess, n), takeNow(t, s, sess, n, t0, Policy{}), takeNow(t, fresh, sess, n, t0, Policy{}))
		}
	}
}

// TestWindowCacheEstimateIsTheHeap: what the cache counts for its tails is
// what they hold on the heap, as the runtime measures it after a
// collection, within a tenth and not under, for sessions of short and long messages,
// tool calls and usage: the bound an operator sets is the memory spent.
func TestWindowCacheEstimateIsTheHeap(t *testing.T) {
	c := redistest.Start(t).Client(t)
	for _, tc := range []struct {
		name  string
		texts []string
	}{
		{"short", []string{"hi", "What is the refund policy for annual plans?", "Thanks!"}},
		{"long", []string{strings.Repeat("long words here ", 40), strings.Repeat("z", 3000)}},
	} {
		t.Run(tc.name, func(t *testing.T) { testEstimateIsTheHeap(t, c, tc.name, tc.texts) })
	}
}

// minEstimateRatio is the least the cache's count may be of the heap
// measured. The count is meant to be at or over what its tails hold, but
// the measurement itself moves by about a percent between runs (garbage of
// other goroutines, the race detector's own allocations): one run under
// -race measured 0.998 for a shape that reads 1.000 to 1.004 otherwise.
const minEstimateRatio = 0.98

func testEstimateIsTheHeap(t *testing.T, c *redis.Client, prefix string, texts []string) {
	ctx := context.Background()
	const sessions, turns = 150, 11
	calls := json.RawMessage(`[{"id":"call_1","type":"function","function":{"name":"lookup","arguments":"{\"order\":\"A-1\"}"}}]`)
	i := 0 // the session being seeded: each starts its texts elsewhere
	seed := func(t *testing.T, s *RedisStore, id string) {
		defer func() { i++ }()
		for j := range turns {
			rid := fmt.Sprintf("req_%d_%d_8f3a9c2e7b1d4f60", i, j) // as the proxy records them: a request id, the user, the model
			msgs := []Message{{Role: RoleUser, Content: texts[(i+j)%len(texts)], Model: "gpt-4o-mini", RequestID: rid, User: "est@example.com"}}
			if j%3 == 1 {
				msgs = append(msgs, Message{Role: RoleAssistant, ContentNull: true, ToolCalls: calls, Model: "gpt-4o-mini", RequestID: rid, User: "est@example.com"},
					Message{Role: RoleTool, ToolCallID: "call_1", Content: `{"status":"shipped"}`, RequestID: rid, User: "est@example.com"})
			}
			msgs = append(msgs, Message{Role: RoleAssistant, Content: texts[(i+j+1)%len(texts)], Model: "gpt-4o-mini", RequestID: rid, User: "est@example.com"})
			_, err := s.Append(ctx, id, Turn{NowMs: t0 + int64(j), IdempotencyKey: fmt.Sprintf("k-%d-%d", i, j),
				Usage: Usage{PromptTokens: 10, CompletionTokens: 5, Requests: 1}, Messages: msgs}, Policy{})
			mustNoErr(t, err)
		}
	}
	est, held := measureTails(t, c, prefix, sessions, 21, seed)
	t.Logf("%d sessions: the heap grew by %d bytes, the cache counts %d (%.2f)", sessions, held, est, float64(est)/float64(held))
	if r := float64(est) / float64(held); r < minEstimateRatio || r > 1.1 {
		t.Errorf("the cache counts %d bytes for what holds %d on the heap (%.2f of it), want within a tenth over", est, held, r)
	}
}

// TestWindowCacheEraseAndWriteAgainWithinAMillisecond: a session erased
// and written again within the millisecond its stream was written (a
// script that seeds a session, reads it, erases it and seeds it again),
// each write at the real clock as the proxy makes it. The new stream's
// entries then have the ids of the erased ones, the same length, and the
// session the same created_ms: a cached tail of the erased stream passed
// every check, and the take injected the erased messages. Each attempt is
// a new session; the attempts go on until 20 of them wrote the second
// stream with the ids of the first (a machine too slow for that skips).
func TestWindowCacheEraseAndWriteAgainWithinAMillisecond(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	a := NewRedis(c, "ms")
	fresh := NewRedis(c, "ms", WithWindowCacheBytes(0))
	defer a.Close()
	write := func(sess, tag string) AppendResult {
		res, err := a.Append(ctx, sess, Turn{NowMs: time.Now().UnixMilli(),
			Messages: []Message{{Role: RoleUser, Content: tag + " q"}, {Role: RoleAssistant, Content: tag + " a"}}}, Policy{})
		mustNoErr(t, err)
		return res
	}
	same := 0
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; same < 20 && time.Now().Before(deadline); i++ {
		sess := fmt.Sprintf("chat:u%d@example.com:support", i)
		old := write(sess, "erased")
		takeNow(t, a, sess, 10, time.Now().UnixMilli(), Policy{})
		_, err := fresh.Erase(ctx, sess)
		mustNoErr(t, err)
		res := write(sess, "new")
		if slices.Equal(old.IDs, res.IDs) {
			same++
		}
		now := time.Now().UnixMilli()
		sameWindow(t, fmt.Sprintf("attempt %d (ids of the erased stream reused: %t)", i, slices.Equal(old.IDs, res.IDs)),
			takeNow(t, a, sess, 10, now, Policy{}), takeNow(t, fresh, sess, 10, now, Policy{}))
	}
	if same == 0 {
		t.Skip("no session was written again within the millisecond of its erased stream")
	}
	t.Logf("%d sessions written again with the erased stream's ids", same)
}

// TestWindowCacheKeptByATakeThatReadsNoWindow: a take of no messages (a
// request that carries its own history, or starts a new conversation,
// with ordering on) reads nothing of the stream, so it leaves the
// session's cached tail as it is: the next turn still reads only what is
// new. It dropped the tail, as if the session had changed, and the next
// take read its whole window.
func TestWindowCacheKeptByATakeThatReadsNoWindow(t *testing.T) {
	srv := redistest.Start(t)
	c := srv.Client(t)
	h := &streamReads{}
	c.AddHook(h)
	s := NewRedis(c, "t")
	defer s.Close()
	for i := range 3 {
		appendQA(t, s, session, i, t0+int64(i), Policy{})
	}
	takeNow(t, s, session, 6, t0+10, Policy{})
	takeNow(t, s, session, 0, t0+11, Policy{})
	res := appendQA(t, s, session, 3, t0+12, Policy{})
	want := [][2]string{{"+", "(" + idBefore(t, c, s.streamKey(session), res.IDs[0])}}
	h.take()
	if got := contents(takeNow(t, s, session, 6, t0+13, Policy{}).Messages); !slices.Equal(got, []string{"q1", "a1", "q2", "a2", "q3", "a3"}) {
		t.Fatalf("window %v", got)
	}
	if _, bounds := h.take(); !reflect.DeepEqual(bounds, want) {
		t.Fatalf("the take after one of no messages read %v, want %v (only after the tail's newest entry)", bounds, want)
	}
}

// TestWindowCacheOffBuildsNoTail: with the cache off, a take hands out the
// entries it read and builds no tail (nor counts its bytes) that nothing
// would keep.
func TestWindowCacheOffBuildsNoTail(t *testing.T) {
	s := &RedisStore{} // the cache off, as WithWindowCacheBytes(0) leaves it
	read := streamRead{length: 3}
	for i := range 3 {
		read.entries = append(read.entries, &streamEntry{conv: "c", msg: Message{ID: fmt.Sprintf("1-%d", 3-i), Role: RoleUser, Content: "hi"}})
	}
	var newest []*streamEntry
	allocs := testing.AllocsPerRun(100, func() {
		newest, _ = s.cacheTail(session, 2, nil, read, "1700000000000 0123456789abcdef", "1-3")
	})
	if allocs != 0 {
		t.Errorf("a take with the cache off allocated %v times in cacheTail, want 0 (no tail built)", allocs)
	}
	if len(newest) != 2 || newest[0] != read.entries[0] || newest[1] != read.entries[1] {
		t.Errorf("got %d entries, want the 2 newest read", len(newest))
	}
}

// TestTailExtendCountsAsNew: a tail extended by new entries counts the
// same bytes as one built from its entries afresh, whether the entries it
// adds push older ones out or not (extend counts only those it adds and
// drops).
func TestTailExtendCountsAsNew(t *testing.T) {
	id := 0
	entries := func(k int) []*streamEntry {
		es := make([]*streamEntry, k)
		for i := range es {
			id++
			es[k-1-i] = &streamEntry{conv: "c1", msg: Message{ID: fmt.Sprintf("%d-0", id), Conversation: "c1", Role: RoleUser,
				Content: strings.Repeat("w", id*37%900), Model: "gpt-4o-mini"}}
		}
		return es
	}
	tail := newTail(entries(5), 5, "1:x")
	length := int64(5)
	for step, c := range []struct{ added, n int }{{2, 8}, {2, 8}, {3, 8}, {1, 4}, {6, 8}, {0, 8}, {2, 3}} {
		added := entries(c.added)
		length += int64(c.added)
		next, ok := tail.extend(added, length, "1:x", c.n)
		if !ok {
			t.Fatalf("step %d: extend refused", step)
		}
		if want := newTail(next.entries, length, "1:x"); next.bytes != want.bytes {
			t.Fatalf("step %d: the extended tail counts %d bytes, built afresh %d", step, next.bytes, want.bytes)
		}
		tail = next
	}
}

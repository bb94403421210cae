package history

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestWindowCacheEstimateOfEveryShape holds entryBytes to the README's
// claim, "within a tenth of what the runtime measures", over and never
// under, for the shapes of entries TestWindowCacheEstimateIsTheHeap does
// not write: content parts, huge tool calls, summaries, entries of the
// older lean-less layout (kind and status written out), many tiny
// messages, and single large ones on either side of the allocator's
// boundaries.
func TestWindowCacheEstimateOfEveryShape(t *testing.T) {
	c := redistest.Start(t).Client(t)
	msg := func(role, content string) Message {
		return Message{Role: role, Content: content, Model: "gpt-4o-mini", RequestID: "req_8f3a9c2e7b1d4f60", User: "est@example.com"}
	}
	turns := func(k int, mk func(j int) []Message) func(t *testing.T, s *RedisStore, id string) {
		return func(t *testing.T, s *RedisStore, id string) {
			for j := range k {
				_, err := s.Append(context.Background(), id, Turn{NowMs: t0 + int64(j), Messages: mk(j)}, Policy{})
				mustNoErr(t, err)
			}
		}
	}
	parts := json.RawMessage(`[{"type":"text","text":"What is in this picture?"},{"type":"image_url","image_url":{"url":"https://example.com/images/receipt-2026-11-30.png","detail":"low"}}]`)
	hugeCalls := json.RawMessage(`[{"id":"call_1","type":"function","function":{"name":"store","arguments":"` + strings.Repeat("a", 100_000) + `"}}]`)
	for _, tc := range []struct {
		name     string
		sessions int
		n        int
		seed     func(t *testing.T, s *RedisStore, id string)
	}{
		{"content parts", 150, 21, turns(11, func(j int) []Message {
			u := msg(RoleUser, "")
			u.Parts = parts
			return []Message{u, msg(RoleAssistant, "A receipt for a coffee.")}
		})},
		{"huge tool calls", 20, 4, turns(2, func(j int) []Message {
			a := msg(RoleAssistant, "")
			a.ContentNull, a.ToolCalls = true, hugeCalls
			return []Message{msg(RoleUser, "store it"), a, {Role: RoleTool, ToolCallID: "call_1", Content: "ok"}}
		})},
		{"summaries", 150, 21, func(t *testing.T, s *RedisStore, id string) {
			ctx := context.Background()
			turns(6, func(j int) []Message { return qa(j) })(t, s, id)
			tok, err := s.TakeCompaction(ctx, id, time.Minute)
			mustNoErr(t, err)
			in, _, err := s.Compaction(ctx, id, "", 0)
			mustNoErr(t, err)
			_, err = s.StoreSummary(ctx, id, tok, SummaryWrite{Conversation: in.Conversation, CoversFrom: in.Messages[0].ID,
				CoversTo: in.Messages[5].ID, Covers: 6, Message: Message{Content: "The user asked three questions about refunds.", Tokens: 9}})
			mustNoErr(t, err)
			mustNoErr(t, s.ReleaseCompaction(ctx, id, tok))
			turns(4, func(j int) []Message { return qa(10 + j) })(t, s, id)
		}},
		{"older layout: kind and status written out", 150, 21, func(t *testing.T, s *RedisStore, id string) {
			ctx := context.Background()
			turns(1, func(j int) []Message { return qa(j) })(t, s, id)
			for j := range 20 {
				mustNoErr(t, s.client.XAdd(ctx, &redis.XAddArgs{Stream: s.streamKey(id), Values: []any{"conversation", "c1", "role", RoleUser,
					"content", fmt.Sprintf("old q%d", j), "kind", KindMessage, "tokens", "5", "status", StatusComplete}}).Err())
			}
		}},
		{"many tiny messages", 100, 200, turns(100, func(j int) []Message {
			return []Message{{Role: RoleUser, Content: "k"}, {Role: RoleAssistant, Content: "ok"}}
		})},
		{"one huge message", 10, 10, turns(1, func(j int) []Message { return []Message{msg(RoleUser, strings.Repeat("h", 1<<20))} })},
		{"one message just over 32 KiB", 60, 10, turns(1, func(j int) []Message { return []Message{msg(RoleUser, strings.Repeat("h", 32<<10+1))} })},
		{"messages of 4,097 bytes", 100, 10, turns(5, func(j int) []Message {
			return []Message{msg(RoleUser, strings.Repeat("q", 4097)), msg(RoleAssistant, strings.Repeat("a", 4097))}
		})},
		{"messages of 769 bytes", 100, 20, turns(10, func(j int) []Message {
			return []Message{msg(RoleUser, strings.Repeat("q", 769)), msg(RoleAssistant, strings.Repeat("a", 769))}
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			est, held := measureTails(t, c, strings.ReplaceAll(tc.name, " ", "_"), tc.sessions, tc.n, tc.seed)
			r := float64(est) / float64(held)
			t.Logf("%d sessions: the heap grew by %d bytes, the cache counts %d (%.3f)", tc.sessions, held, est, r)
			if r < minEstimateRatio || r > 1.1 {
				t.Errorf("the cache counts %d bytes for what holds %d on the heap (%.3f of it), want within a tenth over", est, held, r)
			}
		})
	}
}

// measureTails seeds sessions (and a few more to warm the client), then
// takes each with window n on a store of its own, and returns what its
// cache counts for them and what the heap grew by.
func measureTails(t *testing.T, c *redis.Client, prefix string, sessions, n int, seed func(t *testing.T, s *RedisStore, id string)) (est, held int64) {
	w := NewRedis(c, prefix, WithWindowCacheBytes(0))
	defer w.Close()
	id := func(i int) string { return fmt.Sprintf("chat:est%d@example.com:support", i) }
	for i := range sessions + 5 {
		seed(t, w, id(i))
	}
	s := NewRedis(c, prefix, WithWindowCacheBytes(1<<40))
	defer s.Close()
	for i := sessions; i < sessions+5; i++ {
		takeNow(t, s, id(i), n, t0+1000, Policy{})
	}
	for i := sessions; i < sessions+5; i++ {
		s.cache.drop(id(i))
	}
	heap := func() int64 {
		var ms runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return int64(ms.HeapAlloc)
	}
	counted0, _ := s.cache.size()
	before := heap()
	for i := range sessions {
		takeNow(t, s, id(i), n, t0+1000, Policy{})
	}
	after := heap()
	counted, k := s.cache.size()
	if k != sessions {
		t.Fatalf("the cache holds %d sessions, want %d", k, sessions)
	}
	runtime.KeepAlive(s)
	return counted - counted0, after - before
}

// TestWindowCacheBoundUnderConcurrency: puts of tails of every size
// (larger ones replacing smaller, some larger than the whole cache),
// drops and gets of a few sessions at once keep the count equal to what
// the cache holds, and within its bound, at every moment it is looked at.
func TestWindowCacheBoundUnderConcurrency(t *testing.T) {
	const max = 64 << 10
	c := newWindowCache(max)
	check := func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		var sum int64
		for el := c.lru.Front(); el != nil; el = el.Next() {
			sum += el.Value.(*cachedTail).size
		}
		if sum != c.bytes || c.bytes > max || len(c.items) != c.lru.Len() {
			t.Errorf("the cache counts %d bytes for %d (bound %d), %d sessions in its map, %d in its list", c.bytes, sum, max, len(c.items), c.lru.Len())
		}
	}
	var done = make(chan struct{})
	for g := range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := range 3000 {
				sess := fmt.Sprintf("chat:u%d@example.com:support", (g*7+i)%9)
				switch i % 5 {
				case 0, 1, 2:
					e := &streamEntry{msg: Message{ID: "1700000000000-0", Content: strings.Repeat("x", (i*131+g)%(max/2)+(i%17)*(max/8))}}
					c.put(sess, newTail([]*streamEntry{e}, 1, "1700000000000:n"))
				case 3:
					c.drop(sess)
				default:
					if tl := c.get(sess); tl != nil && len(tl.entries) != 1 {
						t.Errorf("a tail of %d entries", len(tl.entries))
					}
				}
				if i%100 == 0 {
					check()
				}
			}
		}()
	}
	for range 4 {
		<-done
	}
	check()
}

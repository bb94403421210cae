package history

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// BenchmarkSessionsFilter measures the first page (50) of the session list
// over 100,000 sessions: without a filter and by one part (the page's own
// index entries, a count), and with q (Match: the metadata of every
// candidate read to find and count the matches), which grows with the
// number of sessions. Compare the cases within one run:
//
//	go test -run '^$' -bench BenchmarkSessionsFilter -benchtime 5x ./history/
func BenchmarkSessionsFilter(b *testing.B) {
	const n = 100_000
	ctx := context.Background()
	rs := redistest.Start(b)
	stores := []struct {
		name string
		s    store
	}{{"memory", NewMemory()}, {"redis", NewRedis(rs.Client(b), "bench")}}
	for _, st := range stores {
		seedSessions(b, st.s, n)
		for _, tt := range []struct {
			name string
			q    SessionQuery
		}{
			{"none", SessionQuery{}},
			{"agent", SessionQuery{Agent: "a7"}},
			{"q", SessionQuery{Match: func(s Session) bool { return strings.Contains(strings.ToLower(s.Title), "needle") }}},
			{"agent+q", SessionQuery{Agent: "a0", Match: func(s Session) bool { return strings.Contains(strings.ToLower(s.Title), "needle") }}},
		} {
			b.Run(st.name+"/"+tt.name, func(b *testing.B) {
				q := tt.q
				q.Limit = 50
				for b.Loop() {
					page, err := st.s.Sessions(ctx, q)
					if err != nil {
						b.Fatal(err)
					}
					if page.Total == 0 {
						b.Fatal("no session matched")
					}
				}
			})
		}
	}
}

// seedSessions makes n sessions of 10 agents, one in 100 titled with
// "needle": on Redis by writing their hash, title and indexes in
// pipelines (a turn each would take minutes), in memory by a turn each.
func seedSessions(b *testing.B, s store, n int) {
	b.Helper()
	ctx := context.Background()
	title := func(i int) string {
		if i%100 == 0 {
			return "a needle in the haystack " + strconv.Itoa(i)
		}
		return "hay " + strconv.Itoa(i)
	}
	rs, ok := s.(*RedisStore)
	if !ok {
		for i := range n {
			id := fmt.Sprintf("web:u%d:a%d", i, i%10)
			if _, err := s.Append(ctx, id, Turn{Messages: []Message{{Role: RoleUser, Content: title(i)}}, NowMs: t0 + int64(i)}, Policy{}); err != nil {
				b.Fatal(err)
			}
		}
		return
	}
	for start := 0; start < n; start += 1000 {
		pipe := rs.client.Pipeline()
		for i := start; i < min(start+1000, n); i++ {
			id := fmt.Sprintf("web:u%d:a%d", i, i%10)
			pipe.HSet(ctx, rs.sessionKey(id), "conversation", "c1", "is_active", "1", "created_ms", t0+int64(i),
				"last_active_ms", t0+int64(i), "messages", 1, "conversations", 1, "retained", 1,
				"prompt_tokens", 0, "completion_tokens", 0, "cached_tokens", 0, "history_tokens", 0, "requests", 0, "cost_nanos", 0)
			pipe.HSet(ctx, rs.convsKey(id), "c1:auto_title", title(i), "c1:created_ms", t0+int64(i))
			for _, k := range rs.indexKeys(id) {
				pipe.ZAdd(ctx, k, redis.Z{Score: float64(t0 + int64(i)), Member: id})
			}
		}
		if _, err := pipe.Exec(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

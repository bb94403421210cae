package history

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// BenchmarkRedisAppendTurnSize is the write of one turn by its size. A
// turn is one Lua script, and Redis serves nothing else while it runs:
// redis-us/op, the commands' own time from SLOWLOG, is how long one turn
// holds every other session. The proxy's max_turn_messages (256) and
// max_body_bytes (20 MiB) bound it.
func BenchmarkRedisAppendTurnSize(b *testing.B) {
	ctx := context.Background()
	c := redistest.Start(b).Client(b)
	mustNoErr(b, c.ConfigSet(ctx, "slowlog-log-slower-than", "0").Err())
	for _, bc := range []struct{ messages, bytes int }{{1, 0}, {256, 0}, {4097, 0}, {1, 20 << 20}} {
		b.Run(fmt.Sprintf("messages=%d/bytes=%d", bc.messages, bc.bytes), func(b *testing.B) {
			s := NewRedis(c, "bench-turn")
			msgs := make([]Message, bc.messages)
			for i := range msgs {
				msgs[i] = Message{Role: RoleUser, Content: strings.Repeat("x", bc.bytes/bc.messages)}
			}
			mustNoErr(b, c.SlowLogReset(ctx).Err())
			var held time.Duration
			n := 0
			now := t0
			for b.Loop() {
				now++
				if _, err := s.Append(ctx, "bench:turn:size", Turn{Messages: msgs, NowMs: now}, Policy{}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				log, err := c.SlowLogGet(ctx, 16).Result()
				mustNoErr(b, err)
				for _, e := range log {
					held += e.Duration
				}
				n++
				// Keep memory flat and the log short.
				mustNoErr(b, c.FlushDB(ctx).Err())
				mustNoErr(b, c.SlowLogReset(ctx).Err())
				b.StartTimer()
			}
			b.ReportMetric(float64(held.Microseconds())/float64(n), "redis-us/op")
		})
	}
}

package history

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// BenchmarkRedisRequest is the store's part of one proxied chat request
// with turn ordering on, as the proxy makes it: take the session's turn and
// read its 20-message window (one round trip), then append the user
// message and the reply, giving the turn back (the other). The turn carries
// the idempotency key the proxy makes for a client that sends none, and so
// no write key. take is the read alone (the turn passed on at
// once). A session takes at most turnsPerSession turns, so the window and
// the session's keys stay the size of a typical request's.
//
// Beside Go's time and allocations it reports cpu-us/op, the CPU this
// process spent per op (its rusage: the client's side, garbage collection
// included), and redis-cpu-us/op, redis-server's (INFO cpu), which on the
// proxy's machine is CPU the proxy does not get. Both are user and system
// time.
func BenchmarkRedisRequest(b *testing.B) {
	ctx := context.Background()
	c := redistest.Start(b).Client(b)
	const turnsPerSession = 50
	user := strings.Repeat("And how do I rotate the API key for staging? ", 4)
	reply := strings.Repeat("Create a second key, switch the workflow to it, then revoke the old one. ", 6)
	history := make([]Message, 20)
	for i := range history {
		history[i] = Message{Role: RoleUser, Content: user, Tokens: 40, Model: "gpt-4o-mini", User: "ann@example.com", RequestID: "req_" + strconv.Itoa(i/2)}
		if i%2 == 1 {
			history[i].Role, history[i].Content, history[i].Tokens = RoleAssistant, reply, 90
		}
	}
	for _, hold := range []bool{false, true} {
		name := "take"
		if hold {
			name = "turn"
		}
		b.Run(name, func(b *testing.B) {
			s := NewRedis(c, fmt.Sprintf("bench-req-%d", time.Now().UnixNano()))
			defer s.Close()
			sessions := make([]string, b.N/turnsPerSession+1)
			for i := range sessions {
				sessions[i] = fmt.Sprintf("bench:ann%d@example.com:support", i)
				_, err := s.Append(ctx, sessions[i], Turn{Messages: history, IdempotencyKey: "seed", Usage: Usage{Requests: 1}}, Policy{})
				mustNoErr(b, err)
			}
			o := TurnOptions{Hold: hold, Wait: time.Minute}
			cpu0, rcpu0 := processCPU(b), redisCPU(b, c)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				session := sessions[i/turnsPerSession]
				now := time.Now().UnixMilli()
				w, lease, err := s.TakeTurn(ctx, session, 20, now, Policy{}, o)
				if err != nil {
					b.Fatal(err)
				}
				if len(w.Messages) != 20 {
					b.Fatalf("window of %d messages, want 20", len(w.Messages))
				}
				if !hold {
					continue
				}
				id := strconv.Itoa(i)
				_, err = s.Append(ctx, session, Turn{
					Messages: []Message{
						{Role: RoleUser, Content: user, Tokens: 40, Model: "gpt-4o-mini", User: "ann@example.com", RequestID: "req-" + id},
						{Role: RoleAssistant, Content: reply, Tokens: 90, Model: "gpt-4o-mini", User: "ann@example.com", RequestID: "req-" + id},
					},
					IdempotencyKey: "hp-" + id, NowMs: now, Lease: lease, ConversationID: w.ConversationID,
					Usage: Usage{PromptTokens: 1400, CompletionTokens: 118, CachedTokens: 1280, HistoryTokens: 1300, Requests: 1, CostNanos: 281000},
				}, Policy{})
				if err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
			b.ReportMetric(float64((redisCPU(b, c)-rcpu0).Microseconds())/float64(b.N), "redis-cpu-us/op")
		})
	}
}

// processCPU is the CPU time this process has used, user and system.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	mustNoErr(b, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// redisCPU is the CPU time redis-server has used, user and system.
func redisCPU(b *testing.B, c *redis.Client) time.Duration {
	info, err := c.Info(context.Background(), "cpu").Result()
	mustNoErr(b, err)
	var total time.Duration
	for _, line := range strings.Split(info, "\r\n") {
		k, v, _ := strings.Cut(line, ":")
		if k == "used_cpu_user" || k == "used_cpu_sys" {
			f, err := strconv.ParseFloat(v, 64)
			mustNoErr(b, err)
			total += time.Duration(f * float64(time.Second))
		}
	}
	return total
}

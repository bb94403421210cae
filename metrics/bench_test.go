package metrics

import (
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// BenchmarkObserveRequest is the metrics' share of every chat request: a
// billed session request, over 1,000 sessions, from parallel goroutines.
func BenchmarkObserveRequest(b *testing.B) {
	m := New(prometheus.NewRegistry(), 0)
	sessions := make([]string, 1000)
	for i := range sessions {
		sessions[i] = "chat:user-" + strconv.Itoa(i) + "@example.com:support"
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			m.ObserveRequest(Request{Channel: "chat", Agent: "support", Model: "gpt-4o-mini", Session: sessions[i%len(sessions)],
				Reached: true, Billed: true, Code: 200, Stream: true, Duration: time.Second, Upstream: 900 * time.Millisecond,
				TTFT: 300 * time.Millisecond, UpstreamTTFT: 200 * time.Millisecond, PromptTokens: 120, CompletionTokens: 30,
				HistoryMessages: 4, HistoryTokens: 90, CostNanos: 36_000, Priced: true})
			i++
		}
	})
}

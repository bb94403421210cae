package proxy

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/metrics"
)

// TestRetriedTurnsCountTheirUsageOnce: a turn that waits in the retry queue
// adds its usage to the session's totals in Redis exactly once, as
// Prometheus counts it. A client's repeat of a recorded key was billed again
// by the upstream and counts again (README, What counts), also when it went
// through the queue, whether the store was down before the request or
// failed only its write; a turn whose first write went through although its
// answer was lost (a paused redis-server) counts once. Redis and Prometheus
// agree in each case. (Before Turn.WriteKey, the queue found the repeat's
// key recorded and dropped its usage.)
func TestRetriedTurnsCountTheirUsageOnce(t *testing.T) {
	const sid = "chat:dave:support"
	tests := []struct {
		name string
		// key is the second request's idempotency key; the first one's is "k1".
		key string
		// before runs before the second request; during while the upstream
		// holds its stream, after its history was read; after once the
		// client has its answer.
		before, during, after func(t *testing.T, rs *redistest.Server)
	}{
		{
			name:   "repeat while the store is down",
			key:    "k1",
			before: func(t *testing.T, rs *redistest.Server) { rs.Stop(t) },
			after:  func(t *testing.T, rs *redistest.Server) { rs.Restart(t) },
		},
		{
			name:   "repeat whose write failed",
			key:    "k1",
			during: func(t *testing.T, rs *redistest.Server) { rs.Stop(t) },
			after:  func(t *testing.T, rs *redistest.Server) { rs.Restart(t) },
		},
		{
			name:   "new turn whose write went through unanswered",
			key:    "k2",
			during: func(t *testing.T, rs *redistest.Server) { rs.Pause(t) },
			after:  func(t *testing.T, rs *redistest.Server) { rs.Resume(t) },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rs := redistest.Start(t, redistest.WithAOF())
			up := fakeai.New(t)
			reg := prometheus.NewRegistry()
			px, srv := redisProxy(t, rs, up, func(o *Options) { o.Metrics = metrics.New(reg, 0) })
			post := func(key string) *http.Response {
				t.Helper()
				req, err := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(
					`{"model":"gpt-4o-mini","stream":true,"messages":[`+user("Only once.")+`]}`))
				require.NoError(t, err)
				req.Header.Set("X-Session-ID", sid)
				req.Header.Set("Idempotency-Key", key)
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				require.Equal(t, http.StatusOK, resp.StatusCode)
				return resp
			}

			up.Enqueue(fakeai.Reply{Content: "Once.", Usage: &fakeai.Usage{PromptTokens: 20, CompletionTokens: 5}})
			readAll(t, post("k1"))

			if tc.before != nil {
				tc.before(t, rs)
			}
			gate := make(chan struct{})
			up.Enqueue(fakeai.Reply{Content: "Again.", Usage: &fakeai.Usage{PromptTokens: 30, CompletionTokens: 7}, Gate: gate})
			resp := post(tc.key) // the headers: the history read is over
			if tc.during != nil {
				tc.during(t, rs)
			}
			close(gate)
			readAll(t, resp)
			require.True(t, px.retry.queued(sid), "the turn waits in the retry queue")
			tc.after(t, rs)

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			require.True(t, px.retry.drain(ctx, 20*time.Second), "the queued turn is written once the store is back")

			store := history.NewRedis(rs.Client(t), "")
			s, ok, err := store.Session(ctx, sid)
			require.NoError(t, err)
			require.True(t, ok)
			// Both requests were billed, each once: gpt-4o-mini at $0.15 and $0.60 per 1M.
			want := history.Usage{PromptTokens: 50, CompletionTokens: 12, Requests: 2, CostNanos: 50*150 + 12*600}
			got := s.Totals
			got.HistoryTokens = 0 // the second request's history, if any, is not the point here
			require.Equal(t, want, got, "Redis totals")
			for typ, v := range map[string]int64{"prompt": want.PromptTokens, "completion": want.CompletionTokens} {
				n, _ := gathered(t, reg, "historyproxy_session_tokens_total", map[string]string{"session": sid, "type": typ})
				require.Equal(t, float64(v), n, "Prometheus %s tokens", typ)
			}
			cost, _ := gathered(t, reg, "historyproxy_session_cost_usd_total", map[string]string{"session": sid})
			require.Equal(t, float64(want.CostNanos)/1e9, cost, "Prometheus cost")
		})
	}
}

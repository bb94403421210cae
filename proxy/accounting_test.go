package proxy

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/metrics"
	"github.com/historyproxy/historyproxy/tokens"
)

// metricsHarness is a harness whose proxy reports to real metrics on reg.
func metricsHarness(t *testing.T, mod ...func(*Options)) (*harness, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	m := metrics.New(reg, 0)
	return newHarness(t, append([]func(*Options){func(o *Options) { o.Metrics = m }}, mod...)...), reg
}

// gathered returns the value of the series of family whose labels include
// want: a counter's value, or a histogram's sample sum and count.
func gathered(t *testing.T, reg prometheus.Gatherer, family string, want map[string]string) (value float64, count uint64) {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != family {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue series
				}
			}
			if h := m.GetHistogram(); h != nil {
				return h.GetSampleSum(), h.GetSampleCount()
			}
			return m.GetCounter().GetValue(), 1
		}
	}
	return 0, 0
}

// slowWindow is a store whose history read takes d on the proxy's clock.
type slowWindow struct {
	Store
	clock *e2eClock
	d     time.Duration
}

func (s slowWindow) Window(ctx context.Context, session string, n int, nowMs int64, p history.Policy) (history.Window, error) {
	s.clock.Advance(s.d)
	return s.Store.Window(ctx, session, n, nowMs, p)
}

// TestTimeToFirstTokenFromArrival: a slow history read shows in the time to
// first token, measured from the request's arrival; the upstream's share is
// reported apart.
func TestTimeToFirstTokenFromArrival(t *testing.T) {
	clock := &e2eClock{now: time.Unix(1_700_000_000, 0)}
	h, reg := metricsHarness(t, func(o *Options) {
		o.Now = clock.Now
		o.Store = slowWindow{Store: o.Store, clock: clock, d: 2 * time.Second}
	})
	h.up.SetDefault(func(req fakeai.ChatRequest) fakeai.Reply {
		clock.Advance(500 * time.Millisecond) // the upstream thinks
		return fakeai.EchoReply(req)
	})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o-mini","stream":true,"messages":[`+user("hi")+`]}`,
		map[string]string{"X-Session-ID": "chat:ttft:support"})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	readAll(t, resp)

	labels := map[string]string{"channel": "chat", "agent": "support"}
	sum, n := gathered(t, reg, "historyproxy_time_to_first_token_seconds", labels)
	require.EqualValues(t, 1, n)
	require.InDelta(t, 2.5, sum, 1e-9, "from the request's arrival: the history read and the upstream")
	sum, n = gathered(t, reg, "historyproxy_upstream_time_to_first_token_seconds", labels)
	require.EqualValues(t, 1, n)
	require.InDelta(t, 0.5, sum, 1e-9, "from forwarding: the upstream alone")
}

// noUsageJSON and noUsageSSE are replies of an upstream that reports no
// usage (some OpenAI-compatible servers), so the proxy estimates it.
const (
	noUsageContent = "Hello there, world."
	noUsageJSON    = `{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, world."},"finish_reason":"stop"}]}`
	noUsageSSE     = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello there,\"},\"finish_reason\":null}]}\n\n" +
		"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world.\"},\"finish_reason\":null}]}\n\n" +
		"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n" +
		"data: [DONE]\n\n"
)

// TestEstimatedCompletionCountsOnlyContent: without the upstream's usage, a
// reply counts as the API would count it, its content, not as a whole
// message with framing and role.
func TestEstimatedCompletionCountsOnlyContent(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stream bool
		reply  fakeai.Reply
	}{
		{"json", false, fakeai.Reply{Raw: []byte(noUsageJSON)}},
		{"stream", true, fakeai.Reply{Raw: []byte(noUsageSSE), Header: http.Header{"Content-Type": {"text/event-stream"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, reg := metricsHarness(t)
			h.up.Enqueue(tc.reply)
			const session = "chat:estimate:support"
			body := `{"model":"gpt-4o-mini","stream":` + map[bool]string{true: "true", false: "false"}[tc.stream] + `,"messages":[` + user("Say hello") + `]}`
			resp := h.do(t, "/v1/chat/completions", body, map[string]string{"X-Session-ID": session})
			require.Equal(t, http.StatusOK, resp.StatusCode)
			readAll(t, resp)

			want := int64(sharedCounter.Text("gpt-4o-mini", noUsageContent))
			got, _ := gathered(t, reg, "historyproxy_tokens_total", map[string]string{"model": "gpt-4o-mini", "type": "completion"})
			require.EqualValues(t, want, got, "completion tokens in the metrics")
			n, _ := gathered(t, reg, "historyproxy_estimated_usage_requests_total", map[string]string{"model": "gpt-4o-mini"})
			require.EqualValues(t, 1, n)
			s, ok, err := h.store.Session(context.Background(), session)
			require.NoError(t, err)
			require.True(t, ok)
			require.Equal(t, want, s.Totals.CompletionTokens, "completion tokens in the session's totals")

			// The stored reply still counts its framing, as it costs when it
			// is injected again.
			stored := h.stored(t, session)
			require.Len(t, stored, 2)
			require.Equal(t, sharedCounter.Message("gpt-4o-mini", tokens.Message{Role: "assistant", Content: noUsageContent}), stored[1].Tokens)
		})
	}
}

// syncBuffer is a log destination safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestPricesFallBackOnlyAcrossDates: a model the table does not name is
// not billed at a similar model's price; it costs 0, is counted as
// unpriced and logged once. A dated snapshot takes its model's price.
func TestPricesFallBackOnlyAcrossDates(t *testing.T) {
	var logs syncBuffer
	h, reg := metricsHarness(t, func(o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	usage := &fakeai.Usage{PromptTokens: 1000, CompletionTokens: 100}
	post := func(model string) {
		t.Helper()
		h.up.Enqueue(fakeai.Reply{Content: "ok", Usage: usage})
		resp := h.do(t, "/v1/chat/completions", `{"model":"`+model+`","messages":[`+user("hi")+`]}`,
			map[string]string{"X-Session-ID": "chat:" + strings.ReplaceAll(model, ".", "_") + ":support"})
		require.Equal(t, http.StatusOK, resp.StatusCode)
		readAll(t, resp)
	}
	session := func(model string) history.Session {
		s, ok, err := h.store.Session(context.Background(), "chat:"+strings.ReplaceAll(model, ".", "_")+":support")
		require.NoError(t, err)
		require.True(t, ok)
		return s
	}

	for range 3 {
		post("gpt-5.2-ultra")
	}
	require.Zero(t, session("gpt-5.2-ultra").Totals.CostNanos, "not billed as gpt-5.2")
	n, _ := gathered(t, reg, "historyproxy_unpriced_requests_total", map[string]string{"model": "gpt-5.2-ultra"})
	require.EqualValues(t, 3, n)
	cost, _ := gathered(t, reg, "historyproxy_cost_usd_total", map[string]string{"model": "gpt-5.2-ultra"})
	require.Zero(t, cost)
	require.Equal(t, 1, strings.Count(logs.String(), "model has no price"), logs.String())
	require.Contains(t, logs.String(), "model=gpt-5.2-ultra")

	// Named in the table: its own price, 12 times gpt-5.2's.
	post("gpt-5.2-pro")
	require.Equal(t, int64(1000*21_000+100*168_000), session("gpt-5.2-pro").Totals.CostNanos)
	// A dated snapshot: its model's price ($1.75 and $14 per 1M).
	post("gpt-5.2-2025-12-11")
	require.Equal(t, int64(1000*1_750+100*14_000), session("gpt-5.2-2025-12-11").Totals.CostNanos)
	require.Equal(t, 1, strings.Count(logs.String(), "model has no price"), "priced models are not logged")
}

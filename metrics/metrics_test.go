package metrics

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// sessionSeries returns the label sets of every per-session series in reg,
// as `family{session="...",type="..."} value` strings, sorted.
func sessionSeries(t *testing.T, reg prometheus.Gatherer) []string {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	var out []string
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "historyproxy_session_") || mf.GetName() == "historyproxy_session_series_evictions_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, lp := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", lp.GetName(), lp.GetValue()))
			}
			out = append(out, fmt.Sprintf("%s{%s} %g", mf.GetName(), strings.Join(labels, ","), m.GetCounter().GetValue()))
		}
	}
	sort.Strings(out)
	return out
}

// sessionsWithSeries returns the distinct session label values in reg, sorted.
func sessionsWithSeries(t *testing.T, reg prometheus.Gatherer) []string {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	seen := map[string]bool{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "session" {
					seen[lp.GetValue()] = true
				}
			}
		}
	}
	var out []string
	for s := range seen {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

func TestObserveRequestSessionSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	const session = "chat:john@example.com:support"
	m.ObserveRequest(Request{
		Channel: "chat", Agent: "support", Model: "gpt-4o", Session: session, Code: 200, Reached: true, Billed: true,
		Duration: time.Second, Upstream: 900 * time.Millisecond,
		PromptTokens: 120, CompletionTokens: 30, CachedTokens: 64, ReasoningTokens: 8,
		HistoryMessages: 4, HistoryTokens: 90,
		CostNanos: 1_250_000, Priced: true,
	})

	got := sessionSeries(t, reg)
	want := []string{
		`historyproxy_session_cost_usd_total{session="chat:john@example.com:support"} 0.00125`,
		`historyproxy_session_tokens_total{session="chat:john@example.com:support",type="cached"} 64`,
		`historyproxy_session_tokens_total{session="chat:john@example.com:support",type="completion"} 30`,
		`historyproxy_session_tokens_total{session="chat:john@example.com:support",type="history"} 90`,
		`historyproxy_session_tokens_total{session="chat:john@example.com:support",type="prompt"} 120`,
		`historyproxy_session_tokens_total{session="chat:john@example.com:support",type="reasoning"} 8`,
	}
	require.Equal(t, want, got)
	if got := testutil.ToFloat64(m.sessionsActive); got != 1 {
		t.Errorf("sessions tracked: got %v, want 1", got)
	}
}

func TestStatelessRequestHasNoSessionSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	m.ObserveRequest(Request{Channel: "api", Agent: "default", Model: "gpt-4o", Code: 200, Reached: true, Billed: true,
		PromptTokens: 10, CompletionTokens: 5, CostNanos: 10_000, Priced: true})

	if got := sessionSeries(t, reg); len(got) != 0 {
		t.Errorf("per-session series: got %v, want none", got)
	}
	if got := testutil.CollectAndCount(m.histMsgs); got != 0 {
		t.Errorf("history histogram series: got %d, want 0 (stateless requests inject no history)", got)
	}
	if got := testutil.ToFloat64(m.tokens.WithLabelValues("api", "default", "gpt-4o", "prompt", PurposeChat)); got != 10 {
		t.Errorf("prompt tokens: got %v, want 10", got)
	}
}

func TestSessionLimitEvictsLeastRecentlyActive(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 2)
	touch := func(s string) {
		m.ObserveRequest(Request{Channel: "chat", Agent: "support", Model: "m", Session: s, Code: 200, Reached: true, Billed: true,
			PromptTokens: 1, CompletionTokens: 1, HistoryTokens: 1, CostNanos: 1000, Priced: true})
	}
	touch("a")
	touch("b")
	touch("a") // a is now more recent than b
	if got := testutil.ToFloat64(m.evictions); got != 0 {
		t.Fatalf("evictions before the limit is exceeded: got %v, want 0", got)
	}
	touch("c") // exceeds the limit: b goes

	if got, want := sessionsWithSeries(t, reg), []string{"a", "c"}; !slices.Equal(got, want) {
		t.Errorf("sessions with series: got %v, want %v", got, want)
	}
	if got := testutil.ToFloat64(m.evictions); got != 1 {
		t.Errorf("evictions: got %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.sessionsActive); got != 2 {
		t.Errorf("sessions tracked: got %v, want 2", got)
	}
	// a kept its history: two requests' worth.
	if got := testutil.ToFloat64(m.sessionTokens.WithLabelValues("a", "prompt")); got != 2 {
		t.Errorf("a's prompt tokens: got %v, want 2", got)
	}
	// b coming back starts afresh, and evicts a (now the least recent).
	touch("b")
	if got, want := sessionsWithSeries(t, reg), []string{"b", "c"}; !slices.Equal(got, want) {
		t.Errorf("sessions with series after b returns: got %v, want %v", got, want)
	}
	if got := testutil.ToFloat64(m.sessionTokens.WithLabelValues("b", "prompt")); got != 1 {
		t.Errorf("b's prompt tokens after eviction: got %v, want 1", got)
	}
}

func TestSessionLimitUnderConcurrency(t *testing.T) {
	reg := prometheus.NewRegistry()
	const limit = 5
	m := New(reg, limit)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				m.ObserveRequest(Request{Session: fmt.Sprintf("s%d", (g*7+i)%23), Code: 200, Reached: true, Billed: true,
					PromptTokens: 1, CostNanos: 1000, Priced: true})
			}
		})
	}
	wg.Wait()
	// Any series left behind by a race between eviction and Add would show
	// up here as more sessions than the limit.
	if got := sessionsWithSeries(t, reg); len(got) != limit {
		t.Errorf("sessions with series: got %d (%v), want %d", len(got), got, limit)
	}
	if got := testutil.ToFloat64(m.sessionsActive); got != limit {
		t.Errorf("sessions tracked: got %v, want %d", got, limit)
	}
}

func TestRequestCounters(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	reqs := []Request{
		{Channel: "chat", Agent: "support", Model: "gpt-4o", Code: 200, Reached: true, Billed: true, PromptTokens: 100, CompletionTokens: 20,
			CachedTokens: 50, ReasoningTokens: 0, HistoryTokens: 70, CostNanos: 123_457_000, Priced: true},
		{Channel: "chat", Agent: "support", Model: "gpt-4o", Code: 200, Reached: true, Billed: true, PromptTokens: 10, CompletionTokens: 2,
			ReasoningTokens: 3, Estimated: true, CostNanos: 987_651_000, Priced: true},
		{Channel: "chat", Agent: "support", Model: "gpt-4o", Code: 502, Reached: true},
		{Channel: "chat", Agent: "support", Model: "mystery-1", Code: 200, Reached: true, Billed: true, PromptTokens: 5, CompletionTokens: 5},
		{Channel: "chat", Agent: "support", Model: "mystery-1", Code: 503, Reached: true}, // no tokens: not unbilled
	}
	for _, r := range reqs {
		m.ObserveRequest(r)
	}

	counters := []struct {
		name string
		c    prometheus.Collector
		want float64
	}{
		{"requests 200 gpt-4o", m.requests.WithLabelValues("chat", "support", "gpt-4o", "200"), 2},
		{"requests 502 gpt-4o", m.requests.WithLabelValues("chat", "support", "gpt-4o", "502"), 1},
		{"requests 200 mystery-1", m.requests.WithLabelValues("chat", "support", "mystery-1", "200"), 1},
		{"prompt tokens", m.tokens.WithLabelValues("chat", "support", "gpt-4o", "prompt", PurposeChat), 110},
		{"completion tokens", m.tokens.WithLabelValues("chat", "support", "gpt-4o", "completion", PurposeChat), 22},
		{"cached tokens", m.tokens.WithLabelValues("chat", "support", "gpt-4o", "cached", PurposeChat), 50},
		{"reasoning tokens", m.tokens.WithLabelValues("chat", "support", "gpt-4o", "reasoning", PurposeChat), 3},
		{"history tokens", m.tokens.WithLabelValues("chat", "support", "gpt-4o", "history", PurposeChat), 70},
		{"estimated", m.estimated.WithLabelValues("chat", "support", "gpt-4o"), 1},
		{"unpriced mystery-1", m.unpriced.WithLabelValues("mystery-1"), 1},
	}
	for _, tc := range counters {
		t.Run(tc.name, func(t *testing.T) {
			if got := testutil.ToFloat64(tc.c); got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}

	// Only requests that used tokens of an unpriced model count; a priced
	// model's series is there at 0.
	if got := testutil.CollectAndCount(m.unpriced); got != 2 {
		t.Errorf("unpriced series: got %d, want 2", got)
	}
	if got := testutil.ToFloat64(m.unpriced.WithLabelValues("gpt-4o")); got != 0 {
		t.Errorf("unpriced gpt-4o: got %v, want 0", got)
	}
	if got, want := m.cost.value("chat", "support", "gpt-4o", PurposeChat), int64(123_457_000+987_651_000); got != want {
		t.Errorf("cost: got %d nano-USD, want %d", got, want)
	}
}

func TestLatencyHistograms(t *testing.T) {
	tests := []struct {
		name                                 string
		req                                  Request
		wantUpstream, wantOverhead, wantTTFT int
	}{
		{"stream reaching upstream", Request{Stream: true, Duration: 2 * time.Second, Upstream: time.Second, TTFT: 300 * time.Millisecond}, 1, 1, 1},
		{"non-stream ignores ttft", Request{Duration: time.Second, Upstream: time.Second, TTFT: time.Second}, 1, 1, 0},
		{"stream without a token", Request{Stream: true, Duration: time.Second, Upstream: time.Second}, 1, 1, 0},
		{"never reached upstream", Request{Code: 502, Duration: time.Millisecond}, 0, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := New(prometheus.NewRegistry(), 0)
			m.ObserveRequest(tc.req)
			count := func(h *prometheus.HistogramVec) int {
				n, err := testutil.GatherAndCount(gathererOf(h))
				require.NoError(t, err)
				return n
			}
			if got := count(m.duration); got != 1 {
				t.Errorf("duration series: got %d, want 1", got)
			}
			if got := count(m.upstream); got != tc.wantUpstream {
				t.Errorf("upstream series: got %d, want %d", got, tc.wantUpstream)
			}
			if got := count(m.overhead); got != tc.wantOverhead {
				t.Errorf("overhead series: got %d, want %d", got, tc.wantOverhead)
			}
			if got := count(m.ttft); got != tc.wantTTFT {
				t.Errorf("ttft series: got %d, want %d", got, tc.wantTTFT)
			}
		})
	}
}

// gathererOf registers c alone on a fresh registry.
func gathererOf(c prometheus.Collector) prometheus.Gatherer {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	return reg
}

func TestOverheadIsDurationMinusUpstream(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	m.ObserveRequest(Request{Channel: "c", Agent: "a", Duration: 1500 * time.Millisecond, Upstream: 1400 * time.Millisecond})
	m.ObserveRequest(Request{Channel: "c", Agent: "a", Duration: time.Second, Upstream: 2 * time.Second}) // clock step
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != "historyproxy_proxy_overhead_seconds" {
			continue
		}
		h := mf.GetMetric()[0].GetHistogram()
		if got, want := h.GetSampleSum(), 0.1; math.Abs(got-want) > 1e-9 {
			t.Errorf("overhead sum: got %v, want %v", got, want)
		}
		if got := h.GetSampleCount(); got != 2 {
			t.Errorf("overhead count: got %d, want 2", got)
		}
		return
	}
	t.Fatal("historyproxy_proxy_overhead_seconds not gathered")
}

func TestHistoryMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	m.ObserveRequest(Request{Channel: "c", Agent: "a", Reached: true, Session: "c:u:a", HistoryMessages: 6, HistoryTokens: 900, HistoryTruncated: true})
	m.ObserveRequest(Request{Channel: "c", Agent: "a", Reached: true, Session: "c:u:a"})
	if got := testutil.ToFloat64(m.truncated.WithLabelValues("c", "a")); got != 1 {
		t.Errorf("truncated: got %v, want 1", got)
	}
	mfs, err := reg.Gather()
	require.NoError(t, err)
	sums := map[string]float64{}
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "historyproxy_history_injected_") {
			h := mf.GetMetric()[0].GetHistogram()
			require.Equal(t, uint64(2), h.GetSampleCount(), mf.GetName())
			sums[mf.GetName()] = h.GetSampleSum()
		}
	}
	want := map[string]float64{"historyproxy_history_injected_messages": 6, "historyproxy_history_injected_tokens": 900}
	require.Equal(t, want, sums)
}

func TestLabelValues(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	for i := range maxLabelValues {
		m.ObserveRequest(Request{Channel: "c", Agent: "a", Model: fmt.Sprintf("model-%d", i), Code: 200, Reached: true})
	}
	tests := []struct {
		name, model, want string
	}{
		{"known model keeps its value", "model-7", "model-7"},
		{"new model past the cap", "model-new", otherValue},
		{"empty model", "", unknownValue},
		{"invalid UTF-8 does not panic", "bad\xff", otherValue},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := testutil.ToFloat64(m.requests.WithLabelValues("c", "a", tc.want, "200"))
			m.ObserveRequest(Request{Channel: "c", Agent: "a", Model: tc.model, Code: 200, Reached: true})
			if got := testutil.ToFloat64(m.requests.WithLabelValues("c", "a", tc.want, "200")) - before; got != 1 {
				t.Errorf("requests with model=%q: got +%v, want +1", tc.want, got)
			}
		})
	}
	// 100 models, "other" and "unknown".
	if got, want := testutil.CollectAndCount(m.requests), maxLabelValues+2; got != want {
		t.Errorf("request series: got %d, want %d", got, want)
	}
}

func TestSanitize(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"plain", "chat:john@example.com:support", "chat:john@example.com:support"},
		{"invalid UTF-8", "a\xffb", "a\uFFFDb"},
		{"too long", strings.Repeat("x", maxLabelLen+10), strings.Repeat("x", maxLabelLen)},
		{"cut inside a rune", strings.Repeat("x", maxLabelLen-1) + "é", strings.Repeat("x", maxLabelLen-1) + "\uFFFD"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := sanitize(tc.in); got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestBadInputDoesNotPanic(t *testing.T) {
	m := New(prometheus.NewRegistry(), 0)
	require.NotPanics(t, func() {
		m.ObserveRequest(Request{Channel: "\xff", Agent: "\xfe", Model: "\xfd", Session: "s\xff", Code: 200, Reached: true, Billed: true,
			Duration: -time.Second, PromptTokens: -5, CompletionTokens: -1, HistoryMessages: -1, HistoryTokens: -2,
			CostNanos: -10, Priced: true})
		m.ObserveStore("bad\xff", time.Millisecond, errors.New("boom"))
	})
	if got := testutil.ToFloat64(m.tokens.WithLabelValues("\uFFFD", "\uFFFD", "\uFFFD", "prompt", PurposeChat)); got != 0 {
		t.Errorf("negative prompt tokens: got %v, want 0", got)
	}
}

func TestStoreAndRetryMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	m.ObserveStore("window", 2*time.Millisecond, nil)
	m.ObserveStore("append", 3*time.Millisecond, errors.New("connection refused"))
	m.ObserveStore("append", 3*time.Millisecond, nil)
	m.SetRetryQueueDepth(7)
	m.RetryAttempt(true)
	m.RetryAttempt(false)
	m.RetryAttempt(false)
	m.RetryDropped()
	m.SetStoreUp(true)

	tests := []struct {
		name string
		c    prometheus.Collector
		want float64
	}{
		{"append errors", m.storeErrors.WithLabelValues("append"), 1},
		{"window errors", m.storeErrors.WithLabelValues("window"), 0},
		{"queue depth", m.retryDepth, 7},
		{"retries ok", m.retries.WithLabelValues("ok"), 1},
		{"retries error", m.retries.WithLabelValues("error"), 2},
		{"dropped", m.retryDropped, 1},
		{"store up", m.storeUp, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := testutil.ToFloat64(tc.c); got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
	if got := testutil.CollectAndCount(m.storeDuration); got != 2 {
		t.Errorf("store duration series: got %d, want 2 (window, append)", got)
	}
	m.SetStoreUp(false)
	if got := testutil.ToFloat64(m.storeUp); got != 0 {
		t.Errorf("store up after SetStoreUp(false): got %v, want 0", got)
	}
}

func TestForgetSessionDeletesItsSeries(t *testing.T) {
	key := []byte("0123456789abcdef")
	for _, mode := range []string{SessionLabelID, SessionLabelHash, SessionLabelOff} {
		t.Run(mode, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			label, err := NewSessionLabel(mode, key)
			require.NoError(t, err)
			m := New(reg, 10, WithSessionLabel(label))
			for _, s := range []string{"chat:ann:support", "chat:bob:support"} {
				m.ObserveRequest(Request{Channel: "chat", Agent: "support", Model: "m", Session: s, Code: 200, Reached: true, Billed: true,
					PromptTokens: 3, CompletionTokens: 1, CostNanos: 1000, Priced: true})
			}
			bob, _ := label.Label("chat:bob:support")
			require.Equal(t, mode != SessionLabelOff, m.ForgetSession("chat:ann:support"), "ann had series")
			require.False(t, m.ForgetSession("chat:ann:support"), "forgotten once")
			require.False(t, m.ForgetSession("chat:nobody:support"))
			var want []string
			if mode != SessionLabelOff {
				want = []string{bob}
			}
			require.Equal(t, want, sessionsWithSeries(t, reg), "only bob's series are left")
			require.Equal(t, float64(len(want)), testutil.ToFloat64(m.sessionsActive))
			require.Zero(t, testutil.ToFloat64(m.evictions), "forgetting is not an eviction")
		})
	}
}

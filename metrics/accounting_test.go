package metrics

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// withClock makes the label caps read the time from now.
func withClock(now func() time.Time) Option {
	return func(m *Metrics) {
		for _, c := range []*valueCap{m.models, m.channels, m.agents} {
			c.now = now
		}
	}
}

func TestHistoryTokensCountOnlyWhenBilled(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	const session = "chat:u:support"
	base := Request{Channel: "chat", Agent: "support", Model: "gpt-4o", Session: session, Reached: true, HistoryMessages: 2, HistoryTokens: 19}
	answered := base
	answered.Code, answered.Billed, answered.PromptTokens, answered.CompletionTokens = 200, true, 40, 5
	m.ObserveRequest(answered)
	for _, code := range []int{429, 429, 500} {
		failed := base
		failed.Code = code
		m.ObserveRequest(failed)
	}
	if got := testutil.ToFloat64(m.tokens.WithLabelValues("chat", "support", "gpt-4o", tokenHistory, PurposeChat)); got != 19 {
		t.Errorf("history tokens: got %v, want 19 (the failed requests' prompts were not billed)", got)
	}
	if got := testutil.ToFloat64(m.sessionTokens.WithLabelValues(session, tokenHistory)); got != 19 {
		t.Errorf("session history tokens: got %v, want 19", got)
	}
	if got := testutil.ToFloat64(m.tokens.WithLabelValues("chat", "support", "gpt-4o", tokenPrompt, PurposeChat)); got != 40 {
		t.Errorf("prompt tokens: got %v, want 40", got)
	}
	// What was injected is still observed for every request.
	n, err := testutil.GatherAndCount(gathererOf(m.histTokens))
	require.NoError(t, err)
	require.Equal(t, 1, n)
}

func TestLongSessionIDsHaveTheirOwnSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	// Two valid ids of 386 bytes that differ only in their last byte.
	part := strings.Repeat("x", 128)
	a := part + ":" + part + ":" + part[:127] + "a"
	b := part + ":" + part + ":" + part[:127] + "b"
	require.Len(t, a, 386)
	for i, s := range []string{a, b, b} {
		m.ObserveRequest(Request{Session: s, Code: 200, Reached: true, Billed: true, PromptTokens: int64(10 * (i + 1))})
	}
	if got := testutil.ToFloat64(m.sessionTokens.WithLabelValues(a, tokenPrompt)); got != 10 {
		t.Errorf("session a: got %v prompt tokens, want 10", got)
	}
	if got := testutil.ToFloat64(m.sessionTokens.WithLabelValues(b, tokenPrompt)); got != 50 {
		t.Errorf("session b: got %v prompt tokens, want 50", got)
	}
	if got := testutil.ToFloat64(m.sessionsActive); got != 2 {
		t.Errorf("sessions tracked: got %v, want 2", got)
	}
}

func TestSessionLabel(t *testing.T) {
	key := []byte("0123456789abcdef")
	hash, err := NewSessionLabel(SessionLabelHash, key)
	require.NoError(t, err)
	other, err := NewSessionLabel(SessionLabelHash, []byte("another key, 16+"))
	require.NoError(t, err)
	off, err := NewSessionLabel(SessionLabelOff, nil)
	require.NoError(t, err)
	id, err := NewSessionLabel("", nil)
	require.NoError(t, err)

	const s = "chat:john@example.com:support"
	got, ok := hash.Label(s)
	require.True(t, ok)
	require.Regexp(t, `^chat:[0-9a-f]{32}:support$`, got)
	require.NotContains(t, got, "john")
	again, _ := hash.Label(s)
	require.Equal(t, got, again, "stable")
	other1, _ := other.Label(s)
	require.NotEqual(t, got, other1, "keyed")
	sibling, _ := hash.Label("chat:jane@example.com:support")
	require.NotEqual(t, got, sibling)
	bare, _ := hash.Label("no-colons")
	require.Regexp(t, `^[0-9a-f]{32}$`, bare)

	got, ok = id.Label(s)
	require.True(t, ok)
	require.Equal(t, s, got)
	long := strings.Repeat("y", 400)
	got, _ = id.Label(long)
	require.Regexp(t, `^[0-9a-f]{32}$`, got, "an id past the longest valid one is hashed, never cut")

	_, ok = off.Label(s)
	require.False(t, ok)

	for _, tc := range []struct {
		mode string
		key  []byte
		want string
	}{
		{"hash", []byte("short"), "at least 16"},
		{"hash", nil, "at least 16"},
		{"sha1", key, `"sha1" is not one of id, hash, off`},
	} {
		_, err := NewSessionLabel(tc.mode, tc.key)
		require.ErrorContains(t, err, tc.want)
	}
}

func TestSessionLabelModes(t *testing.T) {
	const s = "chat:john@example.com:support"
	hash, err := NewSessionLabel(SessionLabelHash, []byte("0123456789abcdef"))
	require.NoError(t, err)
	hashed, _ := hash.Label(s)
	off, err := NewSessionLabel(SessionLabelOff, nil)
	require.NoError(t, err)
	for _, tc := range []struct {
		name    string
		label   SessionLabel
		want    []string
		tracked float64
	}{
		{"id", SessionLabel{}, []string{s}, 1},
		{"hash", hash, []string{hashed}, 1},
		{"off", off, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			m := New(reg, 0, WithSessionLabel(tc.label))
			m.ObserveRequest(Request{Channel: "chat", Agent: "support", Session: s, Code: 200, Reached: true, Billed: true,
				PromptTokens: 5, CostNanos: 700, Priced: true})
			require.Equal(t, tc.want, sessionsWithSeries(t, reg))
			require.Equal(t, tc.tracked, testutil.ToFloat64(m.sessionsActive))
			// The aggregate series are there in every mode.
			require.Equal(t, int64(700), m.cost.value("chat", "support", unknownValue, PurposeChat))
		})
	}
}

// TestCostDoesNotDrift adds 20,000 requests of half a micro-USD each: the
// total is exactly a cent (a float counter adding 5e-7 each time is not).
func TestCostDoesNotDrift(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	const n = 20_000
	for range n {
		m.ObserveRequest(Request{Channel: "c", Agent: "a", Model: "gpt-5-nano", Session: "c:u:a", Code: 200,
			Reached: true, Billed: true, PromptTokens: 10, CostNanos: 500, Priced: true})
	}
	require.Equal(t, int64(n*500), m.cost.value("c", "a", "gpt-5-nano", PurposeChat))
	got := gatheredCounter(t, reg, "historyproxy_cost_usd_total")
	if got != 0.01 {
		t.Errorf("cost: got %.17g USD, want exactly 0.01", got)
	}
	if got := gatheredCounter(t, reg, "historyproxy_session_cost_usd_total"); got != 0.01 {
		t.Errorf("session cost: got %.17g USD, want exactly 0.01", got)
	}
}

// gatheredCounter returns the value of the one series of family in reg.
func gatheredCounter(t *testing.T, reg prometheus.Gatherer, family string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == family {
			require.Len(t, mf.GetMetric(), 1, family)
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("%s not gathered", family)
	return 0
}

// TestSessionWithoutUsageTakesNoSlot: a request that used no tokens (the
// upstream failed, or nothing was billed) gives its session no series, so
// it can neither count as tracked nor evict a session that has series.
func TestSessionWithoutUsageTakesNoSlot(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 1)
	m.ObserveRequest(Request{Session: "c:a:x", Code: 200, Reached: true, Billed: true, PromptTokens: 7})
	m.ObserveRequest(Request{Session: "c:b:x", Code: 429, Reached: true, HistoryTokens: 30})
	m.ObserveRequest(Request{Session: "c:c:x", Code: 502})
	m.ObserveRequest(Request{Session: "c:d:x", Code: 200, Reached: true, Billed: true}) // no usage at all
	require.Equal(t, []string{"c:a:x"}, sessionsWithSeries(t, reg))
	require.Equal(t, 1.0, testutil.ToFloat64(m.sessionsActive))
	require.Equal(t, 0.0, testutil.ToFloat64(m.evictions))
}

// TestBucketsReachRealTraffic: a request that takes most of the upstream's
// 10-minute timeout, and a reasoning model's first token after minutes, land
// in finite buckets.
func TestBucketsReachRealTraffic(t *testing.T) {
	require.GreaterOrEqual(t, requestBuckets[len(requestBuckets)-1], (10 * time.Minute).Seconds())
	require.GreaterOrEqual(t, ttftBuckets[len(ttftBuckets)-1], (10 * time.Minute).Seconds())
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	m.ObserveRequest(Request{Channel: "c", Agent: "a", Code: 200, Reached: true, Stream: true,
		Duration: 9 * time.Minute, Upstream: 9 * time.Minute, TTFT: 4 * time.Minute, UpstreamTTFT: 4 * time.Minute})
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		switch mf.GetName() {
		case "historyproxy_request_duration_seconds", "historyproxy_upstream_duration_seconds",
			"historyproxy_time_to_first_token_seconds", "historyproxy_upstream_time_to_first_token_seconds":
			h := mf.GetMetric()[0].GetHistogram()
			finite := h.GetBucket()[len(h.GetBucket())-1]
			if finite.GetCumulativeCount() != 1 {
				t.Errorf("%s: the observation passed the largest finite bucket, %v", mf.GetName(), finite.GetUpperBound())
			}
		}
	}
}

// TestLabelCapsTakeOnlyForwardedValuesAndGiveIdleOnesBack holds issue 16.7:
// requests rejected before forwarding cannot fill the caps, and a value not
// seen for labelIdle gives its slot (and its series) back.
func TestLabelCapsTakeOnlyForwardedValuesAndGiveIdleOnesBack(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	reg := prometheus.NewRegistry()
	m := New(reg, 0, withClock(func() time.Time { return now }))
	reject := func(model string) {
		m.ObserveRequest(Request{Channel: "junk-" + model, Agent: "junk-" + model, Model: model, Code: 400})
	}
	forward := func(model string) {
		m.ObserveRequest(Request{Channel: "chat", Agent: "support", Model: model, Code: 200, Reached: true, Billed: true,
			PromptTokens: 1, CostNanos: 1, Priced: true})
	}
	for i := range 3 * maxLabelValues {
		reject(fmt.Sprintf("junk-%d", i))
	}
	forward("gpt-4o")
	require.Equal(t, 1.0, testutil.ToFloat64(m.requests.WithLabelValues("chat", "support", "gpt-4o", "200")))
	require.Equal(t, float64(3*maxLabelValues), testutil.ToFloat64(m.requests.WithLabelValues(otherValue, otherValue, otherValue, "400")))
	// A rejected request of a known value keeps its label.
	m.ObserveRequest(Request{Channel: "chat", Agent: "support", Model: "gpt-4o", Code: 400})
	require.Equal(t, 1.0, testutil.ToFloat64(m.requests.WithLabelValues("chat", "support", "gpt-4o", "400")))

	// Fill the cap with forwarded values; the next is "other" while they
	// are fresh.
	for i := 1; i < maxLabelValues; i++ {
		forward(fmt.Sprintf("m-%d", i))
	}
	forward("late")
	require.Equal(t, 1.0, testutil.ToFloat64(m.requests.WithLabelValues("chat", "support", otherValue, "200")))

	// An hour on, with gpt-4o still in use, the least recently seen value
	// gives its slot to the newcomer, and its series go with it.
	now = now.Add(labelIdle)
	forward("gpt-4o")
	forward("late")
	require.Equal(t, 1.0, testutil.ToFloat64(m.requests.WithLabelValues("chat", "support", "late", "200")))
	require.Equal(t, 2.0, testutil.ToFloat64(m.requests.WithLabelValues("chat", "support", "gpt-4o", "200")))
	models := seriesLabelValues(t, reg, "historyproxy_requests_total", "model")
	require.NotContains(t, models, "m-1", "the evicted value's series are deleted")
	require.Contains(t, models, "m-2")
	require.NotContains(t, seriesLabelValues(t, reg, "historyproxy_cost_usd_total", "model"), "m-1")
	require.NotContains(t, seriesLabelValues(t, reg, "historyproxy_tokens_total", "model"), "m-1")
}

// seriesLabelValues returns the distinct values of label in family's series.
func seriesLabelValues(t *testing.T, reg prometheus.Gatherer, family, label string) []string {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	var out []string
	for _, mf := range mfs {
		if mf.GetName() != family {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == label && !slices.Contains(out, lp.GetValue()) {
					out = append(out, lp.GetValue())
				}
			}
		}
	}
	return out
}

func TestForgetSession(t *testing.T) {
	key := []byte("0123456789abcdef")
	hash, err := NewSessionLabel(SessionLabelHash, key)
	require.NoError(t, err)
	for _, tc := range []struct {
		name  string
		label SessionLabel
	}{{"id", SessionLabel{}}, {"hash", hash}} {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			m := New(reg, 2, WithSessionLabel(tc.label))
			for _, s := range []string{"c:a:x", "c:b:x"} {
				m.ObserveRequest(Request{Session: s, Code: 200, Reached: true, Billed: true, PromptTokens: 3, CostNanos: 10, Priced: true})
			}
			m.ForgetSession("c:a:x")
			keep, _ := tc.label.Label("c:b:x")
			require.Equal(t, []string{keep}, sessionsWithSeries(t, reg))
			require.Equal(t, 1.0, testutil.ToFloat64(m.sessionsActive))
			// Its place is free: a new session evicts nobody.
			m.ObserveRequest(Request{Session: "c:c:x", Code: 200, Reached: true, Billed: true, PromptTokens: 1})
			require.Equal(t, 0.0, testutil.ToFloat64(m.evictions))
			m.ForgetSession("c:unknown:x")
			require.Equal(t, 2.0, testutil.ToFloat64(m.sessionsActive))
		})
	}
}

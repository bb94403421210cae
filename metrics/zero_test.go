package metrics

import (
	"fmt"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// series reports whether reg exposes family with exactly labels, and its
// value (a histogram's sample count).
func series(t *testing.T, reg prometheus.Gatherer, family string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != family {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, lp := range m.GetLabel() {
				if labels[lp.GetName()] != lp.GetValue() {
					continue next
				}
			}
			if h := m.GetHistogram(); h != nil {
				return float64(h.GetSampleCount()), true
			}
			return m.GetCounter().GetValue(), true
		}
	}
	return 0, false
}

// TestSeriesExistAtZero: series whose labels are known before they count
// are exported at 0, so dashboards show 0 instead of "no data": the store's
// operations from the start, and the conditional counters of a channel,
// agent and model from their first request.
func TestSeriesExistAtZero(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	for _, c := range []struct {
		family string
		labels map[string]string
	}{
		{"historyproxy_store_errors_total", map[string]string{"op": "window"}},
		{"historyproxy_store_errors_total", map[string]string{"op": "append"}},
		{"historyproxy_store_operation_duration_seconds", map[string]string{"op": "window"}},
		{"historyproxy_store_operation_duration_seconds", map[string]string{"op": "append"}},
		{"historyproxy_retry_attempts_total", map[string]string{"result": "ok"}},
		{"historyproxy_retry_attempts_total", map[string]string{"result": "error"}},
	} {
		if v, ok := series(t, reg, c.family, c.labels); !ok || v != 0 {
			t.Errorf("at start, %s%v: got %v (present %v), want 0", c.family, c.labels, v, ok)
		}
	}

	// A priced, upstream-counted, untruncated session request.
	m.ObserveRequest(Request{Channel: "web", Agent: "support", Model: "gpt-4o", Session: "web:u:support",
		Reached: true, Billed: true, Code: 200, PromptTokens: 10, CompletionTokens: 2, Priced: true, CostNanos: 100})
	for _, c := range []struct {
		family string
		labels map[string]string
	}{
		{"historyproxy_unpriced_requests_total", map[string]string{"model": "gpt-4o"}},
		{"historyproxy_estimated_usage_requests_total", map[string]string{"channel": "web", "agent": "support", "model": "gpt-4o"}},
		{"historyproxy_history_truncated_total", map[string]string{"channel": "web", "agent": "support"}},
	} {
		if v, ok := series(t, reg, c.family, c.labels); !ok || v != 0 {
			t.Errorf("after the first request, %s%v: got %v (present %v), want 0", c.family, c.labels, v, ok)
		}
	}

	// They still count.
	m.ObserveRequest(Request{Channel: "web", Agent: "support", Model: "gpt-4o", Session: "web:u:support",
		Reached: true, Billed: true, Code: 200, PromptTokens: 10, Estimated: true, HistoryTruncated: true})
	if got := testutil.ToFloat64(m.unpriced.WithLabelValues("gpt-4o")); got != 1 {
		t.Errorf("unpriced: got %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.estimated.WithLabelValues("web", "support", "gpt-4o")); got != 1 {
		t.Errorf("estimated: got %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.truncated.WithLabelValues("web", "support")); got != 1 {
		t.Errorf("truncated: got %v, want 1", got)
	}
}

// TestCostExistsAtZero: historyproxy_cost_usd_total is one of the counters
// of a channel, agent and model, and exists at 0 from their first request
// as the token types do, also when that request was not billed (a 429) or
// its model has no price (it costs 0, as the README says).
func TestCostExistsAtZero(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	m.ObserveRequest(Request{Channel: "web", Agent: "support", Model: "gpt-4o", Reached: true, Code: 429})
	m.ObserveRequest(Request{Channel: "web", Agent: "support", Model: "my-llama", Reached: true, Billed: true, Code: 200, PromptTokens: 5})
	for _, model := range []string{"gpt-4o", "my-llama"} {
		labels := map[string]string{"channel": "web", "agent": "support", "model": model, "purpose": PurposeChat}
		if _, ok := series(t, reg, "historyproxy_tokens_total", map[string]string{"channel": "web", "agent": "support", "model": model, "type": "prompt", "purpose": PurposeChat}); !ok {
			t.Fatalf("%s: no token series", model)
		}
		if v, ok := series(t, reg, "historyproxy_cost_usd_total", labels); !ok || v != 0 {
			t.Errorf("historyproxy_cost_usd_total%v: got %v (present %v), want 0", labels, v, ok)
		}
	}
	m.ObserveRequest(Request{Channel: "web", Agent: "support", Model: "gpt-4o", Reached: true, Billed: true, Code: 200, PromptTokens: 5, Priced: true, CostNanos: 500})
	if v, _ := series(t, reg, "historyproxy_cost_usd_total", map[string]string{"channel": "web", "agent": "support", "model": "gpt-4o", "purpose": PurposeChat}); v != 500e-9 {
		t.Errorf("cost after a billed request: got %v, want 5e-07", v)
	}
}

// TestWindowCacheSeries: the window cache's series are absent until a
// store with the cache on registers them (a memory store, or the cache
// off, never does), and then the reads exist at 0 for each result and the
// gauges report what the cache holds, read at each scrape.
func TestWindowCacheSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, 0)
	m.WindowCacheHit() // a call before the cache is on neither panics nor exports
	for _, family := range []string{"historyproxy_window_cache_reads_total", "historyproxy_window_cache_bytes", "historyproxy_window_cache_sessions"} {
		if n, err := testutil.GatherAndCount(reg, family); err != nil || n != 0 {
			t.Errorf("without a cache, %s: %d series (%v), want none", family, n, err)
		}
	}
	bytes, sessions := int64(4096), 2
	m.WindowCacheOn(func() (int64, int) { return bytes, sessions })
	for _, r := range []string{"hit", "miss", "stale"} {
		want := 0.0
		if r == "hit" {
			want = 1 // the one before
		}
		if v, ok := series(t, reg, "historyproxy_window_cache_reads_total", map[string]string{"result": r}); !ok || v != want {
			t.Errorf("window_cache_reads_total{result=%q}: got %v (present %v), want %v", r, v, ok, want)
		}
	}
	m.WindowCacheMiss()
	m.WindowCacheStale()
	m.WindowCacheStale()
	for r, want := range map[string]float64{"hit": 1, "miss": 1, "stale": 2} {
		if got := testutil.ToFloat64(m.cache.reads.WithLabelValues(r)); got != want {
			t.Errorf("window_cache_reads_total{result=%q}: got %v, want %v", r, got, want)
		}
	}
	for _, held := range [][2]int{{4096, 2}, {0, 0}} {
		bytes, sessions = int64(held[0]), held[1]
		const want = `
# HELP historyproxy_window_cache_bytes Heap the window cache counts for the tails it holds (bounded by store.window_cache_bytes).
# TYPE historyproxy_window_cache_bytes gauge
historyproxy_window_cache_bytes %d
# HELP historyproxy_window_cache_sessions Sessions whose newest entries the window cache holds.
# TYPE historyproxy_window_cache_sessions gauge
historyproxy_window_cache_sessions %d
`
		if err := testutil.GatherAndCompare(reg, strings.NewReader(fmt.Sprintf(want, held[0], held[1])),
			"historyproxy_window_cache_bytes", "historyproxy_window_cache_sessions"); err != nil {
			t.Errorf("held %v: %v", held, err)
		}
	}
}

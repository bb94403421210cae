package metrics

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

// wantFamilies is every metric family the package exports; the tests below
// keep it, the code and the dashboard in step.
var wantFamilies = []string{
	"historyproxy_active_generations",
	"historyproxy_background_calls_total",
	"historyproxy_busy_rejections_total",
	"historyproxy_lease_wait_seconds",
	"historyproxy_cost_usd_total",
	"historyproxy_deltas_dropped_total",
	"historyproxy_deltas_published_total",
	"historyproxy_estimated_usage_requests_total",
	"historyproxy_history_injected_messages",
	"historyproxy_history_injected_tokens",
	"historyproxy_history_truncated_total",
	"historyproxy_proxy_overhead_seconds",
	"historyproxy_request_duration_seconds",
	"historyproxy_requests_total",
	"historyproxy_retry_attempts_total",
	"historyproxy_retry_dropped_total",
	"historyproxy_retry_queue_depth",
	"historyproxy_session_cost_usd_total",
	"historyproxy_session_series_evictions_total",
	"historyproxy_session_tokens_total",
	"historyproxy_sessions_tracked",
	"historyproxy_store_errors_total",
	"historyproxy_store_operation_duration_seconds",
	"historyproxy_store_up",
	"historyproxy_time_to_first_token_seconds",
	"historyproxy_tokens_total",
	"historyproxy_unpriced_requests_total",
	"historyproxy_upstream_duration_seconds",
	"historyproxy_upstream_time_to_first_token_seconds",
	"historyproxy_watches_open",
	"historyproxy_window_cache_bytes",
	"historyproxy_window_cache_reads_total",
	"historyproxy_window_cache_sessions",
}

// exercised returns the binary's registry with historyproxy's metrics
// registered and every one of them given samples, since a vector with no
// children is absent from the exposition.
func exercised(t *testing.T) *prometheus.Registry {
	t.Helper()
	reg := NewRegistry()
	m := New(reg, 1)
	m.ObserveRequest(Request{
		Channel: "chat", Agent: "support", Model: "gpt-4o", Session: "chat:a@example.com:support",
		Code: 200, Stream: true, Reached: true, Billed: true,
		Duration: 2 * time.Second, Upstream: 1900 * time.Millisecond, TTFT: 400 * time.Millisecond, UpstreamTTFT: 350 * time.Millisecond,
		PromptTokens: 300, CompletionTokens: 40, CachedTokens: 128, ReasoningTokens: 12,
		Estimated: true, HistoryMessages: 8, HistoryTokens: 250, HistoryTruncated: true,
		CostNanos: 4_200_000, Priced: true,
	})
	// A second session evicts the first (limit 1); an unknown model is unpriced.
	m.ObserveRequest(Request{
		Channel: "chat", Agent: "support", Model: "mystery-1", Session: "chat:b@example.com:support",
		Code: 200, Reached: true, Billed: true, Duration: time.Second, Upstream: time.Second, PromptTokens: 10, CompletionTokens: 1,
	})
	m.ObserveRequest(Request{Channel: "chat", Agent: "support", Model: "gpt-4o",
		Session: "chat:b@example.com:support", Code: 200, Reached: true, Billed: true, PromptTokens: 1, CostNanos: 1000, Priced: true})
	m.ObserveStore("window", time.Millisecond, nil)
	m.ObserveStore("append", time.Millisecond, errors.New("connection refused"))
	m.SetRetryQueueDepth(3)
	m.RetryAttempt(true)
	m.RetryDropped()
	m.SetStoreUp(true)
	m.ObserveRequest(Request{Channel: "chat", Agent: "support", Model: "gpt-4o",
		Session: "chat:c@example.com:support", Code: 409, Busy: "reject"})
	m.ObserveRequest(Request{Channel: "chat", Agent: "sales", Model: "gpt-4o",
		Session: "chat:d@example.com:sales", Code: 200, Reached: true, Ordered: true, LeaseWait: time.Second})
	m.GenerationStarted()
	m.WatchOpened()
	m.DeltasPublished(1)
	m.DeltasDropped(1)
	m.WindowCacheOn(func() (int64, int) { return 12 << 10, 1 })
	m.WindowCacheHit()
	m.WindowCacheMiss()
	m.WindowCacheStale()
	return reg
}

// families returns the names of the metric families gathered from g.
func families(t *testing.T, g prometheus.Gatherer) []string {
	t.Helper()
	mfs, err := g.Gather()
	require.NoError(t, err)
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	return names
}

func TestEveryFamilyIsExported(t *testing.T) {
	var got []string
	for _, name := range families(t, exercised(t)) {
		if strings.HasPrefix(name, "historyproxy_") {
			got = append(got, name)
		}
	}
	want := slices.Clone(wantFamilies)
	sort.Strings(want)
	require.Equal(t, want, got)
}

// scrape fetches reg's exposition through Handler, as Prometheus would.
func scrape(t *testing.T, reg *prometheus.Registry, accept string) (contentType string, body []byte) {
	t.Helper()
	srv := httptest.NewServer(Handler(reg))
	t.Cleanup(srv.Close)
	req, err := http.NewRequest(http.MethodGet, srv.URL, nil)
	require.NoError(t, err)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	return resp.Header.Get("Content-Type"), body
}

func TestHandlerServesTextAndOpenMetrics(t *testing.T) {
	reg := exercised(t)
	tests := []struct {
		name, accept, wantType string
	}{
		{"text by default", "", "text/plain"},
		{"openmetrics on request", "application/openmetrics-text;version=1.0.0", "application/openmetrics-text"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ct, body := scrape(t, reg, tc.accept)
			if !strings.HasPrefix(ct, tc.wantType) {
				t.Errorf("content type: got %q, want %s", ct, tc.wantType)
			}
			for _, want := range []string{
				`historyproxy_requests_total{agent="support",channel="chat",code="200",model="gpt-4o"} 2`,
				`historyproxy_session_series_evictions_total 1`,
				`go_goroutines `,
				`process_start_time_seconds `,
			} {
				if !bytes.Contains(body, []byte(want)) {
					t.Errorf("exposition lacks %q", want)
				}
			}
		})
	}
}

func TestPromtoolCheckMetrics(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("promtool not installed (CI installs Debian package prometheus)")
		}
		t.Skip("promtool not installed: apt-get install -y prometheus")
	}
	_, body := scrape(t, exercised(t), "")

	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

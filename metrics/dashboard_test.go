package metrics

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const dashboardPath = "../deploy/grafana/historyproxy.json"

var (
	// Parts of a PromQL expression that hold no metric name, removed before
	// looking for identifiers. Strings go first, since they may hold braces.
	promqlStrings  = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	promqlMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promqlRanges   = regexp.MustCompile(`\[[^\]]*\]`)
	promqlGrouping = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	grafanaVars    = regexp.MustCompile(`\$\{[^}]*\}|\$\w+`)

	// promqlKeywords are identifiers that stand alone without being metrics.
	promqlKeywords = map[string]bool{
		"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
		"bool": true, "offset": true, "and": true, "or": true, "unless": true, "atan2": true,
		"le": true, "inf": true, "nan": true,
	}
)

// metricNames returns the metric family names an expression selects, in
// order of appearance: identifiers that are not followed by "(" (functions
// and aggregations) and are not keywords, with a histogram's _bucket, _sum
// or _count suffix removed.
func metricNames(expr string) []string {
	s := promqlStrings.ReplaceAllString(expr, " ")
	s = promqlMatchers.ReplaceAllString(s, " ")
	s = promqlRanges.ReplaceAllString(s, " ")
	s = promqlGrouping.ReplaceAllString(s, " ")
	s = grafanaVars.ReplaceAllString(s, " ")

	isIdentStart := func(c byte) bool { return c == '_' || c == ':' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }
	isDigit := func(c byte) bool { return '0' <= c && c <= '9' }
	isWord := func(c byte) bool { return isIdentStart(c) || isDigit(c) }

	var names []string
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case isDigit(c) || c == '.':
			// A number or a duration (1e6, 0x1f, 0.95, 5m): skip it whole.
			for i < len(s) && (isWord(s[i]) || s[i] == '.') {
				i++
			}
		case isIdentStart(c):
			start := i
			for i < len(s) && isWord(s[i]) {
				i++
			}
			ident := s[start:i]
			j := i
			for j < len(s) && (s[j] == ' ' || s[j] == '\t' || s[j] == '\n' || s[j] == '\r') {
				j++
			}
			if (j < len(s) && s[j] == '(') || promqlKeywords[strings.ToLower(ident)] {
				continue
			}
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if trimmed, ok := strings.CutSuffix(ident, suffix); ok {
					ident = trimmed
					break
				}
			}
			names = append(names, ident)
		default:
			i++
		}
	}
	return names
}

// unknownMetrics returns the names in exprs that are not in known, as
// "name (in expr)" strings, and the exprs that name no metric at all.
func unknownMetrics(exprs []string, known []string) (unknown []string) {
	for _, expr := range exprs {
		names := metricNames(expr)
		if len(names) == 0 {
			unknown = append(unknown, "no metric in "+expr)
		}
		for _, name := range names {
			if !slices.Contains(known, name) {
				unknown = append(unknown, name+" (in "+expr+")")
			}
		}
	}
	return unknown
}

func TestMetricNames(t *testing.T) {
	tests := []struct {
		name, expr string
		want       []string
	}{
		{"selector", `historyproxy_store_up`, []string{"historyproxy_store_up"}},
		{"rate with matchers and grafana range",
			`sum by (channel, agent) (rate(historyproxy_cost_usd_total{channel=~"$channel", agent=~"$agent"}[$__rate_interval])) * 3600`,
			[]string{"historyproxy_cost_usd_total"}},
		{"histogram quantile strips _bucket",
			`histogram_quantile(0.95, sum by (le) (rate(historyproxy_request_duration_seconds_bucket[5m])))`,
			[]string{"historyproxy_request_duration_seconds"}},
		{"_sum over _count",
			`rate(foo_seconds_sum[5m]) / rate(foo_seconds_count[5m])`,
			[]string{"foo_seconds", "foo_seconds"}},
		{"trailing grouping and vector matching",
			`sum(a_total) by (le) / on(x) group_left(y) b_total > bool 0`,
			[]string{"a_total", "b_total"}},
		{"topk and numbers", `topk(10, foo) * 1e6 + 0.5`, []string{"foo"}},
		{"string with braces and label names",
			`label_replace(foo, "dst", "${1}}", "src", "(.*)")`, []string{"foo"}},
		{"offset and duration", `foo offset 5m`, []string{"foo"}},
		{"set operators", `foo and bar unless baz`, []string{"foo", "bar", "baz"}},
		{"whitespace before paren", "sum (\n rate (x[1m]))", []string{"x"}},
		{"grafana variable outside a string", `topk($n, foo)`, []string{"foo"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := metricNames(tc.expr); !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestUnknownMetrics(t *testing.T) {
	known := []string{"historyproxy_requests_total", "historyproxy_request_duration_seconds"}
	tests := []struct {
		name string
		expr string
		want []string
	}{
		{"known", `rate(historyproxy_requests_total[5m])`, nil},
		{"known histogram", `histogram_quantile(0.5, rate(historyproxy_request_duration_seconds_bucket[5m]))`, nil},
		{"typo", `rate(historyproxy_request_total[5m])`,
			[]string{"historyproxy_request_total (in rate(historyproxy_request_total[5m]))"}},
		{"no metric", `vector(1)`, []string{"no metric in vector(1)"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := unknownMetrics([]string{tc.expr}, known); !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

// collectExprs returns every "expr" string anywhere in v.
func collectExprs(v any) []string {
	var out []string
	switch v := v.(type) {
	case map[string]any:
		for k, child := range v {
			if s, ok := child.(string); ok && k == "expr" {
				out = append(out, s)
				continue
			}
			out = append(out, collectExprs(child)...)
		}
	case []any:
		for _, child := range v {
			out = append(out, collectExprs(child)...)
		}
	}
	return out
}

type dashboard struct {
	SchemaVersion int    `json:"schemaVersion"`
	UID           string `json:"uid"`
	Title         string `json:"title"`
	Panels        []struct {
		ID         int    `json:"id"`
		Type       string `json:"type"`
		Title      string `json:"title"`
		Datasource *struct {
			Type string `json:"type"`
			UID  string `json:"uid"`
		} `json:"datasource"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

func readDashboard(t *testing.T) (raw any, d dashboard) {
	t.Helper()
	b, err := os.ReadFile(dashboardPath)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &raw))
	require.NoError(t, json.Unmarshal(b, &d))
	return raw, d
}

func TestDashboardQueriesNameExportedMetrics(t *testing.T) {
	raw, d := readDashboard(t)
	exprs := collectExprs(raw)
	if len(exprs) < 15 {
		t.Fatalf("exprs in dashboard: got %d, want at least 15", len(exprs))
	}
	// Variable queries are label_values(selector, label): check the selector.
	labelValues := regexp.MustCompile(`^label_values\((.*),\s*\w+\)$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(map[string]any)
		s, _ := q["query"].(string)
		sm := labelValues.FindStringSubmatch(s)
		if sm == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, s)
			continue
		}
		exprs = append(exprs, sm[1])
	}
	known := families(t, exercised(t))
	for _, u := range unknownMetrics(exprs, known) {
		t.Errorf("dashboard names a metric the package does not export: %s", u)
	}
}

func TestDashboardShape(t *testing.T) {
	_, d := readDashboard(t)
	if d.SchemaVersion < 36 {
		t.Errorf("schemaVersion: got %d, want >= 36", d.SchemaVersion)
	}
	require.NotEmpty(t, d.UID)
	require.NotEmpty(t, d.Title)

	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	for name, typ := range map[string]string{"datasource": "datasource", "channel": "query", "agent": "query"} {
		if vars[name] != typ {
			t.Errorf("templating variable %s: got type %q, want %q", name, vars[name], typ)
		}
	}

	ids := map[int]string{}
	var titles []string
	for _, p := range d.Panels {
		if prev, dup := ids[p.ID]; dup {
			t.Errorf("panel id %d used by %q and %q", p.ID, prev, p.Title)
		}
		ids[p.ID] = p.Title
		if p.Type == "row" {
			continue
		}
		titles = append(titles, p.Title)
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: datasource %+v, want uid ${datasource}", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no targets", p.Title)
		}
	}
	// The panels the operators asked for, by a word of each title.
	for _, want := range []string{
		"Cost per agent and channel", "Top sessions by cost", "Token rate by type",
		"History share of prompt tokens", "Request latency", "Proxy overhead",
		"Time to first token", "Error rate", "Store errors", "Retry queue depth and drops",
		"Session series evictions", "Wait for the session's turn", "Busy rejections",
		"Active generations", "Open watches", "Deltas for watchers",
	} {
		if !slices.ContainsFunc(titles, func(s string) bool { return strings.HasPrefix(s, want) }) {
			t.Errorf("no panel titled %q...; panels: %q", want, titles)
		}
	}
}

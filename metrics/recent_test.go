package metrics

import (
	"reflect"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestRecentWindows(t *testing.T) {
	base := time.Date(2026, 3, 1, 12, 0, 30, 0, time.UTC)
	support := RecentKey{Agent: "support", Model: "gpt-4o"}
	sales := RecentKey{Agent: "sales", Model: "gpt-4o-mini"}
	var r Recent
	r.Add(base.Add(-25*time.Hour), support, RecentCounts{Requests: 100, CostNanos: 1}) // overwritten below: same slot
	r.Add(base.Add(-23*time.Hour), support, RecentCounts{Requests: 1, PromptTokens: 10, CostNanos: 1000})
	r.Add(base.Add(-2*time.Hour), sales, RecentCounts{Requests: 2, CompletionTokens: 5, CostNanos: 50})
	r.Add(base.Add(-59*time.Minute), support, RecentCounts{Requests: 1, Errors: 1})
	r.Add(base.Add(-time.Minute), sales, RecentCounts{Requests: 1, CachedTokens: 3, CostNanos: 7})
	r.Add(base, support, RecentCounts{Requests: 1, HistoryTokens: 4, CostNanos: 20})
	// A day to the minute after the first: the slot is reused, the old
	// minute forgotten.
	r.Add(base.Add(-time.Hour), sales, RecentCounts{Requests: 1})

	tests := []struct {
		name string
		d    time.Duration
		want []RecentRow
	}{
		{name: "minute", d: time.Minute, want: []RecentRow{{support, RecentCounts{Requests: 1, HistoryTokens: 4, CostNanos: 20}}}},
		{name: "hour", d: time.Hour, want: []RecentRow{
			{support, RecentCounts{Requests: 2, Errors: 1, HistoryTokens: 4, CostNanos: 20}},
			{sales, RecentCounts{Requests: 1, CachedTokens: 3, CostNanos: 7}},
		}},
		{name: "day", d: 24 * time.Hour, want: []RecentRow{
			{support, RecentCounts{Requests: 3, Errors: 1, PromptTokens: 10, HistoryTokens: 4, CostNanos: 1020}},
			{sales, RecentCounts{Requests: 4, CompletionTokens: 5, CachedTokens: 3, CostNanos: 57}},
		}},
		{name: "longer than a day is a day", d: 48 * time.Hour, want: []RecentRow{
			{support, RecentCounts{Requests: 3, Errors: 1, PromptTokens: 10, HistoryTokens: 4, CostNanos: 1020}},
			{sales, RecentCounts{Requests: 4, CompletionTokens: 5, CachedTokens: 3, CostNanos: 57}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := r.Window(base, tt.d); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
	if got := r.Window(base.Add(25*time.Hour), 24*time.Hour); len(got) != 0 {
		t.Errorf("a day after the last request: got %+v, want nothing", got)
	}
}

func TestObserveRequestFeedsRecent(t *testing.T) {
	m := New(prometheus.NewRegistry(), 0)
	m.ObserveRequest(Request{Channel: "web", Agent: "support", Model: "gpt-4o", Reached: true, Code: 200, Billed: true,
		PromptTokens: 12, CompletionTokens: 3, HistoryTokens: 8, CostNanos: 900, Priced: true})
	m.ObserveRequest(Request{Channel: "web", Agent: "support", Model: "gpt-4o", Reached: true, Code: 429,
		PromptTokens: 12, CostNanos: 900, Priced: true}) // not billed: no tokens, no cost
	m.ObserveRequest(Request{Channel: "api", Agent: "support", Model: "gpt-4o", Reached: true, Code: 200, Billed: true,
		PromptTokens: 1, CostNanos: 100}) // no price: no cost
	want := []RecentRow{{RecentKey{Agent: "support", Model: "gpt-4o"}, RecentCounts{Requests: 3, Errors: 1, PromptTokens: 13, CompletionTokens: 3, HistoryTokens: 8, CostNanos: 900}}}
	if got := m.Recent().Window(time.Now(), time.Hour); !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

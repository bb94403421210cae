package metrics

import (
	"sort"
	"sync"
	"time"
)

// recentMinutes is how far back Recent remembers: one day, a minute a slot.
const recentMinutes = 24 * 60

// Recent tallies the requests this process proxied, their tokens and cost,
// by agent and model, a minute at a time over the last day, so that the
// console's overview can show the last hour and day without Prometheus.
// Its keys are the capped label values of the Prometheus series (at most
// maxLabelValues agents and models, then "other"), so it is bounded like
// them. It is safe for concurrent use; the zero value is ready.
type Recent struct {
	mu    sync.Mutex
	slots [recentMinutes]recentSlot
}

// recentSlot holds one minute; minute is its Unix minute, so a slot left
// from an older day is known stale and is cleared before reuse.
type recentSlot struct {
	minute int64
	rows   map[RecentKey]*RecentCounts
}

// RecentKey names one row of Recent.
type RecentKey struct {
	Agent string `json:"agent"`
	Model string `json:"model"`
}

// RecentCounts are the totals of one row. Tokens and cost count only
// billed requests, as the Prometheus counters do.
type RecentCounts struct {
	Requests         int64 `json:"requests"`
	Errors           int64 `json:"errors"` // answered with a status of 400 or more
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
	CachedTokens     int64 `json:"cached_tokens"`
	HistoryTokens    int64 `json:"history_tokens"`
	CostNanos        int64 `json:"-"`
}

func (c *RecentCounts) add(o RecentCounts) {
	c.Requests += o.Requests
	c.Errors += o.Errors
	c.PromptTokens += o.PromptTokens
	c.CompletionTokens += o.CompletionTokens
	c.CachedTokens += o.CachedTokens
	c.HistoryTokens += o.HistoryTokens
	c.CostNanos += o.CostNanos
}

// RecentRow is one agent and model's totals over a window.
type RecentRow struct {
	RecentKey
	RecentCounts
}

// Add counts c under k in the minute of at.
func (r *Recent) Add(at time.Time, k RecentKey, c RecentCounts) {
	minute := at.Unix() / 60
	r.mu.Lock()
	defer r.mu.Unlock()
	s := &r.slots[minute%recentMinutes]
	if s.minute != minute || s.rows == nil {
		// A slot last used a day (or more) ago: its rows are gone from
		// every window.
		s.minute, s.rows = minute, map[RecentKey]*RecentCounts{}
	}
	row := s.rows[k]
	if row == nil {
		row = &RecentCounts{}
		s.rows[k] = row
	}
	row.add(c)
}

// Window sums the rows of the last d before now (whole minutes, the
// current one included; at most a day), sorted by cost, then requests,
// most first.
func (r *Recent) Window(now time.Time, d time.Duration) []RecentRow {
	minutes := min(max(int64(d/time.Minute), 1), recentMinutes)
	last := now.Unix() / 60
	sum := map[RecentKey]*RecentCounts{}
	r.mu.Lock()
	for m := last - minutes + 1; m <= last; m++ {
		s := &r.slots[((m%recentMinutes)+recentMinutes)%recentMinutes]
		if s.minute != m {
			continue
		}
		for k, c := range s.rows {
			t := sum[k]
			if t == nil {
				t = &RecentCounts{}
				sum[k] = t
			}
			t.add(*c)
		}
	}
	r.mu.Unlock()
	out := make([]RecentRow, 0, len(sum))
	for k, c := range sum {
		out = append(out, RecentRow{RecentKey: k, RecentCounts: *c})
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		switch {
		case a.CostNanos != b.CostNanos:
			return a.CostNanos > b.CostNanos
		case a.Requests != b.Requests:
			return a.Requests > b.Requests
		case a.Agent != b.Agent:
			return a.Agent < b.Agent
		}
		return a.Model < b.Model
	})
	return out
}

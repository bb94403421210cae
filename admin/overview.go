package admin

import (
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/metrics"
)

// Capabilities is the answer of GET /admin/v1/capabilities: what this
// server's API offers, so that a client (the console) shows only what
// works. It needs the token like every route, so a client also learns
// from it whether its token is good.
type Capabilities struct {
	// Compact: POST /admin/v1/sessions/{id}/compact exists.
	Compact bool `json:"compact"`
	// Overview: this process counts its recent requests (GET
	// /admin/v1/overview has its windows).
	Overview bool `json:"overview"`
	// TokenRequired: the API asks for a bearer token.
	TokenRequired bool `json:"token_required"`
}

// capabilities serves GET /admin/v1/capabilities.
func (a *API) capabilities(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, Capabilities{Compact: a.compact, Overview: a.opt.Recent != nil, TokenRequired: a.opt.Token != ""})
}

// hasRoute reports whether mux has a route of its own for method and path,
// not the catch-all of Prefix that answers unknown_url.
func hasRoute(mux *http.ServeMux, method, path string) bool {
	_, pattern := mux.Handler(httptest.NewRequest(method, path, nil))
	return pattern != "" && pattern != Prefix
}

// Overview is the answer of GET /admin/v1/overview.
type Overview struct {
	// Instance is what this process counted since it started: other
	// instances count their own.
	Instance InstanceUsage `json:"instance"`
	// Sessions counts the sessions (of every instance, from the store)
	// active within each window.
	Sessions SessionCounts `json:"sessions"`
	// TopSessions are the sessions active within the last day that cost
	// the most, with their all-time totals.
	TopSessions []Session `json:"top_sessions"`
}

// InstanceUsage is this process's tally of its recent requests.
type InstanceUsage struct {
	StartedAt *string     `json:"started_at"`
	Hour      UsageWindow `json:"hour"`
	Day       UsageWindow `json:"day"`
}

// UsageWindow is the requests of a window, by agent and model, and their
// sum.
type UsageWindow struct {
	Rows  []UsageRow `json:"rows"`
	Total UsageRow   `json:"total"`
}

// UsageRow is the requests of one agent and model (empty in a total).
type UsageRow struct {
	Agent            string  `json:"agent,omitempty"`
	Model            string  `json:"model,omitempty"`
	Requests         int64   `json:"requests"`
	Errors           int64   `json:"errors"`
	PromptTokens     int64   `json:"prompt_tokens"`
	CompletionTokens int64   `json:"completion_tokens"`
	CachedTokens     int64   `json:"cached_tokens"`
	HistoryTokens    int64   `json:"history_tokens"`
	CostUSD          float64 `json:"cost_usd"`
}

// SessionCounts count sessions by last activity.
type SessionCounts struct {
	ActiveLastHour int64 `json:"active_last_hour"`
	ActiveLastDay  int64 `json:"active_last_day"`
	All            int64 `json:"all"`
}

// topSessions is how many sessions the overview lists by cost.
const topSessions = 10

// overview serves GET /admin/v1/overview.
func (a *API) overview(w http.ResponseWriter, r *http.Request) {
	now := a.now()
	out := Overview{TopSessions: []Session{}, Instance: InstanceUsage{StartedAt: Time(a.opt.Started.UnixMilli())}}
	if a.opt.Started.IsZero() {
		out.Instance.StartedAt = nil
	}
	out.Instance.Hour = a.usageWindow(now, time.Hour)
	out.Instance.Day = a.usageWindow(now, 24*time.Hour)

	ctx, cancel := a.ctx(r, 4)
	defer cancel()
	dayAgo := now.Add(-24 * time.Hour).UnixMilli()
	for _, c := range []struct {
		dst   *int64
		since int64
	}{{&out.Sessions.All, 0}, {&out.Sessions.ActiveLastDay, dayAgo}, {&out.Sessions.ActiveLastHour, now.Add(-time.Hour).UnixMilli()}} {
		// With no filter but the time, the total is one count of the index.
		page, err := a.opt.Store.Sessions(ctx, history.SessionQuery{SinceMs: c.since, Limit: 1})
		if err != nil {
			a.storeFailed(w, "count sessions", err)
			return
		}
		*c.dst = page.Total
	}
	page, err := a.opt.Store.Sessions(ctx, history.SessionQuery{SinceMs: dayAgo, ByCost: true, Limit: topSessions})
	if err != nil {
		a.storeFailed(w, "list sessions", err)
		return
	}
	for _, s := range page.Sessions {
		out.TopSessions = append(out.TopSessions, SessionView(s, a.active(s, now.UnixMilli())))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) usageWindow(now time.Time, d time.Duration) UsageWindow {
	out := UsageWindow{Rows: []UsageRow{}}
	if a.opt.Recent == nil {
		return out
	}
	var nanos int64 // summed whole, so the total does not drift
	for _, r := range a.opt.Recent.Window(now, d) {
		nanos += r.CostNanos
		row := usageRow(r)
		out.Rows = append(out.Rows, row)
		t := &out.Total
		t.Requests += row.Requests
		t.Errors += row.Errors
		t.PromptTokens += row.PromptTokens
		t.CompletionTokens += row.CompletionTokens
		t.CachedTokens += row.CachedTokens
		t.HistoryTokens += row.HistoryTokens
	}
	out.Total.CostUSD = float64(nanos) / 1e9
	return out
}

func usageRow(r metrics.RecentRow) UsageRow {
	return UsageRow{Agent: r.Agent, Model: r.Model, Requests: r.Requests, Errors: r.Errors,
		PromptTokens: r.PromptTokens, CompletionTokens: r.CompletionTokens, CachedTokens: r.CachedTokens,
		HistoryTokens: r.HistoryTokens, CostUSD: float64(r.CostNanos) / 1e9}
}

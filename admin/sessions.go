package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/wire"
)

// Page sizes of the session list.
const (
	defaultLimit = 50
	maxLimit     = 500
)

// maxTitleLen is the longest title, in characters.
const maxTitleLen = 200

// SessionList is the answer of GET /admin/v1/sessions.
type SessionList struct {
	Items []Session `json:"items"`
	// NextCursor continues the list; null on the last page.
	NextCursor *string `json:"next_cursor"`
	// Total counts every session matching the filters.
	Total int64 `json:"total"`
}

// SessionDetail is the answer of GET /admin/v1/sessions/{id}.
type SessionDetail struct {
	Session
	Conversations []Conversation `json:"conversations"`
}

// listSessions serves GET /admin/v1/sessions.
func (a *API) listSessions(w http.ResponseWriter, r *http.Request) {
	q, werr := a.sessionQuery(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	scale := time.Duration(1)
	if q.Match != nil || q.ByCost {
		scale = 4
	}
	ctx, cancel := a.ctx(r, scale)
	defer cancel()
	page, err := a.opt.Store.Sessions(ctx, q)
	if errors.Is(err, history.ErrBadCursor) {
		writeError(w, wire.BadRequest("invalid_value", "cursor", "cursor is not one a previous page gave"))
		return
	}
	if err != nil {
		a.storeFailed(w, "list sessions", err)
		return
	}
	nowMs := a.now().UnixMilli()
	out := SessionList{Items: []Session{}, Total: page.Total, NextCursor: str(page.NextCursor)}
	for _, s := range page.Sessions {
		out.Items = append(out.Items, SessionView(s, a.active(s, nowMs)))
	}
	writeJSON(w, http.StatusOK, out)
}

// active is Active under the session's agent's policy.
func (a *API) active(s history.Session, nowMs int64) bool {
	_, _, agent, _ := history.SplitID(s.ID)
	return Active(s, a.opt.Policy(agent), nowMs)
}

// Filter selects sessions, as the list's query parameters do.
type Filter struct {
	Channel, User, Agent string // exact parts; User may be "*" (shared agents)
	// Active, when not nil, keeps the sessions whose latest conversation
	// goes on at the next request (true) or does not (false).
	Active *bool
	// SinceMs and UntilMs bound the last activity (0: no bound).
	SinceMs, UntilMs int64
	// Q matches the title or the session id, case-insensitively.
	Q string
	// Label is the "session" label of a metric series.
	Label string
}

// Check reports a filter value that cannot match, as an API error naming
// the parameter.
func (f Filter) Check() *wire.Error {
	for _, p := range []struct{ name, value string }{{"channel", f.Channel}, {"agent", f.Agent}, {"user", f.User}} {
		if p.value == "" || (p.name == "user" && p.value == history.SharedUser) {
			continue
		}
		if err := history.CheckPart(p.value); err != nil {
			return wire.BadRequest("invalid_value", p.name, p.name+": "+err.Error())
		}
	}
	return nil
}

// Query is the store query of f at nowMs: policy gives an agent's idle
// timeout (for Active) and label a session's metric label (for Label).
func (f Filter) Query(policy func(agent string) history.Policy, label func(id string) (string, bool), nowMs int64) (history.SessionQuery, *wire.Error) {
	q := history.SessionQuery{Channel: f.Channel, User: f.User, Agent: f.Agent, SinceMs: f.SinceMs, UntilMs: f.UntilMs}
	if f.Label != "" {
		// A label names its channel and agent in every mode but a bare
		// hash: only the sessions of those are hashed to find it.
		if ch, _, ag, ok := history.SplitID(f.Label); ok {
			for _, p := range []struct {
				name      string
				dst       *string
				fromLabel string
			}{{"channel", &q.Channel, ch}, {"agent", &q.Agent, ag}} {
				if *p.dst != "" && *p.dst != p.fromLabel {
					return q, wire.BadRequest("invalid_value", p.name, fmt.Sprintf("%s %q contradicts the label's %q", p.name, *p.dst, p.fromLabel))
				}
				*p.dst = p.fromLabel
			}
		}
		want := f.Label
		q.MatchID = func(id string) bool {
			l, ok := label(id)
			return ok && l == want
		}
	}
	var matches []func(history.Session) bool
	if f.Active != nil {
		want := *f.Active
		matches = append(matches, func(s history.Session) bool {
			_, _, agent, _ := history.SplitID(s.ID)
			return Active(s, policy(agent), nowMs) == want
		})
	}
	if text := strings.ToLower(strings.TrimSpace(f.Q)); text != "" {
		matches = append(matches, func(s history.Session) bool {
			return strings.Contains(strings.ToLower(s.ID), text) || strings.Contains(strings.ToLower(s.Title), text)
		})
	}
	if len(matches) > 0 {
		q.Match = func(s history.Session) bool {
			for _, m := range matches {
				if !m(s) {
					return false
				}
			}
			return true
		}
	}
	return q, nil
}

// sessionQuery reads the list's parameters.
func (a *API) sessionQuery(r *http.Request) (history.SessionQuery, *wire.Error) {
	v := r.URL.Query()
	f := Filter{Channel: v.Get("channel"), User: v.Get("user"), Agent: v.Get("agent"), Q: v.Get("q"), Label: v.Get("label")}
	if werr := f.Check(); werr != nil {
		return history.SessionQuery{}, werr
	}
	for _, t := range []struct {
		name string
		dst  *int64
	}{{"since", &f.SinceMs}, {"until", &f.UntilMs}} {
		s := v.Get(t.name)
		if s == "" {
			continue
		}
		ts, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return history.SessionQuery{}, wire.BadRequest("invalid_value", t.name, fmt.Sprintf("%s must be an RFC 3339 time like 2026-11-30T09:00:00Z, got %q", t.name, s))
		}
		*t.dst = ts.UnixMilli()
	}
	switch s := v.Get("active"); s {
	case "":
	case "true", "false":
		active := s == "true"
		f.Active = &active
	default:
		return history.SessionQuery{}, wire.BadRequest("invalid_value", "active", fmt.Sprintf("active must be true or false, got %q", s))
	}
	q, werr := f.Query(a.opt.Policy, a.opt.Label, a.now().UnixMilli())
	if werr != nil {
		return q, werr
	}
	switch o := v.Get("sort"); o {
	case "", "last_active":
	case "cost":
		q.ByCost = true
	default:
		return q, wire.BadRequest("invalid_value", "sort", fmt.Sprintf("sort must be last_active or cost, got %q", o))
	}
	q.Cursor = v.Get("cursor")
	q.Limit = defaultLimit
	if s := v.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxLimit {
			return q, wire.BadRequest("invalid_value", "limit", fmt.Sprintf("limit must be a whole number from 1 to %d, got %q", maxLimit, s))
		}
		q.Limit = n
	}
	return q, nil
}

// getSession serves GET /admin/v1/sessions/{id}.
func (a *API) getSession(w http.ResponseWriter, r *http.Request) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	ctx, cancel := a.ctx(r, 1)
	defer cancel()
	s, ok, err := a.opt.Store.Session(ctx, id)
	if err != nil {
		a.storeFailed(w, "read session", err)
		return
	}
	if !ok {
		writeError(w, notFound("session_not_found", "no session "+strconv.Quote(id)))
		return
	}
	convs, err := a.opt.Store.Conversations(ctx, id)
	if err != nil {
		a.storeFailed(w, "list conversations", err)
		return
	}
	active := a.active(s, a.now().UnixMilli())
	out := SessionDetail{Session: SessionView(s, active), Conversations: []Conversation{}}
	for _, c := range convs {
		out.Conversations = append(out.Conversations, ConversationView(c, active && c.ID == s.ConversationID))
	}
	writeJSON(w, http.StatusOK, out)
}

// reset serves POST /admin/v1/sessions/{id}/reset.
func (a *API) reset(w http.ResponseWriter, r *http.Request) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	ctx, cancel := a.ctx(r, 1)
	defer cancel()
	if _, ok, err := a.opt.Store.Session(ctx, id); err != nil || !ok {
		if err != nil {
			a.storeFailed(w, "read session", err)
		} else {
			writeError(w, notFound("session_not_found", "no session "+strconv.Quote(id)))
		}
		return
	}
	ended, err := a.opt.Store.Reset(ctx, id)
	if err != nil {
		a.storeFailed(w, "reset session", err)
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Session string  `json:"session"`
		Ended   *string `json:"ended_conversation"`
	}{id, str(ended)})
}

// Erased is the answer of DELETE /admin/v1/sessions/{id}.
type Erased struct {
	Session       string `json:"session"`
	Conversations int64  `json:"conversations"`
	Messages      int64  `json:"messages"`
	// MetricSeries: this instance exported per-session series for the
	// session, and has deleted them.
	MetricSeries bool `json:"metric_series"`
}

// eraseSession serves DELETE /admin/v1/sessions/{id}.
func (a *API) eraseSession(w http.ResponseWriter, r *http.Request) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	ctx, cancel := a.ctx(r, 1)
	defer cancel()
	out, found, err := a.erase(ctx, id)
	if err != nil {
		a.storeFailed(w, "erase session", err)
		return
	}
	if !found {
		writeError(w, notFound("session_not_found", "no session "+strconv.Quote(id)))
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) erase(ctx context.Context, id string) (Erased, bool, error) {
	e, err := a.opt.Store.Erase(ctx, id)
	if err != nil {
		return Erased{}, false, err
	}
	out := Erased{Session: id, Conversations: e.Conversations, Messages: e.Messages}
	if a.opt.Metrics != nil {
		out.MetricSeries = a.opt.Metrics.ForgetSession(id)
	}
	a.log.Info("admin: session erased", "session", id, "conversations", e.Conversations, "messages", e.Messages)
	return out, e.Found || out.MetricSeries, nil
}

// UserErased is the answer of DELETE /admin/v1/users/{user}.
type UserErased struct {
	User     string   `json:"user"`
	Sessions int      `json:"sessions"`
	Erased   []Erased `json:"erased"`
}

// eraseUser serves DELETE /admin/v1/users/{user}: every session of the
// user, whatever its channel and agent.
func (a *API) eraseUser(w http.ResponseWriter, r *http.Request) {
	user := r.PathValue("user")
	if err := history.CheckPart(user); err != nil {
		writeError(w, wire.BadRequest("invalid_value", "user", "user: "+err.Error()))
		return
	}
	ctx, cancel := a.ctx(r, 4)
	defer cancel()
	out := UserErased{User: user, Erased: []Erased{}}
	q := history.SessionQuery{User: user, Limit: maxLimit}
	for {
		// A cursor is a position in the order, not an offset, so erasing
		// what a page listed does not move the next page.
		page, err := a.opt.Store.Sessions(ctx, q)
		if err != nil {
			a.storeFailed(w, "list sessions", err)
			return
		}
		for _, s := range page.Sessions {
			e, _, err := a.erase(ctx, s.ID)
			if err != nil {
				a.storeFailed(w, "erase session", err)
				return
			}
			out.Erased = append(out.Erased, e)
		}
		if page.NextCursor == "" {
			break
		}
		q.Cursor = page.NextCursor
	}
	out.Sessions = len(out.Erased)
	if out.Sessions == 0 {
		writeError(w, notFound("user_not_found", "no session of user "+strconv.Quote(user)))
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// setTitle serves PUT /admin/v1/sessions/{id}/title.
func (a *API) setTitle(w http.ResponseWriter, r *http.Request) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	var body struct {
		Title        *string `json:"title"`
		Conversation string  `json:"conversation"`
	}
	if werr := decodeBody(r, &body); werr != nil {
		writeError(w, werr)
		return
	}
	if body.Title == nil {
		writeError(w, wire.BadRequest("missing_required_parameter", "title", `title is required ("" clears it, so the derived title shows)`))
		return
	}
	title := strings.TrimSpace(*body.Title)
	if n := utf8.RuneCountInString(title); n > maxTitleLen {
		writeError(w, wire.BadRequest("invalid_value", "title", fmt.Sprintf("title is %d characters long; at most %d", n, maxTitleLen)))
		return
	}
	if strings.IndexFunc(title, unicode.IsControl) >= 0 {
		writeError(w, wire.BadRequest("invalid_value", "title", "title may not hold control characters (line breaks included)"))
		return
	}
	ctx, cancel := a.ctx(r, 1)
	defer cancel()
	conv, err := a.opt.Store.SetTitle(ctx, id, body.Conversation, title)
	if err != nil {
		a.storeFailed(w, "set title", err)
		return
	}
	if conv == "" {
		if _, found, err := a.opt.Store.Session(ctx, id); err != nil {
			a.storeFailed(w, "read session", err)
			return
		} else if !found {
			writeError(w, notFound("session_not_found", "no session "+strconv.Quote(id)))
			return
		}
		what := "session " + strconv.Quote(id) + " has no conversation"
		if body.Conversation != "" {
			what = "session " + strconv.Quote(id) + " has no conversation " + strconv.Quote(body.Conversation)
		}
		writeError(w, notFound("conversation_not_found", what))
		return
	}
	convs, err := a.opt.Store.Conversations(ctx, id)
	if err != nil {
		a.storeFailed(w, "list conversations", err)
		return
	}
	out := struct {
		Session      string  `json:"session"`
		Conversation string  `json:"conversation"`
		Title        *string `json:"title"`
		TitleSet     bool    `json:"title_set"`
	}{Session: id, Conversation: conv}
	for _, c := range convs {
		if c.ID == conv {
			out.Title, out.TitleSet = str(c.Title), c.TitleSet
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// maxBodyBytes bounds a request body of the API, as the proxy bounds chat
// requests.
const maxBodyBytes = 20 << 20

// decodeBody reads a JSON object body into dst, which must use exact
// keys only for what it reads.
func decodeBody(r *http.Request, dst any) *wire.Error {
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return &wire.Error{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error", Code: "request_too_large",
				Message: fmt.Sprintf("request body is larger than %d bytes", mbe.Limit)}
		}
		return wire.BadRequest("invalid_request_body", "", "could not read the request body: "+err.Error())
	}
	if !utf8.Valid(body) {
		return wire.BadRequest("invalid_request_body", "", "request body is not valid UTF-8")
	}
	if err := json.Unmarshal(body, dst); err != nil {
		return wire.BadRequest("invalid_json", "", "request body is not the JSON object this route takes: "+wire.TypeMismatch(err))
	}
	return nil
}

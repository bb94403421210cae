// Package admin is the conversations API: JSON handlers over the history
// store to list, search, read, title, reset, erase and import
// conversations, served on the admin listener under /admin/v1, never on
// the client-facing port.
//
// It knows the store and the token counter, never the proxy: what both
// need lives behind the store's interface in package history.
package admin

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/metrics"
	"github.com/historyproxy/historyproxy/tokens"
	"github.com/historyproxy/historyproxy/wire"
)

// Prefix is where the API's routes live.
const Prefix = "/admin/v1/"

// Store is what the API needs of a history store; both history stores
// are one.
type Store interface {
	Session(ctx context.Context, session string) (history.Session, bool, error)
	Sessions(ctx context.Context, q history.SessionQuery) (history.SessionPage, error)
	Conversations(ctx context.Context, session string) ([]history.Conversation, error)
	ReadMessages(ctx context.Context, session string, q history.MessageQuery) (string, []history.Message, error)
	Append(ctx context.Context, session string, t history.Turn, p history.Policy) (history.AppendResult, error)
	SetTitle(ctx context.Context, session, conversationID, title string) (string, error)
	Reset(ctx context.Context, session string) (string, error)
	Erase(ctx context.Context, session string) (history.Erased, error)
	// Watch follows a session live, from a snapshot or from an event id.
	Watch(ctx context.Context, session, from string) (*history.Watch, error)
}

// RecentSource sums the requests this process proxied over the last d;
// *metrics.Recent is one.
type RecentSource interface {
	Window(now time.Time, d time.Duration) []metrics.RecentRow
}

// SeriesForgetter drops a session's per-session metric series;
// *metrics.Metrics is one.
type SeriesForgetter interface {
	ForgetSession(session string) bool
}

// Options configure the API. Store and Counter are required.
type Options struct {
	Store   Store
	Counter *tokens.Counter
	// Policy gives an agent's conversation lifetime: its idle timeout
	// decides whether a session is active, and imports are appended under
	// it as a turn would be. Nil: no idle timeout, no retention.
	Policy func(agent string) history.Policy
	// Token, when not empty, is required as "Authorization: Bearer
	// <token>" on every route.
	Token string
	// Metrics, when not nil, forgets an erased session's series.
	Metrics SeriesForgetter
	// Label gives the "session" label of a session's metric series
	// (metrics.SessionLabel.Label), so that ?label= finds the session of a
	// hashed label. Nil: the label is the session id.
	Label func(id string) (string, bool)
	// StoreTimeout bounds each store call; 0: 10s. Listing with q or
	// active reads many sessions and gets four times as long.
	StoreTimeout time.Duration
	// Recent, when not nil, is this process's tally of the last day's
	// requests, tokens and cost by agent and model (metrics.Recent), shown
	// by the overview route.
	Recent RecentSource
	// Started is when this process started, shown by the overview route.
	Started time.Time
	// Heartbeat is how often an idle watch stream sends a comment; 0:
	// 15s.
	Heartbeat time.Duration
	// Compactor runs compactions and title generations on demand; nil:
	// those routes answer 404.
	Compactor Compactor
	Logger    *slog.Logger
	Now       func() time.Time
}

// API serves the conversations API.
type API struct {
	opt Options
	log *slog.Logger
	now func() time.Time
	// tokenSum is the SHA-256 of the token: comparing fixed-length digests
	// in constant time leaks neither the token nor its length.
	tokenSum [sha256.Size]byte
	// compact: the API has a compaction route (see capabilities).
	compact bool
	// closing ends the open watches (Close).
	closing   context.Context
	closeOnce context.CancelFunc
}

// New builds the API.
func New(opt Options) *API {
	a := &API{opt: opt, log: opt.Logger, now: opt.Now}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if a.now == nil {
		a.now = time.Now
	}
	if a.opt.Policy == nil {
		a.opt.Policy = func(string) history.Policy { return history.Policy{} }
	}
	if a.opt.Label == nil {
		a.opt.Label = func(id string) (string, bool) { return id, true }
	}
	if a.opt.StoreTimeout <= 0 {
		a.opt.StoreTimeout = 10 * time.Second
	}
	if a.opt.Heartbeat <= 0 {
		a.opt.Heartbeat = defaultHeartbeat
	}
	a.closing, a.closeOnce = context.WithCancel(context.Background())
	a.tokenSum = sha256.Sum256([]byte(opt.Token))
	return a
}

// Handler serves every route under Prefix, behind the token when one is
// set.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /admin/v1/sessions", a.listSessions)
	mux.HandleFunc("GET /admin/v1/sessions/{id}", a.getSession)
	mux.HandleFunc("DELETE /admin/v1/sessions/{id}", a.eraseSession)
	mux.HandleFunc("GET /admin/v1/sessions/{id}/messages", a.listMessages)
	mux.HandleFunc("POST /admin/v1/sessions/{id}/messages", a.importMessages)
	mux.HandleFunc("GET /admin/v1/sessions/{id}/timeline", a.timeline)
	mux.HandleFunc("GET /admin/v1/sessions/{id}/watch", a.watch)
	mux.HandleFunc("PUT /admin/v1/sessions/{id}/title", a.setTitle)
	mux.HandleFunc("POST /admin/v1/sessions/{id}/reset", a.reset)
	if a.opt.Compactor != nil {
		mux.HandleFunc("POST /admin/v1/sessions/{id}/compact", a.compactNow)
		mux.HandleFunc("POST /admin/v1/sessions/{id}/title:generate", a.generateTitle)
	}
	mux.HandleFunc("DELETE /admin/v1/users/{user}", a.eraseUser)
	mux.HandleFunc("GET /admin/v1/capabilities", a.capabilities)
	mux.HandleFunc("GET /admin/v1/overview", a.overview)
	mux.HandleFunc(Prefix, func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &wire.Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "unknown_url",
			Message: r.Method + " " + r.URL.Path + " is not a route of the conversations API (see the README's Conversations API section)"})
	})
	a.compact = hasRoute(mux, http.MethodPost, Prefix+"sessions/c:u:a/compact")
	// A browser on the operator's machine reaches a loopback listener too:
	// a page must not change data by a cross-site request (CSRF), which
	// a token would stop but a tokenless API would not.
	csrf := http.NewCrossOriginProtection()
	csrf.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &wire.Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "cross_origin_request",
			Message: "the admin API does not take requests that change data from a web page of another origin"})
	}))
	return csrf.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a.opt.Token == "" && !loopbackHost(r.Host) {
			// Without a token the API is served only on loopback; a Host
			// of another name is a page whose name was made to resolve to
			// 127.0.0.1 (DNS rebinding), which could read every answer.
			writeError(w, &wire.Error{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "invalid_host",
				Message: "without an admin token the admin API answers only requests for localhost or a loopback address; set admin.token_env to reach it by another name"})
			return
		}
		if !a.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="historyproxy admin"`)
			writeError(w, &wire.Error{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_admin_token",
				Message: "the admin API needs Authorization: Bearer <token>, with the token from the variable admin.token_env names"})
			return
		}
		mux.ServeHTTP(w, r)
	}))
}

// loopbackHost reports whether a request's Host names this machine:
// localhost or a loopback address, with any port. An empty Host (an
// HTTP/1.0 client, never a browser) passes.
func loopbackHost(host string) bool {
	if host == "" {
		return true
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// authorized checks the bearer token in constant time.
func (a *API) authorized(r *http.Request) bool {
	if a.opt.Token == "" {
		return true
	}
	// The scheme is case-insensitive (RFC 9110, 11.1).
	scheme, got, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	sum := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(sum[:], a.tokenSum[:]) == 1
}

// sessionID reads and checks the session id of a route's path.
func sessionID(r *http.Request) (string, *wire.Error) {
	id := r.PathValue("id")
	if _, _, _, err := history.ParseID(id); err != nil {
		return "", wire.BadRequest("invalid_session_id", "id", err.Error())
	}
	return id, nil
}

func notFound(code, msg string) *wire.Error {
	return &wire.Error{Status: http.StatusNotFound, Type: "invalid_request_error", Code: code, Message: msg}
}

// storeFailed answers 503 for a store error. The cause goes to the log,
// not the answer: it may name the store's addresses.
func (a *API) storeFailed(w http.ResponseWriter, op string, err error) {
	a.log.Error("admin: store failed", "op", op, "err", err)
	writeError(w, &wire.Error{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "history_unavailable",
		Message: "the conversation history store failed to " + op + "; the proxy's log says why"})
}

func (a *API) ctx(r *http.Request, scale time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), a.opt.StoreTimeout*scale)
}

func writeError(w http.ResponseWriter, e *wire.Error) { wire.WriteError(w, e) }

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		writeError(w, &wire.Error{Status: http.StatusInternalServerError, Type: "server_error", Code: "encode_failed", Message: err.Error()})
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

package admin

import (
	"context"
	"errors"
	"net/http"
	"strconv"

	"github.com/historyproxy/historyproxy/compaction"
	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/upstream"
	"github.com/historyproxy/historyproxy/wire"
)

// Compactor runs a compaction or a title generation now;
// *compaction.Worker is one.
type Compactor interface {
	Compact(ctx context.Context, session, conv, auth string) (compaction.Result, error)
	GenerateTitle(ctx context.Context, session, conv, auth string) (conv2, title string, err error)
}

// headerUpstreamAuth carries the upstream key for an on-demand call when
// the proxy holds none: the admin route's own Authorization is the admin
// token.
const headerUpstreamAuth = "X-Upstream-Authorization"

// compactBody is what both routes take, all optional.
type compactBody struct {
	Conversation string `json:"conversation"`
}

func (a *API) onDemand(w http.ResponseWriter, r *http.Request) (id string, body compactBody, ok bool) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return "", body, false
	}
	if r.ContentLength != 0 {
		if werr := decodeBody(r, &body); werr != nil {
			writeError(w, werr)
			return "", body, false
		}
	}
	if c := r.URL.Query().Get("conversation"); c != "" {
		body.Conversation = c
	}
	ctx, cancel := a.ctx(r, 1)
	defer cancel()
	if _, found, err := a.opt.Store.Session(ctx, id); err != nil {
		a.storeFailed(w, "read the session", err)
		return "", body, false
	} else if !found {
		writeError(w, notFound("session_not_found", "no session "+strconv.Quote(id)))
		return "", body, false
	}
	return id, body, true
}

// compactNow serves POST /admin/v1/sessions/{id}/compact: one compaction now,
// even below the trigger, answered with the summary.
func (a *API) compactNow(w http.ResponseWriter, r *http.Request) {
	id, body, ok := a.onDemand(w, r)
	if !ok {
		return
	}
	res, err := a.opt.Compactor.Compact(r.Context(), id, body.Conversation, r.Header.Get(headerUpstreamAuth))
	if err != nil {
		a.backgroundFailed(w, id, body.Conversation, err)
		return
	}
	out := struct {
		Session      string `json:"session"`
		Conversation string `json:"conversation"`
		Compacted    bool   `json:"compacted"`
		Folded       int    `json:"folded"`
		Reason       string `json:"reason,omitempty"`
		Summary      *Entry `json:"summary"`
	}{Session: id, Conversation: res.Conversation, Compacted: res.Compacted, Folded: res.Folded, Reason: res.Reason}
	if res.Summary != nil {
		e := EntryView(*res.Summary)
		out.Summary = &e
	}
	writeJSON(w, http.StatusOK, out)
}

// generateTitle serves POST /admin/v1/sessions/{id}/title:generate.
func (a *API) generateTitle(w http.ResponseWriter, r *http.Request) {
	id, body, ok := a.onDemand(w, r)
	if !ok {
		return
	}
	conv, title, err := a.opt.Compactor.GenerateTitle(r.Context(), id, body.Conversation, r.Header.Get(headerUpstreamAuth))
	if err != nil {
		a.backgroundFailed(w, id, body.Conversation, err)
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Session      string `json:"session"`
		Conversation string `json:"conversation"`
		Title        string `json:"title"`
		TitleSet     bool   `json:"title_set"`
	}{id, conv, title, true})
}

// backgroundFailed answers an on-demand call that failed; nothing was
// stored.
func (a *API) backgroundFailed(w http.ResponseWriter, id, conv string, err error) {
	var se *upstream.StatusError
	switch {
	case errors.Is(err, compaction.ErrNotFound):
		what := "session " + strconv.Quote(id) + " has no conversation"
		if conv != "" {
			what += " " + strconv.Quote(conv)
		}
		writeError(w, notFound("conversation_not_found", what))
	case errors.Is(err, history.ErrCompacting):
		w.Header().Set("Retry-After", "5")
		writeError(w, &wire.Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "compaction_running",
			Message: "a compaction of this session is running (on this instance or another); retry when it is done"})
	case errors.Is(err, upstream.ErrNoKey):
		writeError(w, wire.BadRequest("upstream_key_missing", headerUpstreamAuth,
			"the proxy holds no upstream key (upstream.api_key_env): send the key to use in "+headerUpstreamAuth+": Bearer <key>"))
	case errors.As(err, &se):
		writeError(w, &wire.Error{Status: http.StatusBadGateway, Type: "upstream_error", Code: "upstream_error",
			Message: "the upstream refused the call (" + strconv.Itoa(se.Status) + "): " + se.Message + "; nothing was stored"})
	case errors.Is(err, history.ErrCompactionLost):
		writeError(w, &wire.Error{Status: http.StatusConflict, Type: "invalid_request_error", Code: "compaction_superseded",
			Message: "the conversation changed while it was summarized (another summary, or an erase); nothing was stored"})
	default:
		a.log.Warn("admin: on-demand background call failed", "session", id, "err", err)
		writeError(w, &wire.Error{Status: http.StatusBadGateway, Type: "upstream_error", Code: "upstream_unreachable",
			Message: "the call to the upstream or the store failed; nothing was stored; the proxy's log says why"})
	}
}

package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/wire"
)

// Watch streams, as server-sent events, of GET /admin/v1/sessions/{id}/watch.
const (
	// defaultHeartbeat is how often an idle watch sends a comment, so that
	// load balancers (60 s idle timeouts are common) keep it open.
	defaultHeartbeat = 15 * time.Second
	// watchWriteTimeout bounds one write to a watcher that stopped reading.
	watchWriteTimeout = 30 * time.Second
	// watchRetry is the reconnection delay the stream asks of EventSource.
	watchRetry = 2 * time.Second
)

// Snapshot is the first event of a watch that resumes nothing: the
// session's active conversation (else its latest) as the timeline route
// shows it, its newest page, and whether a reply is being generated.
type Snapshot struct {
	Session string `json:"session"`
	// Conversation is the conversation shown; null when the session has
	// none yet.
	Conversation *string `json:"conversation"`
	// Active: the conversation shown is the session's active one.
	Active bool `json:"active"`
	// Generating: a request of the session holds its turn, generating a
	// reply (deltas and a complete event follow).
	Generating bool    `json:"generating"`
	Items      []Entry `json:"items"`
	// HasMore: older messages are not in the page; the timeline route
	// with before=NextBefore reads them.
	HasMore    bool    `json:"has_more"`
	NextBefore *string `json:"next_before,omitempty"`
}

// DeltaEvent is a delta event's data: a fragment of the reply being
// generated (see history.Delta), and the generation it belongs to.
type DeltaEvent struct {
	Generation string `json:"generation"`
	history.Delta
}

// CompleteEvent is a complete event's data: the generation that ended,
// null for one whose holder died (its lease expired).
type CompleteEvent struct {
	Generation *string `json:"generation"`
}

// watch serves GET /admin/v1/sessions/{id}/watch: a server-sent event
// stream of the session as it changes. It starts with a snapshot, or,
// given the id of the last event a client got (Last-Event-ID, or the
// last_event_id query parameter for EventSource polyfills), with what the
// client missed since; an id too old to resume from gives a snapshot.
func (a *API) watch(w http.ResponseWriter, r *http.Request) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	last, param := r.Header.Get("Last-Event-ID"), "Last-Event-ID"
	if q := r.URL.Query().Get("last_event_id"); last == "" && q != "" {
		last, param = q, "last_event_id"
	}
	if last != "" {
		if _, err := history.ParseCursor(last); err != nil {
			writeError(w, wire.BadRequest("invalid_value", param,
				fmt.Sprintf("%s must be the id of an event of this watch (like 1764540000000-0_0-0), got %q", param, last)))
			return
		}
	}
	ctx, stop := a.watchContext(r.Context())
	defer stop()
	sctx, cancel := context.WithTimeout(ctx, a.opt.StoreTimeout)
	wt, err := a.opt.Store.Watch(sctx, id, last)
	cancel()
	if err != nil {
		a.storeFailed(w, "start a watch", err)
		return
	}
	defer wt.Close()
	var snap *Snapshot
	if wt.Fresh() {
		sctx, cancel := context.WithTimeout(ctx, a.opt.StoreTimeout)
		snap, err = a.snapshot(sctx, id, wt)
		cancel()
		if err != nil {
			a.storeFailed(w, "read the session", err)
			return
		}
	}

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Accel-Buffering", "no") // nginx: relay each event at once
	w.WriteHeader(http.StatusOK)
	sw := &sseWriter{w: w, rc: http.NewResponseController(w)}
	if err := sw.write(fmt.Sprintf("retry: %d\n\n", watchRetry.Milliseconds())); err != nil {
		return
	}
	if snap != nil {
		if err := sw.event("snapshot", wt.Cursor().String(), snap); err != nil {
			return
		}
	}
	for {
		ectx, cancel := context.WithTimeout(ctx, a.opt.Heartbeat)
		e, err := wt.Next(ectx)
		cancel()
		switch {
		case err == nil:
			err = sw.event(e.Kind, e.Cursor.String(), eventData(e))
		case ctx.Err() != nil:
			return
		case errors.Is(err, context.DeadlineExceeded):
			err = sw.write(": heartbeat\n\n")
		default:
			// Fell behind, or the store closed: the client reconnects with
			// the last id it got and misses nothing.
			a.log.Debug("admin: watch ended", "session", id, "err", err)
			return
		}
		if err != nil {
			return // the watcher is gone
		}
	}
}

// eventData is what a watch event carries.
func eventData(e history.LiveEvent) any {
	switch e.Kind {
	case history.EventMessage:
		return EntryView(e.Message)
	case history.EventDelta:
		return DeltaEvent{Generation: e.Generation, Delta: e.Delta}
	}
	return CompleteEvent{Generation: str(e.Generation)}
}

// snapshot reads the session as it stands at the watch's cursor: messages
// recorded after it come as events, so none is shown twice.
func (a *API) snapshot(ctx context.Context, id string, wt *history.Watch) (*Snapshot, error) {
	out := &Snapshot{Session: id, Generating: wt.Generating(), Items: []Entry{}}
	s, found, err := a.opt.Store.Session(ctx, id)
	if err != nil || !found || s.ConversationID == "" {
		return out, err
	}
	out.Conversation = &s.ConversationID
	out.Active = a.active(s, a.now().UnixMilli())
	upTo := wt.Cursor().Messages
	msgs, more, err := a.read(ctx, id, s.ConversationID, messageQuery{limit: defaultTimeline, newest: true},
		func(m history.Message) bool { return history.CompareIDs(m.ID, upTo) <= 0 })
	if err != nil {
		return nil, err
	}
	for _, m := range msgs {
		out.Items = append(out.Items, EntryView(m))
	}
	out.HasMore = more
	if more && len(msgs) > 0 {
		out.NextBefore = &msgs[0].ID
	}
	return out, nil
}

// watchContext is ctx, ended also by Close (the admin server shuts down:
// its watches end, and their clients reconnect to another instance).
func (a *API) watchContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(a.closing, cancel)
	return ctx, func() { stop(); cancel() }
}

// Close ends the open watches; the admin server's Shutdown waits for no
// long-lived stream then. Register it with http.Server.RegisterOnShutdown.
func (a *API) Close() { a.closeOnce() }

// sseWriter writes server-sent events, each flushed at once and bounded
// by watchWriteTimeout.
type sseWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (s *sseWriter) event(kind, id string, data any) error {
	b, err := json.Marshal(data)
	if err != nil {
		return err
	}
	return s.write("id: " + id + "\nevent: " + kind + "\ndata: " + string(b) + "\n\n")
}

func (s *sseWriter) write(text string) error {
	_ = s.rc.SetWriteDeadline(time.Now().Add(watchWriteTimeout))
	if _, err := s.w.Write([]byte(text)); err != nil {
		return err
	}
	return s.rc.Flush()
}

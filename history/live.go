package history

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// A watch follows a session live: every message as it is recorded (from
// the session's message stream), and while a reply is generated its
// deltas and, when no generation is active any more, a complete event
// (from the session's live stream, P:{S}:live in Redis). Each event has a
// Cursor, so a watcher that reconnects resumes where it stopped.
//
// A process reads each watched session once, however many watches it
// has on it: one hub per session does the blocking reads and hands the
// events to every watch through a bounded ring.

// ErrBadEventID is returned by Watch for an event id that is not one of
// a watch's.
var ErrBadEventID = errors.New("not a watch event id")

// ErrWatchLagged is returned by Watch.Next when the watch fell so far
// behind its session's events that the ones it missed are no longer at
// hand in this process: its client should reconnect with the id of the
// last event it got (the store still has them, or gives a snapshot).
var ErrWatchLagged = errors.New("watch fell behind")

// Event kinds of a watch.
const (
	EventMessage  = "message"
	EventDelta    = "delta"
	EventComplete = "complete"
)

// Cursor is a position in a session's two streams: the id of the last
// message and of the last live entry seen ("0-0": none).
type Cursor struct {
	Messages, Live string
}

// String is the cursor as an event id: "<message id>_<live id>".
func (c Cursor) String() string { return c.Messages + "_" + c.Live }

// ParseCursor reads an event id made by Cursor.String.
func ParseCursor(s string) (Cursor, error) {
	m, l, ok := strings.Cut(s, "_")
	if !ok || !ValidMessageID(m) || !ValidMessageID(l) {
		return Cursor{}, fmt.Errorf("%q: %w", s, ErrBadEventID)
	}
	return Cursor{Messages: m, Live: l}, nil
}

// zeroCursor is the start of both streams.
var zeroCursor = Cursor{"0-0", "0-0"}

// watchFrom checks a Watch's arguments, the same for both stores: the
// cursor to resume from, and whether there is one (from "" starts from a
// snapshot).
func watchFrom(session, from string) (c Cursor, resume bool, err error) {
	if session == "" {
		return Cursor{}, false, fmt.Errorf("watch: %w", ErrEmptySession)
	}
	if from == "" {
		return zeroCursor, false, nil
	}
	if c, err = ParseCursor(from); err != nil {
		return Cursor{}, false, fmt.Errorf("watch %s: %w", session, err)
	}
	return c, true, nil
}

// covers reports whether everything after c is after b too: b is not
// past c in either stream.
func (c Cursor) covers(b Cursor) bool {
	return compareIDs(b.Messages, c.Messages) <= 0 && compareIDs(b.Live, c.Live) <= 0
}

// LiveEvent is one event of a watch.
type LiveEvent struct {
	// Kind is EventMessage, EventDelta or EventComplete.
	Kind string
	// Cursor is the position after this event: its id.
	Cursor Cursor
	// Message is the message recorded (EventMessage).
	Message Message
	// Generation is the id of the generation a delta or a complete event
	// belongs to; "" for the end of a generation whose holder died.
	Generation string
	// Delta is the fragment (EventDelta).
	Delta Delta
}

// after reports whether e comes after c, in its own stream.
func (e *LiveEvent) after(c Cursor) bool {
	if e.Kind == EventMessage {
		return compareIDs(e.Cursor.Messages, c.Messages) > 0
	}
	return compareIDs(e.Cursor.Live, c.Live) > 0
}

// advance moves c past e, in e's own stream.
func (e *LiveEvent) advance(c Cursor) Cursor {
	if e.Kind == EventMessage {
		c.Messages = e.Cursor.Messages
	} else {
		c.Live = e.Cursor.Live
	}
	return c
}

// liveEntry is one entry of a live stream: a delta or a generation's end.
type liveEntry struct {
	id    string
	kind  string // EventDelta or EventComplete
	gen   string
	delta Delta
	last  string // the end's last message id, "" when none
}

// merge orders a batch read from both streams after c: entries of the
// live stream in order, the messages a generation's end names before its
// complete event, the rest of the messages last. It returns the events
// and the cursor after them. A batch cut short by readBatch (more) may
// end before what belongs together: a generation's end whose messages
// are not all read yet waits for the next read, as do the messages after
// the last end while the live stream has more to read.
func merge(c Cursor, msgs []Message, live []liveEntry, more bool) ([]LiveEvent, Cursor) {
	msgsFull, liveFull := more && len(msgs) == readBatch, more && len(live) == readBatch
	out := make([]LiveEvent, 0, len(msgs)+len(live))
	i := 0
	emitTo := func(last string) {
		for ; i < len(msgs) && (last == "" || compareIDs(msgs[i].ID, last) <= 0); i++ {
			c.Messages = msgs[i].ID
			out = append(out, LiveEvent{Kind: EventMessage, Cursor: c, Message: msgs[i]})
		}
	}
	for _, e := range live {
		if e.kind == EventComplete && e.last != "" {
			if msgsFull && compareIDs(msgs[len(msgs)-1].ID, e.last) < 0 {
				return out, c
			}
			emitTo(e.last)
		}
		c.Live = e.id
		out = append(out, LiveEvent{Kind: e.kind, Cursor: c, Generation: e.gen, Delta: e.delta})
	}
	if !liveFull {
		emitTo("")
	}
	return out, c
}

// liveSource is what a store does for its hubs.
type liveSource interface {
	// read returns the events after c and the cursor after them, waiting
	// up to block for the first one (0: not at all).
	read(ctx context.Context, session string, c Cursor, block time.Duration) ([]LiveEvent, Cursor, error)
	// keep says the session is still watched from this process, and
	// reports whether the message at id (the hub's cursor; "0-0": none
	// seen) is gone: the session was erased, or retention trimmed it.
	keep(ctx context.Context, session, id string) (gone bool, err error)
	// settle ends a generation whose holder is gone without saying so (its
	// lease expired): it adds its complete event, unless a generation is
	// active. It reports whether one is.
	settle(ctx context.Context, session string) (bool, error)
}

// Timing of the hubs.
const (
	watchTTL = time.Minute
	// hubRing is how many recent events a hub keeps for its watches: a
	// watch further behind than that reconnects (ErrWatchLagged).
	hubRing = 1024
)

// hubKeep is how often a hub says its session is still watched (the mark
// lives watchTTL), and looks whether what its watches show is gone. A
// variable for tests; a store reads it when it is built.
var hubKeep = 20 * time.Second

// ErrWatchGone is returned by Watch.Next when what the watch showed is
// gone from the store (the session was erased, or retention trimmed its
// conversation): its client reconnects with its last id and gets a fresh
// snapshot, rather than new messages under ones that no longer exist.
var ErrWatchGone = errors.New("watch: the session's messages are gone")

// hubBlock is the longest blocking read of a hub: how long a hub with no
// watch left may still hold its connection, and how long a generation
// whose holder died may go unended after its lease expired. A variable
// for tests.
var hubBlock = 10 * time.Second

// hubs are a store's hubs, by session.
type hubs struct {
	src   liveSource
	obs   LiveObserver
	block time.Duration // hubBlock when the store was built
	keep  time.Duration // hubKeep when the store was built

	mu   sync.Mutex
	byID map[string]*hub
	done chan struct{} // closed by close: every hub stops
}

func newHubs(src liveSource, obs LiveObserver) *hubs {
	return &hubs{src: src, obs: obs, block: hubBlock, keep: hubKeep, byID: map[string]*hub{}, done: make(chan struct{})}
}

func (hs *hubs) close() {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	select {
	case <-hs.done:
	default:
		close(hs.done)
	}
}

// watched reports whether a watch of the session is open in this process.
func (hs *hubs) watched(session string) bool {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	return hs.byID[session] != nil
}

// hub reads one session's streams for every watch of it in this process.
type hub struct {
	hs      *hubs
	session string

	mu      sync.Mutex
	events  []LiveEvent // the last hubRing events, oldest first
	first   int64       // sequence number of events[0]
	base    Cursor      // the ring holds every event after base
	pos     Cursor      // the cursor after the last event
	changed chan struct{}
	watches int
	active  bool  // a generation is believed active
	err     error // the hub stopped: why
}

// join registers a watch at c and returns the session's hub, started at
// c when it is new.
func (hs *hubs) join(session string, c Cursor, generating bool) (*hub, error) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	select {
	case <-hs.done:
		return nil, errors.New("watch: store closed")
	default:
	}
	h := hs.byID[session]
	if h == nil {
		h = &hub{hs: hs, session: session, base: c, pos: c, changed: make(chan struct{}), watches: 1, active: generating}
		hs.byID[session] = h
		go h.run() // stops when its last watch leaves, or the store closes
		return h, nil
	}
	h.mu.Lock()
	h.watches++
	h.active = h.active || generating
	h.mu.Unlock()
	return h, nil
}

// leave unregisters a watch; the hub stops after its current read when
// no watch is left.
func (hs *hubs) leave(h *hub) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	h.mu.Lock()
	h.watches--
	last := h.watches == 0
	h.mu.Unlock()
	if last && hs.byID[h.session] == h {
		delete(hs.byID, h.session)
	}
}

// run reads the session until no watch is left.
func (h *hub) run() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // ends with run
		select {
		case <-h.hs.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	kept := time.Now()
	backoff := 100 * time.Millisecond
	for {
		h.mu.Lock()
		pos, watches, active := h.pos, h.watches, h.active
		h.mu.Unlock()
		if watches == 0 || ctx.Err() != nil {
			h.stop(errors.New("watch: store closed"))
			return
		}
		evs, next, err := h.hs.src.read(ctx, h.session, pos, h.hs.block)
		if err == nil && len(evs) == 0 && active {
			// A generation is believed active, and nothing came for a
			// while: its holder may have died.
			active, err = h.hs.src.settle(ctx, h.session)
			if err == nil && !active {
				evs, next, err = h.hs.src.read(ctx, h.session, pos, 0)
			}
		}
		if err == nil && time.Since(kept) >= h.hs.keep {
			var gone bool
			gone, err = h.hs.src.keep(ctx, h.session, pos.Messages)
			kept = time.Now()
			if err == nil && gone {
				h.stopGone()
				return
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				continue
			}
			// The store failed: try again, not in a tight loop.
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		h.add(evs, next)
	}
}

// add appends events to the ring and wakes the watches.
func (h *hub) add(evs []LiveEvent, next Cursor) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.pos = next
	if len(evs) == 0 {
		return
	}
	for _, e := range evs {
		switch e.Kind {
		case EventDelta:
			h.active = true
		case EventComplete:
			h.active = false
		}
	}
	h.events = append(h.events, evs...)
	if n := len(h.events) - hubRing; n > 0 {
		h.base = h.events[n-1].Cursor
		h.first += int64(n)
		h.events = append(h.events[:0:0], h.events[n:]...)
	}
	close(h.changed)
	h.changed = make(chan struct{})
}

// stopGone stops the hub because what it showed is gone: its watches get
// ErrWatchGone, and the hub leaves hs, so that a watch started from now on
// reads the session afresh.
func (h *hub) stopGone() {
	h.hs.mu.Lock()
	if h.hs.byID[h.session] == h {
		delete(h.hs.byID, h.session)
	}
	h.hs.mu.Unlock()
	h.stop(ErrWatchGone)
}

func (h *hub) stop(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.err = err
	close(h.changed)
	h.changed = make(chan struct{})
}

// Watch is one watcher of a session (see RedisStore.Watch). It is not
// safe for concurrent use; Close ends it.
type Watch struct {
	src        liveSource
	h          *hub
	session    string
	start      Cursor
	fresh      bool
	generating bool

	cur     Cursor
	seq     int64       // the next ring event to look at; -1 before the watch found its place
	pending []LiveEvent // caught up from the store, not yet returned
	closed  bool
	obs     LiveObserver
}

// Fresh reports whether the watch starts from a snapshot: it was asked
// for none, or the id it was given is too old to resume from (the events
// after it are gone). Its client then needs the session as it stands at
// Cursor.
func (w *Watch) Fresh() bool { return w.fresh }

// Cursor is where the watch starts: the id of its snapshot, or the id it
// resumes from.
func (w *Watch) Cursor() Cursor { return w.start }

// Generating reports whether a generation was active when the watch
// started.
func (w *Watch) Generating() bool { return w.generating }

// Next returns the next event, blocking until there is one or ctx is
// done. ErrWatchLagged says the watch fell too far behind: its client
// should reconnect from the last event it got.
func (w *Watch) Next(ctx context.Context) (LiveEvent, error) {
	for {
		for len(w.pending) > 0 {
			e := w.pending[0]
			w.pending = w.pending[1:]
			if e.after(w.cur) {
				w.cur = e.advance(w.cur)
				return e, nil
			}
		}
		h := w.h
		h.mu.Lock()
		if h.err != nil {
			err, active := h.err, h.active
			h.mu.Unlock()
			if errors.Is(err, ErrWatchGone) {
				if err = w.rejoin(ctx, active); err == nil {
					continue
				}
			}
			return LiveEvent{}, err
		}
		if w.seq < 0 || w.seq < h.first {
			if !w.cur.covers(h.base) {
				// The ring does not reach back to this watch: read what
				// it missed from the store itself.
				h.mu.Unlock()
				if w.seq >= 0 {
					return LiveEvent{}, ErrWatchLagged
				}
				evs, _, err := w.src.read(ctx, w.session, w.cur, 0)
				if err != nil {
					return LiveEvent{}, fmt.Errorf("watch %s: %w", w.session, err)
				}
				if len(evs) == 0 {
					// Nothing in the store between this watch and the
					// ring's start: the ring covers it from here.
					w.seq = -2
					h.mu.Lock()
					w.seq = h.first
					h.mu.Unlock()
					continue
				}
				w.pending = evs
				continue
			}
			w.seq = h.first
		}
		for ; w.seq-h.first < int64(len(h.events)); w.seq++ {
			e := h.events[w.seq-h.first]
			if e.after(w.cur) {
				w.seq++
				w.cur = e.advance(w.cur)
				h.mu.Unlock()
				return e, nil
			}
		}
		changed := h.changed
		h.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return LiveEvent{}, ctx.Err()
		}
	}
}

// rejoin moves a watch whose hub stopped because what the hub showed is
// gone onto a hub read afresh, unless what the watch itself showed is
// gone too. A watch may have joined the hub after the erase (from a
// snapshot that has none of the erased messages), before the hub noticed:
// ending it would only make its client reconnect.
func (w *Watch) rejoin(ctx context.Context, generating bool) error {
	gone, err := w.src.keep(ctx, w.session, w.cur.Messages)
	if err != nil {
		return fmt.Errorf("watch %s: %w", w.session, err)
	}
	if gone {
		return ErrWatchGone
	}
	old := w.h
	h, err := old.hs.join(w.session, w.cur, generating)
	if err != nil {
		return err
	}
	old.hs.leave(old)
	w.h, w.seq = h, -1
	return nil
}

// Close ends the watch; its session's hub stops with its last watch.
func (w *Watch) Close() {
	if w == nil || w.closed {
		return
	}
	w.closed = true
	w.h.hs.leave(w.h)
	w.obs.WatchClosed()
}

// startWatch joins the session's hub at start.
func startWatch(hs *hubs, session string, start Cursor, fresh, generating bool) (*Watch, error) {
	h, err := hs.join(session, start, generating)
	if err != nil {
		return nil, err
	}
	hs.obs.WatchOpened()
	return &Watch{src: hs.src, h: h, session: session, start: start, fresh: fresh, generating: generating,
		cur: start, seq: -1, obs: hs.obs}, nil
}

package history

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// ErrBusy is returned by TakeTurn when the session's turn lease is held by
// another request and the caller would not wait (TurnOptions.Wait is 0),
// or waited TurnOptions.Wait in vain.
var ErrBusy = errors.New("session busy: another request is generating its turn")

// DefaultLeaseTTL is how long a turn lease lasts without being renewed:
// when its holder dies, the next request takes over this long after the
// holder's last renewal at most.
const DefaultLeaseTTL = 10 * time.Second

// beatEvery is the most time between two renewals of a held lease, also
// how soon the holder learns that a watch began (and publishes the reply
// so far). A lease is renewed at least three times per TTL.
const beatEvery = time.Second

// maxLiveReply bounds what a lease keeps of its reply to publish it to
// watchers (the text and tool calls so far). Past it the reply's deltas
// stop; the message recorded at the end carries the whole reply.
const maxLiveReply = 256 << 10

// minDeltaGap is the least time between two deltas written for one reply:
// fragments that arrive meanwhile are merged into the next one, so a fast
// stream costs the store at most a write every minDeltaGap.
const minDeltaGap = 20 * time.Millisecond

// TurnOptions say how TakeTurn takes a session's turn lease.
type TurnOptions struct {
	// Hold keeps the lease until the turn is appended with it (Turn.Lease)
	// or released: the request records a turn. Without it the request
	// waits its turn and reads, then passes the lease on at once
	// (X-History: read-only records nothing, so no one need wait for it).
	Hold bool
	// Wait bounds the wait for a busy session; past it TakeTurn returns
	// ErrBusy. Zero returns ErrBusy at once (ordering: reject).
	Wait time.Duration
	// OpTimeout bounds each store operation of the wait (a request may
	// make several while it waits); zero means 2 s.
	OpTimeout time.Duration
}

func (o TurnOptions) opTimeout() time.Duration {
	if o.OpTimeout <= 0 {
		return 2 * time.Second
	}
	return o.OpTimeout
}

// LiveObserver counts what the live side of a store does; a nil one
// counts nothing.
type LiveObserver interface {
	// GenerationStarted and GenerationEnded bracket each lease held by
	// this process.
	GenerationStarted()
	GenerationEnded()
	// DeltasPublished counts the reply fragments written for watchers,
	// DeltasDropped those given up (past maxLiveReply, or a failed write).
	DeltasPublished(n int)
	DeltasDropped(n int)
	// WatchOpened and WatchClosed bracket each watch of this process.
	WatchOpened()
	WatchClosed()
}

type noObserver struct{}

func (noObserver) WatchOpened() {}
func (noObserver) WatchClosed() {}

func (noObserver) GenerationStarted()  {}
func (noObserver) GenerationEnded()    {}
func (noObserver) DeltasPublished(int) {}
func (noObserver) DeltasDropped(int)   {}

// Delta is a fragment of a reply being generated, as watchers see it.
type Delta struct {
	Content   string          `json:"content,omitempty"`
	Refusal   string          `json:"refusal,omitempty"`
	ToolCalls []ToolCallDelta `json:"tool_calls,omitempty"`
	// Replace says the delta holds the whole reply so far, not a
	// fragment: a watcher drops what it assembled and starts from this.
	// The first delta a watcher gets of a reply it joined late is one.
	Replace bool `json:"replace,omitempty"`
}

// ToolCallDelta is a fragment of one tool call; fragments with the same
// Index belong to one call, their Name and Arguments are concatenated.
type ToolCallDelta struct {
	Index     int    `json:"index"`
	ID        string `json:"id,omitempty"`
	Type      string `json:"type,omitempty"`
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments,omitempty"`
}

// json is the delta as watchers get it.
func (d *Delta) json() string {
	b, _ := json.Marshal(d) // strings and ints only: cannot fail
	return string(b)
}

func (d *Delta) empty() bool {
	return d.Content == "" && d.Refusal == "" && len(d.ToolCalls) == 0
}

func (d *Delta) size() int {
	n := len(d.Content) + len(d.Refusal)
	for _, c := range d.ToolCalls {
		n += len(c.ID) + len(c.Type) + len(c.Name) + len(c.Arguments) + 16
	}
	return n
}

// replyAcc assembles fragments into one delta without copying what it
// already holds: a long reply costs what it holds, not its square.
type replyAcc struct {
	content, refusal strings.Builder
	calls            []*callAcc
	size             int
}

type callAcc struct {
	index      int
	id, typ    string
	name, args strings.Builder
}

// add appends d's fragments, tool calls merged by index.
func (a *replyAcc) add(d Delta) {
	a.content.WriteString(d.Content)
	a.refusal.WriteString(d.Refusal)
	a.size += d.size()
	for _, c := range d.ToolCalls {
		var t *callAcc
		for i := len(a.calls) - 1; i >= 0; i-- {
			if a.calls[i].index == c.Index {
				t = a.calls[i]
				break
			}
		}
		if t == nil {
			t = &callAcc{index: c.Index}
			a.calls = append(a.calls, t)
		}
		if c.ID != "" {
			t.id = c.ID
		}
		if c.Type != "" {
			t.typ = c.Type
		}
		t.name.WriteString(c.Name)
		t.args.WriteString(c.Arguments)
	}
}

func (a *replyAcc) empty() bool {
	return a.content.Len() == 0 && a.refusal.Len() == 0 && len(a.calls) == 0
}

// delta is what a holds, as one delta.
func (a *replyAcc) delta() Delta {
	d := Delta{Content: a.content.String(), Refusal: a.refusal.String()}
	for _, c := range a.calls {
		d.ToolCalls = append(d.ToolCalls, ToolCallDelta{Index: c.index, ID: c.id, Type: c.typ, Name: c.name.String(), Arguments: c.args.String()})
	}
	return d
}

// leaseBackend is what a store does for a lease it granted.
type leaseBackend interface {
	// beat renews the lease and, with d, adds d to the session's live
	// stream. It reports whether the lease is still held and the session's
	// watch mark ("" when no one watches; a new value when a watch began,
	// which asks for the whole reply so far).
	beat(ctx context.Context, l *Lease, d *Delta) (held bool, mark string, err error)
	// release gives the lease up (or the place in the queue of a waiter
	// that may have been granted it unawares).
	release(ctx context.Context, l *Lease) error
}

// Lease is a session's turn lease, taken by TakeTurn: while it is held no
// other request of the session reads or records history (under ordering),
// and its reply streams to the session's watchers through Publish. It ends
// when a turn is appended with it (Turn.Lease) or when Release is called;
// a lease whose holder dies expires on its own in Redis.
//
// Its methods are safe for concurrent use; a nil *Lease does nothing.
type Lease struct {
	session   string
	token     string // secret: only the holder can renew or release
	gen       string // the generation's public id, in watch events
	backend   leaseBackend
	interval  time.Duration
	opTimeout time.Duration
	ttl       time.Duration
	obs       LiveObserver
	log       *slog.Logger

	mu       sync.Mutex
	released bool
	mark     string    // the watch mark last seen; "" when not watched
	replace  bool      // the next delta is the whole reply so far
	all      *replyAcc // the reply so far, up to maxLiveReply
	over     bool      // the reply passed maxLiveReply: no more deltas
	pending  *replyAcc // fragments not written yet (only while watched)

	// The renewals and the deltas' writes run from timer, not from a
	// goroutine of their own: a lease is held for a whole reply, mostly
	// waiting, and a parked goroutine per open stream costs its stack
	// (hpbench -mode hold). The timer runs work, which writes at most one
	// thing at a time (phase) and arms the timer again for the next
	// renewal, or for the end of a gap between two writes.
	timer   *time.Timer
	phase   leasePhase
	due     time.Time // when the timer is armed for: a run before it is stale
	renewAt time.Time // when the next renewal is due
	woken   bool      // a fragment came while work was writing: look again
	// writing is closed when the run of work in flight ends (nil when
	// none), and final stops its writes of deltas: the turn's append
	// waits for the write in flight and carries what is left (flush).
	writing chan struct{}
	final   bool
}

// leasePhase is what a held lease's timer waits for.
type leasePhase uint8

const (
	phaseIdle    leasePhase = iota // the next renewal; a watched fragment starts work at once
	phaseWriting                   // work is writing: a fragment waits for it
	phaseGap                       // the gap after a write (after a failed one, until the next renewal): fragments merge into the next
)

func newToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func newLease(session string, b leaseBackend, mark string, ttl, opTimeout time.Duration, obs LiveObserver, log *slog.Logger) *Lease {
	if obs == nil {
		obs = noObserver{}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Lease{session: session, token: newToken(), gen: "g" + newToken()[:16], backend: b,
		interval: min(ttl/3, beatEvery), opTimeout: opTimeout, ttl: ttl, obs: obs, log: log, mark: mark, all: &replyAcc{}, pending: &replyAcc{}}
	if l.interval <= 0 {
		l.interval = beatEvery
	}
	return l
}

// start begins renewing the lease; call it once the lease is granted.
func (l *Lease) start() {
	l.obs.GenerationStarted()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.renewAt = time.Now().Add(l.interval)
	l.due = l.renewAt
	l.timer = time.AfterFunc(l.interval, l.work) // stopped when the lease is released
}

// armLocked has the timer run work after d. l.mu must be held.
func (l *Lease) armLocked(phase leasePhase, d time.Duration) {
	l.phase, l.due = phase, time.Now().Add(d)
	l.timer.Reset(d)
}

// Session is the session whose lease this is.
func (l *Lease) Session() string {
	if l == nil {
		return ""
	}
	return l.session
}

// Generation is the public id of the generation the lease stands for: the
// id watchers see on its deltas and on its complete event.
func (l *Lease) Generation() string {
	if l == nil {
		return ""
	}
	return l.gen
}

// Publish hands a fragment of the reply to the session's watchers. It
// never blocks: fragments are merged and written by the lease's timer, at
// most one write in flight and one every minDeltaGap, and only while
// someone watches. Past maxLiveReply they are dropped.
func (l *Lease) Publish(d Delta) {
	if l == nil || d.empty() {
		return
	}
	l.mu.Lock()
	if l.released || l.over {
		l.mu.Unlock()
		return
	}
	if l.all.size+d.size() > maxLiveReply {
		// Watchers get the whole reply with the message at the end.
		l.over = true
		l.all, l.pending = &replyAcc{}, &replyAcc{}
		l.mu.Unlock()
		l.obs.DeltasDropped(1)
		return
	}
	l.all.add(d)
	if l.mark != "" {
		if !l.replace {
			l.pending.add(d)
		}
		l.wakeLocked()
	}
	l.mu.Unlock()
}

// wakeLocked has work write what is pending: at once when the timer waits
// for a renewal; once the write in flight is done; in a gap, at its end
// (as armed). l.mu must be held.
func (l *Lease) wakeLocked() {
	switch {
	case l.timer == nil:
		// Not started yet: its first run writes what is pending.
	case l.phase == phaseIdle:
		l.armLocked(phaseIdle, 0)
	case l.phase == phaseWriting:
		l.woken = true
	}
}

// next takes what work's next write should carry: nil when nothing is
// to be written (no one watches, nothing new, or the turn's append takes
// it).
func (l *Lease) next() *Delta {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.final {
		return nil
	}
	return l.takeLocked()
}

// takeLocked takes what is not written yet. l.mu must be held.
func (l *Lease) takeLocked() *Delta {
	if l.released || l.mark == "" || l.over {
		return nil
	}
	if l.replace {
		l.replace = false
		l.pending = &replyAcc{}
		if l.all.empty() {
			return nil
		}
		d := l.all.delta()
		d.Replace = true
		return &d
	}
	if l.pending.empty() {
		return nil
	}
	d := l.pending.delta()
	l.pending = &replyAcc{}
	return &d
}

// flush takes what has not been written yet, for the append that ends
// the generation to write before its end: nil when there is nothing, or
// no one watches. It first waits (within ctx) for a write in flight: the
// append, on another connection, could overtake it, and the store then
// drops it as written after the lease's release, a fragment lost to
// watchers. A write that failed meanwhile leaves the whole reply so far
// to carry (replace). From then on the timer writes no more deltas, only
// renewals (an append that fails leaves the lease held).
func (l *Lease) flush(ctx context.Context) *Delta {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	l.final = true
	w := l.writing
	l.mu.Unlock()
	if w != nil {
		select {
		case <-w:
		case <-ctx.Done():
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.takeLocked()
}

// work renews the lease when a renewal is due and writes the deltas, from
// the lease's timer. One runs at a time (phase), and a run the timer was
// armed again after is stale (due): a Reset that crossed the timer's
// firing runs work twice. A write in flight and a Release may cross: a
// released lease is neither written nor armed again. work arms the timer
// for the end of the gap after a write, or for the next renewal; a lease
// lost is not renewed again.
func (l *Lease) work() {
	l.mu.Lock()
	now := time.Now()
	if l.released || l.phase == phaseWriting || now.Before(l.due) {
		l.mu.Unlock()
		return
	}
	l.phase, l.woken = phaseWriting, false
	beat := !now.Before(l.renewAt)
	done := make(chan struct{})
	l.writing = done
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		// The next run may have begun already, once this one re-armed
		// the timer: its channel stays for flush to wait on.
		if l.writing == done {
			l.writing = nil
		}
		l.mu.Unlock()
		close(done)
	}()
	for {
		d := l.next()
		if d == nil && !beat {
			break
		}
		beat = false
		ok, held := l.beatOnce(d)
		if !held {
			return // phaseWriting for good: nothing runs work again
		}
		if !ok {
			// A failed write (or renewal) waits for the next renewal,
			// fragments merging meanwhile as in a gap: a store that fails
			// at once would otherwise be sent the whole reply so far
			// (replace) for every fragment.
			l.mu.Lock()
			if !l.released {
				l.armLocked(phaseGap, time.Until(l.renewAt))
			}
			l.mu.Unlock()
			return
		}
		if d == nil {
			// A renewal that found a new watch loops once more to send
			// it the reply so far.
			continue
		}
		// Merge the fragments of the next minDeltaGap into one write.
		l.mu.Lock()
		if !l.released {
			l.armLocked(phaseGap, minDeltaGap)
		}
		l.mu.Unlock()
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.released:
	case l.woken:
		l.armLocked(phaseIdle, 0)
	default:
		l.armLocked(phaseIdle, time.Until(l.renewAt))
	}
}

// beatOnce renews the lease, writing d when not nil. ok is false when the
// store failed; held is false when the lease is gone.
func (l *Lease) beatOnce(d *Delta) (ok, held bool) {
	ctx, cancel := context.WithTimeout(context.Background(), l.opTimeout)
	held, mark, err := l.backend.beat(ctx, l, d)
	cancel()
	l.mu.Lock()
	// Every beat renews, or tried to: the next renewal is an interval on.
	l.renewAt = time.Now().Add(l.interval)
	released := l.released
	switch {
	case err != nil:
		if d != nil {
			l.replace = true // the next write makes up for this one
		}
	case !held:
		l.over = true
	default:
		if mark != "" && mark != l.mark {
			// A watch began (or the mark expired and came back): send
			// the whole reply so far, whatever the watcher missed.
			l.replace = true
		}
		if mark == "" {
			l.replace, l.pending = false, &replyAcc{}
		}
		l.mark = mark
	}
	l.mu.Unlock()
	switch {
	case err != nil:
		l.log.Warn("turn lease: renewal failed", "session", l.session, "err", err)
		if d != nil {
			l.obs.DeltasDropped(1)
		}
		return false, true
	case !held:
		if released {
			// A renewal that crossed the release (the append or
			// Release): the lease ended as it should.
			return true, false
		}
		// Its TTL passed (the store was unreachable that long) or the
		// session was erased: another request may be generating.
		l.log.Warn("turn lease lost before its turn was recorded: another request of the session may have started", "session", l.session)
		return true, false
	}
	if d != nil {
		l.obs.DeltasPublished(1)
	}
	return true, true
}

// ended marks the lease released (by the store, in the turn's append, or
// by Release) and stops its renewals. It reports whether it was held
// until now.
func (l *Lease) ended() bool {
	if l == nil {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.released {
		return false
	}
	l.released = true
	l.all, l.pending = &replyAcc{}, &replyAcc{}
	if l.timer != nil {
		l.timer.Stop()
	}
	l.obs.GenerationEnded()
	return true
}

// Release gives the lease up when no turn was appended with it (the
// upstream failed, nothing was recorded): the next waiting request of the
// session goes on. It is safe to call after an append released the lease,
// and more than once. The release is bounded by ctx; if it fails, the
// lease expires on its own.
func (l *Lease) Release(ctx context.Context) error {
	if l == nil || !l.ended() {
		return nil
	}
	err := l.backend.release(ctx, l)
	if err != nil {
		go releaseAnswered(l.backend, l) // ends within releaseRetryFor
	}
	return err
}

// releaseRetryFor bounds how long releaseAnswered tries.
const releaseRetryFor = time.Minute

// releaseAnswered releases l in the background after a store operation
// of it failed, and keeps trying until the store answers twice in a row.
// A store that stalled (a paused Redis) runs the commands it was sent
// meanwhile once it resumes, those whose senders gave up included, in any
// order: the script that granted this lease may run after a release sent
// later on another connection, leaving a lease no one holds for a whole
// TTL, the session's requests waiting on it. A release sent after one was
// answered comes after everything the stall held. It gives up after
// releaseRetryFor (the lease then expires on its own, a TTL after the
// store resumed at most).
func releaseAnswered(b leaseBackend, l *Lease) {
	until := time.Now().Add(releaseRetryFor)
	backoff := 50 * time.Millisecond
	for answered := 0; answered < 2; {
		ctx, cancel := context.WithTimeout(context.Background(), l.opTimeout)
		err := b.release(ctx, l)
		cancel()
		if err == nil {
			answered++
			continue
		}
		answered = 0
		if time.Now().After(until) {
			return
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, time.Second)
	}
}

// Released reports whether the lease has ended.
func (l *Lease) Released() bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.released
}

// leaseArgs are what an append passes to release the lease in its own
// script: the token and the generation; empty without a lease.
func (l *Lease) args() (token, gen string) {
	if l == nil {
		return "", ""
	}
	return l.token, l.gen
}

// validMark reports whether s may be a watch mark (digits).
func validMark(s string) bool { return s != "" && strings.Trim(s, "0123456789") == "" }

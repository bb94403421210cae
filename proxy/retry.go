package proxy

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/historyproxy/historyproxy/history"
)

// RetryObserver receives the retry queue's measurements; *metrics.Metrics
// is one.
type RetryObserver interface {
	SetRetryQueueDepth(n int)
	RetryAttempt(ok bool)
	RetryDropped()
	SetStoreUp(up bool)
}

// pendingTurn is a turn the store could not take yet.
type pendingTurn struct {
	session string
	turn    history.Turn
	policy  history.Policy
	size    int64 // turnBytes, once queued
	// recorded is what AfterTurn is told once the turn is written, less
	// what the write answers (conversation, counts).
	recorded Recorded
}

// retryQueue holds the turns the store refused while it was down
// (store.on_error: fail_open), so that a turn the client has seen answered
// is not lost, and writes them once the store is back: in order per
// session, each exactly once (every turn carries an idempotency key, so a
// write whose answer was lost is not repeated).
//
// It is bounded in turns and in bytes: past max turns, or maxBytes held
// (an outage with very large turns), new ones are dropped, counted and
// logged.
type retryQueue struct {
	store    Store
	max      int
	maxBytes int64 // 0: no bound
	timeout  time.Duration
	obs      RetryObserver
	log      *slog.Logger
	// after is told of each turn written (Options.AfterTurn); nil: no one.
	after func(Recorded)

	mu      sync.Mutex
	pending map[string][]pendingTurn // per session, oldest first
	order   []string                 // sessions with pending turns, oldest first
	n       int
	bytes   int64 // turnBytes of what is held
	wake    chan struct{}
	idle    chan struct{} // closed and replaced whenever the queue empties
	// progress is closed and replaced whenever a turn is written.
	progress chan struct{}
	// fast is set on shutdown: retry at once instead of backing off, so
	// the last attempts fit in what is left of the drain.
	fast atomic.Bool
}

// hurry makes the worker retry without backing off from now on.
func (q *retryQueue) hurry() {
	q.fast.Store(true)
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// Backoff between attempts while the store stays down.
const (
	retryMinBackoff = 50 * time.Millisecond
	retryMaxBackoff = 2 * time.Second
)

func newRetryQueue(store Store, max int, maxBytes int64, timeout time.Duration, obs RetryObserver, log *slog.Logger) *retryQueue {
	return &retryQueue{store: store, max: max, maxBytes: maxBytes, timeout: timeout, obs: obs, log: log,
		pending: map[string][]pendingTurn{}, wake: make(chan struct{}, 1), idle: make(chan struct{}),
		progress: make(chan struct{})}
}

// queued reports whether the session has turns waiting: a new turn of that
// session must wait behind them, or the order would change.
func (q *retryQueue) queued(session string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.pending[session]) > 0
}

// turnBytes estimates the memory a queued turn holds: its strings, and a
// fixed overhead per message and per turn.
func turnBytes(p pendingTurn) int64 {
	t := p.turn
	n := int64(256 + len(p.session) + len(t.IdempotencyKey) + len(t.WriteKey) + len(t.ConversationID))
	for _, m := range t.Messages {
		n += int64(160 + len(m.Role) + len(m.Content) + len(m.Parts) + len(m.Name) + len(m.ToolCalls) + len(m.ToolCallID) +
			len(m.Refusal) + len(m.Kind) + len(m.User) + len(m.Model) + len(m.RequestID) + len(m.Status))
	}
	return n
}

// push adds a turn; false when the queue is full and the turn is dropped.
func (q *retryQueue) push(p pendingTurn) bool {
	size := turnBytes(p)
	q.mu.Lock()
	if q.n >= q.max || (q.maxBytes > 0 && q.bytes+size > q.maxBytes) {
		n, b := q.n, q.bytes
		q.mu.Unlock()
		q.obs.RetryDropped()
		q.log.Error("retry queue full: turn dropped", "session", p.session, "queued", n, "queued_bytes", b, "turn_bytes", size,
			"max", q.max, "max_bytes", q.maxBytes)
		return false
	}
	p.size = size
	q.bytes += size
	if len(q.pending[p.session]) == 0 {
		q.order = append(q.order, p.session)
	}
	q.pending[p.session] = append(q.pending[p.session], p)
	q.n++
	n := q.n
	q.mu.Unlock()
	q.obs.SetRetryQueueDepth(n)
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// head returns the oldest pending turn of the session queued longest.
func (q *retryQueue) head() (pendingTurn, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.order) == 0 {
		return pendingTurn{}, false
	}
	return q.pending[q.order[0]][0], true
}

// pop removes the head after it was written.
func (q *retryQueue) pop() {
	q.mu.Lock()
	s := q.order[0]
	q.bytes -= q.pending[s][0].size
	rest := q.pending[s][1:]
	if len(rest) == 0 {
		delete(q.pending, s)
		q.order = q.order[1:]
	} else {
		q.pending[s] = rest
		// Take turns between sessions, so one long backlog does not hold
		// every other session's behind it.
		q.order = append(q.order[1:], s)
	}
	q.n--
	n := q.n
	close(q.progress)
	q.progress = make(chan struct{})
	if n == 0 {
		close(q.idle)
		q.idle = make(chan struct{})
	}
	q.mu.Unlock()
	q.obs.SetRetryQueueDepth(n)
}

// rotate moves the session at the head to the back of the order.
func (q *retryQueue) rotate() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.order) > 1 {
		q.order = append(q.order[1:], q.order[0])
	}
}

// run writes pending turns until ctx is done, backing off while the store
// fails. It stops when ctx is done.
func (q *retryQueue) run(ctx context.Context) {
	backoff := retryMinBackoff
	for {
		p, ok := q.head()
		if !ok {
			select {
			case <-ctx.Done():
				return
			case <-q.wake:
				continue
			}
		}
		if err := q.write(ctx, p); err != nil {
			q.log.Warn("retrying turn: store still failing", "session", p.session, "backoff", backoff, "err", err)
			// Let the next session try: an error that is this session's
			// alone (a key of the wrong type, say) must not hold the rest.
			q.rotate()
			select {
			case <-ctx.Done():
				return
			case <-q.wake: // hurry
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, retryMaxBackoff)
			if q.fast.Load() {
				backoff = retryMinBackoff
			}
			continue
		}
		backoff = retryMinBackoff
		q.pop()
	}
}

func (q *retryQueue) write(ctx context.Context, p pendingTurn) error {
	ctx, cancel := context.WithTimeout(ctx, q.timeout)
	defer cancel()
	res, err := q.store.Append(ctx, p.session, p.turn, p.policy)
	q.obs.RetryAttempt(err == nil)
	q.obs.SetStoreUp(err == nil)
	if err == nil {
		// As for a turn written at once: background work (compaction,
		// titles) is queued for it.
		p.written(res, q.after)
	}
	return err
}

// written tells after (Options.AfterTurn; nil: no one) of the turn the
// store just wrote as res, whether from the request or the retry queue. A
// repeat that wrote nothing (no ids) is not news.
func (p pendingTurn) written(res history.AppendResult, after func(Recorded)) {
	if after == nil || len(res.IDs) == 0 {
		return
	}
	r := p.recorded
	r.Conversation, r.Unsummarized, r.NewConversation = res.ConversationID, res.Unsummarized, res.NewConversation
	after(r)
}

// drain waits until the queue is empty, ctx is done, or stall passes
// without a turn written (the store is still down: waiting longer would
// only hold the shutdown). It reports whether the queue is empty.
func (q *retryQueue) drain(ctx context.Context, stall time.Duration) bool {
	timer := time.NewTimer(stall)
	defer timer.Stop()
	for {
		q.mu.Lock()
		n, idle, progress := q.n, q.idle, q.progress
		q.mu.Unlock()
		if n == 0 {
			return true
		}
		select {
		case <-idle:
		case <-progress:
			timer.Reset(stall)
		case <-ctx.Done():
			return false
		case <-timer.C:
			return false
		}
	}
}

// take empties the queue and returns what it held, oldest first per
// session. Call it once the worker has stopped.
func (q *retryQueue) take() []pendingTurn {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []pendingTurn
	for _, s := range q.order {
		out = append(out, q.pending[s]...)
	}
	q.pending, q.order, q.n, q.bytes = map[string][]pendingTurn{}, nil, 0, 0
	q.obs.SetRetryQueueDepth(0)
	return out
}

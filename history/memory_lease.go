package history

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// memTurn is a session's turn lease in a MemoryStore: its holder's token
// and the requests waiting for it, oldest first. It lives apart from the
// session's data, so that erasing a session (or the size cap) cannot
// strand the requests waiting for it.
type memTurn struct {
	holder string
	queue  []*memWaiter
}

// memWaiter is a request waiting for a session's lease; ready is closed
// when the lease is handed to it.
type memWaiter struct {
	token   string
	ready   chan struct{}
	granted bool
}

// TakeTurn takes the session's turn lease, waiting in arrival order while
// another request holds it, then reads the window as Window does; see
// RedisStore.TakeTurn. The lease is in-process: the memory store lives
// and dies with its process, holders included.
func (s *MemoryStore) TakeTurn(ctx context.Context, session string, n int, nowMs int64, p Policy, o TurnOptions) (Window, *Lease, error) {
	if session == "" {
		return Window{}, nil, fmt.Errorf("take turn: %w", ErrEmptySession)
	}
	if err := ctx.Err(); err != nil {
		return Window{}, nil, fmt.Errorf("take turn %s: %w", session, err)
	}
	l := newLease(session, memLeaseBackend{s}, "", 0, o.opTimeout(), s.obs, s.log)
	start := time.Now()
	var waited time.Duration
	s.mu.Lock()
	t := s.turns[session]
	if t == nil {
		t = &memTurn{}
		s.turns[session] = t
	}
	if t.holder == "" && len(t.queue) == 0 {
		t.holder = l.token
		s.mu.Unlock()
	} else {
		if o.Wait <= 0 {
			s.mu.Unlock()
			return Window{}, nil, fmt.Errorf("take turn %s: %w", session, ErrBusy)
		}
		w := &memWaiter{token: l.token, ready: make(chan struct{})}
		t.queue = append(t.queue, w)
		s.mu.Unlock()
		timer := time.NewTimer(o.Wait)
		defer timer.Stop()
		var err error
		select {
		case <-w.ready:
		case <-timer.C:
			err = fmt.Errorf("take turn %s: waited %s: %w", session, o.Wait, ErrBusy)
		case <-ctx.Done():
			err = fmt.Errorf("take turn %s: %w", session, ctx.Err())
		}
		waited = time.Since(start)
		if err != nil {
			s.mu.Lock()
			if w.granted {
				// Handed over just as the wait ended: pass it on.
				s.handOff(session, l.token)
			} else {
				t.queue = slices.DeleteFunc(t.queue, func(x *memWaiter) bool { return x == w })
				s.dropTurn(session)
			}
			s.mu.Unlock()
			return Window{}, nil, err
		}
	}
	w, err := s.Window(ctx, session, n, nowMs, p)
	w.Waited = waited
	s.mu.Lock()
	l.mark = s.watchMark(session)
	if !o.Hold {
		// A request that records nothing holds no one up once it has read.
		s.handOff(session, l.token)
		s.mu.Unlock()
		return w, nil, err
	}
	s.mu.Unlock()
	if err != nil {
		_ = l.Release(context.Background())
		return Window{}, nil, err
	}
	l.start()
	return w, l, nil
}

// handOff releases the lease held by token, if it is, and hands it to the
// first waiter. s.mu must be held.
func (s *MemoryStore) handOff(session, token string) bool {
	t := s.turns[session]
	if t == nil || t.holder != token {
		return false
	}
	t.holder = ""
	if len(t.queue) > 0 {
		w := t.queue[0]
		t.queue = t.queue[1:]
		t.holder, w.granted = w.token, true
		close(w.ready)
	}
	s.dropTurn(session)
	return true
}

// dropTurn forgets a lease no one holds or waits for. s.mu must be held.
func (s *MemoryStore) dropTurn(session string) {
	if t := s.turns[session]; t != nil && t.holder == "" && len(t.queue) == 0 {
		delete(s.turns, session)
	}
}

// Busy reports whether a request holds the session's turn lease: a
// generation is active.
func (s *MemoryStore) busy(session string) bool {
	t := s.turns[session]
	return t != nil && t.holder != ""
}

// memLeaseBackend renews nothing: an in-process lease cannot outlive its
// holder.
type memLeaseBackend struct{ s *MemoryStore }

func (b memLeaseBackend) beat(ctx context.Context, l *Lease, d *Delta) (bool, string, error) {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.turns[l.session]
	if t == nil || t.holder != l.token {
		return false, "", nil
	}
	mark := s.watchMark(l.session)
	if d != nil && mark != "" {
		s.publishDelta(l.session, l.gen, *d)
	}
	return true, mark, nil
}

func (b memLeaseBackend) release(ctx context.Context, l *Lease) error {
	s := b.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handOff(l.session, l.token) {
		s.publishEnd(l.session, l.gen, "")
	}
	return nil
}

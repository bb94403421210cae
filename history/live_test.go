package history

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// watchStore is a store with watches; both stores are one.
type watchStore interface {
	leaseStore
	Watch(ctx context.Context, session, from string) (*Watch, error)
}

var (
	_ watchStore = (*MemoryStore)(nil)
	_ watchStore = (*RedisStore)(nil)
)

func TestWatchMemory(t *testing.T) {
	testWatchConformance(t, func(t *testing.T) watchStore {
		s := NewMemory()
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

func TestWatchRedis(t *testing.T) {
	c := redistest.Start(t).Client(t)
	testWatchConformance(t, func(t *testing.T) watchStore {
		s := NewRedis(c, "t:"+t.Name())
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

func TestWatchRedisCluster(t *testing.T) {
	c := redistest.StartCluster(t).Client(t)
	testWatchConformance(t, func(t *testing.T) watchStore {
		s := NewRedis(c, "t:"+t.Name())
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}

// next is the watch's next event, failing the test after a generous wait.
func next(t *testing.T, w *Watch) LiveEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	e, err := w.Next(ctx)
	if err != nil {
		t.Fatalf("next event: %v", err)
	}
	return e
}

// nextWithin is the watch's next event, or the error of waiting d for it.
func nextWithin(w *Watch, d time.Duration) (LiveEvent, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return w.Next(ctx)
}

// show is an event as the tests compare them.
func show(e LiveEvent) string {
	switch e.Kind {
	case EventMessage:
		return "message " + e.Message.Content
	case EventDelta:
		d := e.Delta
		s := "delta " + d.Content
		if d.Replace {
			s = "replace " + d.Content
		}
		for _, c := range d.ToolCalls {
			s += fmt.Sprintf(" call[%d]%s(%s)", c.Index, c.Name, c.Arguments)
		}
		return s
	}
	return "complete"
}

// deltaText reads events until complete and returns what they showed.
func untilComplete(t *testing.T, w *Watch) []string {
	t.Helper()
	var got []string
	for {
		e := next(t, w)
		got = append(got, show(e))
		if e.Kind == EventComplete {
			return got
		}
	}
}

func testWatchConformance(t *testing.T, newStore func(t *testing.T) watchStore) {
	ctx := context.Background()

	t.Run("snapshot, messages, deltas and complete", func(t *testing.T) {
		s := newStore(t)
		appendQA(t, s, session, 1, t0, Policy{})
		w, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w.Close()
		if !w.Fresh() || w.Generating() {
			t.Fatalf("got fresh %t, generating %t; want a snapshot, nothing generating", w.Fresh(), w.Generating())
		}
		msgs, err := s.Messages(ctx, session, "")
		mustNoErr(t, err)
		if got := w.Cursor().Messages; got != msgs[1].ID {
			t.Errorf("snapshot cursor %s, want the last message %s", got, msgs[1].ID)
		}

		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		// The lease learns of the watch from its window read: deltas flow.
		l.Publish(Delta{Content: "Hel"})
		if got := show(next(t, w)); got != "delta Hel" {
			t.Fatalf("got %q, want the first delta", got)
		}
		l.Publish(Delta{Content: "lo", ToolCalls: []ToolCallDelta{{Index: 0, ID: "call_1", Type: "function", Name: "f", Arguments: `{"a"`}}})
		l.Publish(Delta{ToolCalls: []ToolCallDelta{{Index: 0, Arguments: `:1}`}}})
		var deltas []string
		for len(strings.Join(deltas, "")) < len("lo call[0]f({\"a\":1})") {
			e := next(t, w)
			if e.Kind != EventDelta || e.Generation != l.Generation() {
				t.Fatalf("got %s of generation %q, want deltas of %q", show(e), e.Generation, l.Generation())
			}
			deltas = append(deltas, strings.TrimPrefix(show(e), "delta "))
		}
		_, err = s.Append(ctx, session, Turn{Messages: qa(2), NowMs: t0 + 1, Lease: l}, Policy{})
		mustNoErr(t, err)
		got := untilComplete(t, w)
		if want := []string{"message q2", "message a2", "complete"}; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("got %q, want %q", got, want)
		}
		// A message appended without a generation (an import) shows too.
		_, err = s.Append(ctx, session, Turn{Messages: qa(3)[:1], NowMs: t0 + 2}, Policy{})
		mustNoErr(t, err)
		if got := show(next(t, w)); got != "message q3" {
			t.Errorf("got %q, want the imported message", got)
		}
	})

	t.Run("resume mid-reply: no gap, no duplicate", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		l.Publish(Delta{Content: "one "})
		first := next(t, w)
		if show(first) != "delta one " {
			t.Fatalf("got %q, want the first delta", show(first))
		}
		w.Close() // the client goes away
		l.Publish(Delta{Content: "two "})
		// Let the delta reach the store before the next one, so they stay
		// two: a second watch (below) sees the store.
		probe, err := s.Watch(ctx, session, first.Cursor.String())
		mustNoErr(t, err)
		if show(next(t, probe)) != "delta two " {
			t.Fatal("second delta missing")
		}
		probe.Close()
		l.Publish(Delta{Content: "three"})
		_, err = s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0, Lease: l}, Policy{})
		mustNoErr(t, err)

		w2, err := s.Watch(ctx, session, first.Cursor.String())
		mustNoErr(t, err)
		defer w2.Close()
		if w2.Fresh() {
			t.Fatal("a recent id resumes; got a snapshot")
		}
		got := untilComplete(t, w2)
		if want := []string{"delta two ", "delta three", "message q1", "message a1", "complete"}; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("resumed: got %q, want %q", got, want)
		}
	})

	t.Run("a turn's last fragments come before its messages", func(t *testing.T) {
		s := newStore(t)
		w, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w.Close()
		for i := range 3 {
			_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
			mustNoErr(t, err)
			l.Publish(Delta{Content: "a"})
			if got := show(next(t, w)); got != "delta a" {
				t.Fatalf("got %q", got)
			}
			// Written with the turn, or just before it: either way first.
			l.Publish(Delta{Content: "b"})
			_, err = s.Append(ctx, session, Turn{Messages: qa(i), NowMs: t0 + int64(i), Lease: l}, Policy{})
			mustNoErr(t, err)
			got := untilComplete(t, w)
			want := []string{"delta b", fmt.Sprintf("message q%d", i), fmt.Sprintf("message a%d", i), "complete"}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("turn %d: got %q, want %q", i, got, want)
			}
		}
	})

	t.Run("a write in flight when the turn is appended is not lost", func(t *testing.T) {
		// The store is slow to answer the write of "a" (a loaded Redis,
		// another connection's commands first): the turn's append, which
		// carries the fragments after it, must not overtake it, or "a"
		// lands after the lease is released and is dropped.
		s := newStore(t)
		w, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w.Close()
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		g := &slowWrites{began: make(chan struct{}, 10), gate: make(chan struct{})}
		l.mu.Lock()
		g.leaseBackend, l.backend = l.backend, g
		l.mu.Unlock()
		l.Publish(Delta{Content: "a"})
		<-g.began // the write of "a" is in flight
		l.Publish(Delta{Content: "b"})
		done := make(chan error, 1)
		go func() {
			_, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0, Lease: l}, Policy{})
			done <- err
		}()
		time.Sleep(100 * time.Millisecond)
		close(g.gate)
		mustNoErr(t, <-done)
		var text string
		var got []string
		for {
			e := next(t, w)
			got = append(got, show(e))
			if e.Kind == EventComplete {
				break
			}
			if e.Kind == EventDelta {
				if e.Delta.Replace {
					text = ""
				}
				text += e.Delta.Content
			}
		}
		if text != "ab" {
			t.Errorf("a watcher assembled %q from %q, want the whole reply %q", text, got, "ab")
		}
	})

	t.Run("an id too old to resume gives a snapshot", func(t *testing.T) {
		s := newStore(t)
		appendQA(t, s, session, 1, t0, Policy{})
		w, err := s.Watch(ctx, session, "1-0_5-0") // entries that never were (or were trimmed)
		mustNoErr(t, err)
		defer w.Close()
		if !w.Fresh() {
			t.Fatal("got a resume from entries that are gone, want a snapshot")
		}
		if _, err := s.Watch(ctx, session, "garbage"); !errors.Is(err, ErrBadEventID) {
			t.Errorf("got %v, want ErrBadEventID", err)
		}
	})

	t.Run("a watch that joins mid-reply gets the reply so far", func(t *testing.T) {
		s := newStore(t)
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		l.Publish(Delta{Content: "Once upon"}) // no one watches yet
		w, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w.Close()
		if !w.Generating() {
			t.Error("snapshot: a generation is active")
		}
		l.Publish(Delta{Content: " a time"})
		// Within a renewal the lease learns of the watch and sends the
		// whole reply so far; then the fragments after it.
		var text string
		for text != "Once upon a time" {
			e := next(t, w)
			if e.Kind != EventDelta {
				t.Fatalf("got %s, want deltas", show(e))
			}
			if e.Delta.Replace {
				text = ""
			}
			text += e.Delta.Content
			if len(text) > 16 {
				t.Fatalf("assembled %q: a fragment came twice", text)
			}
		}
		mustNoErr(t, l.Release(ctx))
		if got := show(next(t, w)); got != "complete" {
			t.Errorf("got %q, want complete after a release without a turn", got)
		}
	})

	t.Run("watches of a session share one reader", func(t *testing.T) {
		s := newStore(t)
		var ws []*Watch
		for range 50 {
			w, err := s.Watch(ctx, session, "")
			mustNoErr(t, err)
			ws = append(ws, w)
		}
		var hs *hubs
		switch st := s.(type) {
		case *MemoryStore:
			hs = st.hubs
		case *RedisStore:
			hs = st.hubs
		}
		hs.mu.Lock()
		n := len(hs.byID)
		hs.mu.Unlock()
		if n != 1 {
			t.Errorf("got %d readers for one session, want 1", n)
		}
		appendQA(t, s, session, 1, t0, Policy{})
		for i, w := range ws {
			if got := show(next(t, w)); got != "message q1" {
				t.Fatalf("watch %d: got %q", i, got)
			}
			w.Close()
		}
		hs.mu.Lock()
		n = len(hs.byID)
		hs.mu.Unlock()
		if n != 0 {
			t.Errorf("got %d readers after every watch closed, want 0", n)
		}
	})
}

// TestRedisWatchDeadHolder: a holder that dies mid-reply (no renewal, no
// release) ends with a complete event once its lease expired.
func TestRedisWatchDeadHolder(t *testing.T) {
	c := redistest.Start(t).Client(t)
	defer func(b time.Duration) { hubBlock = b }(hubBlock)
	hubBlock = 200 * time.Millisecond
	s := NewRedis(c, "t", WithLeaseTTL(500*time.Millisecond))
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	w, err := s.Watch(ctx, session, "")
	mustNoErr(t, err)
	defer w.Close()
	_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	l.Publish(Delta{Content: "last words"})
	if got := show(next(t, w)); got != "delta last words" {
		t.Fatalf("got %q", got)
	}
	l.ended() // the process dies
	e := next(t, w)
	if e.Kind != EventComplete || e.Generation != "" {
		t.Errorf("got %s of %q, want the end of a generation whose holder died", show(e), e.Generation)
	}
}

// TestMemorySweepForgetsLiveStreams: a memory store forgets a session's
// live stream once no one has watched it for a minute, as Redis expires
// its keys, so watching many sessions does not grow it for good.
func TestMemorySweepForgetsLiveStreams(t *testing.T) {
	clock := &fakeClock{t: time.UnixMilli(t0)}
	s := NewMemory()
	s.now = clock.Now
	defer s.Close()
	lives := func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.lives)
	}
	ctx := context.Background()
	w, err := s.Watch(ctx, session, "")
	mustNoErr(t, err)
	s.Sweep()
	if lives() != 1 {
		t.Fatalf("got %d live streams while watched, want 1", len(s.lives))
	}
	w.Close()
	clock.Add(watchTTL - time.Millisecond)
	s.Sweep()
	if lives() != 1 {
		t.Fatal("a live stream went before its minute: a client reconnecting at once would miss its deltas")
	}
	clock.Add(time.Millisecond)
	s.Sweep()
	if n := lives(); n != 0 {
		t.Errorf("got %d live streams a minute after the last watch, want 0", n)
	}
}

// slowWrites is a lease backend whose delta writes wait for gate: a store
// slow to answer them.
type slowWrites struct {
	leaseBackend
	began chan struct{} // a write began (buffered)
	gate  chan struct{}
}

func (g *slowWrites) beat(ctx context.Context, l *Lease, d *Delta) (bool, string, error) {
	if d != nil {
		g.began <- struct{}{}
		<-g.gate
	}
	return g.leaseBackend.beat(ctx, l, d)
}

// TestRedisWatchLostLeaseTurnCompletes: a holder whose lease was lost
// (its TTL passed while the store was unreachable) and that still records
// its turn ends its generation with that write, when no other request
// holds the lease: its watchers get complete with the turn's messages,
// not a hub's block later from the dead-holder check.
func TestRedisWatchLostLeaseTurnCompletes(t *testing.T) {
	c := redistest.Start(t).Client(t)
	defer func(b time.Duration) { hubBlock = b }(hubBlock)
	hubBlock = time.Minute // the dead-holder check cannot be what ends it
	s := NewRedis(c, "t")
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	w, err := s.Watch(ctx, session, "")
	mustNoErr(t, err)
	defer w.Close()
	_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	n, err := c.Del(ctx, s.leaseKey(session)).Result() // as if it expired
	mustNoErr(t, err)
	if n != 1 {
		t.Fatalf("deleted %d lease keys, want 1", n)
	}
	_, err = s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0 + 1, Lease: l}, Policy{})
	mustNoErr(t, err)
	var got []string
	for len(got) < 3 {
		e, err := nextWithin(w, 5*time.Second)
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		got = append(got, show(e))
		if e.Kind == EventComplete && e.Generation != l.Generation() {
			t.Errorf("complete of %q, want the lost holder's %q", e.Generation, l.Generation())
		}
	}
	if want := []string{"message q1", "message a1", "complete"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}

	// Lost again, but another request took the lease meanwhile: its
	// generation is active, and ends with its own release.
	_, l, err = s.TakeTurn(ctx, session, 20, t0+2, Policy{}, hold)
	mustNoErr(t, err)
	mustNoErr(t, c.Del(ctx, s.leaseKey(session)).Err())
	_, other, err := s.TakeTurn(ctx, session, 20, t0+3, Policy{}, hold)
	mustNoErr(t, err)
	_, err = s.Append(ctx, session, Turn{Messages: qa(2), NowMs: t0 + 4, Lease: l}, Policy{})
	mustNoErr(t, err)
	for _, want := range []string{"message q2", "message a2"} {
		if e := next(t, w); show(e) != want {
			t.Fatalf("got %s, want %s", show(e), want)
		}
	}
	e, err := nextWithin(w, 300*time.Millisecond)
	if err == nil {
		t.Fatalf("got %s of %q while another generation is active, want nothing", show(e), e.Generation)
	}
	mustNoErr(t, other.Release(ctx))
	if e := next(t, w); e.Kind != EventComplete || e.Generation != other.Generation() {
		t.Errorf("got %s of %q, want complete of %q", show(e), e.Generation, other.Generation())
	}
}

// TestRedisWatchRetriedAppendCompletesOnce: a turn's write whose answer
// is lost after Redis ran it (the connection breaks) is sent again by
// go-redis on a new connection. That second run finds the turn recorded
// and the lease already released by the first: it must not end the
// generation a second time, whether the request had a key of its own (a
// write key then tells the retry) or not (its generated key does), and
// whether the first run released the lease or found it lost.
func TestRedisWatchRetriedAppendCompletesOnce(t *testing.T) {
	srv := redistest.Start(t)
	ctx := context.Background()
	cut := &cutAnswer{mark: []byte(appendScript.Hash())}
	c := redis.NewClient(&redis.Options{Addr: srv.Addr, Dialer: cut.dial})
	t.Cleanup(func() { _ = c.Close() })
	// Loaded first: an EVALSHA answered NOSCRIPT runs nothing.
	mustNoErr(t, appendScript.Load(ctx, c).Err())
	tests := []struct {
		name        string
		idem, write string
		lost        bool
	}{
		{name: "generated key", idem: "hp-1"},
		{name: "client key", idem: "k1", write: "hp-w-1"},
		{name: "lease lost before the write", idem: "hp-2", lost: true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := NewRedis(c, fmt.Sprintf("t%d", i))
			t.Cleanup(func() { _ = s.Close() })
			w, err := s.Watch(ctx, session, "")
			mustNoErr(t, err)
			defer w.Close()
			_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
			mustNoErr(t, err)
			if tc.lost {
				mustNoErr(t, c.Del(ctx, s.leaseKey(session)).Err()) // as if it expired
			}
			cut.arm()
			_, err = s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0 + 1, IdempotencyKey: tc.idem, WriteKey: tc.write, Lease: l}, Policy{})
			mustNoErr(t, err)
			if n := cut.cuts.Load(); n != 1 {
				t.Fatalf("cut %d answers, want 1: the write was not retried", n)
			}
			for _, want := range []string{"message q1", "message a1", "complete"} {
				if e := next(t, w); show(e) != want || (e.Kind == EventComplete && e.Generation != l.Generation()) {
					t.Fatalf("got %s of %q, want %s", show(e), e.Generation, want)
				}
			}
			e, err := nextWithin(w, 300*time.Millisecond)
			if err == nil {
				t.Errorf("got %s of %q after the generation's complete, want nothing: the retried write ended it again", show(e), e.Generation)
			}
		})
	}
}

// cutAnswer dials connections that, once armed, lose the answer to the
// first write carrying mark: the server gets the command and runs it, the
// client reads EOF (a connection broken after the command ran), and
// go-redis sends it again on a new connection.
type cutAnswer struct {
	mark  []byte
	armed atomic.Bool
	cuts  atomic.Int32
}

func (a *cutAnswer) arm() { a.cuts.Store(0); a.armed.Store(true) }

func (a *cutAnswer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &cutConn{Conn: c, a: a}, nil
}

type cutConn struct {
	net.Conn
	a    *cutAnswer
	lose bool
}

func (c *cutConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if err == nil && bytes.Contains(p, c.a.mark) && c.a.armed.CompareAndSwap(true, false) {
		c.lose = true
	}
	return n, err
}

func (c *cutConn) Read(p []byte) (int, error) {
	if c.lose {
		// The server answers once it has run the command: wait for
		// that, drop the answer and the connection.
		_ = c.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Conn.Read(make([]byte, 64<<10))
		_ = c.Conn.Close()
		c.a.cuts.Add(1)
		c.lose = false
		return 0, io.EOF
	}
	return c.Conn.Read(p)
}

// TestWatchResumedAfterTheMarkExpiredGetsComplete: a watcher that saw a
// reply's deltas and came back after the session stopped counting as
// watched (its mark's TTL passed: a laptop asleep during a long reply)
// got the reply's messages but never its complete, so a console kept the
// reply's draft "writing…" beside the recorded message. A generation whose
// deltas were written says its end even when no one watches any more.
func TestWatchResumedAfterTheMarkExpiredGetsComplete(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		store  func(t *testing.T) watchStore
		expire func(t *testing.T, s watchStore) // the watch mark's TTL passes
	}{
		{"memory", func(t *testing.T) watchStore { return NewMemory() }, func(t *testing.T, s watchStore) {
			m := s.(*MemoryStore)
			m.mu.Lock()
			m.lives[session].keptUntil = time.Time{}
			m.mu.Unlock()
		}},
		{"redis", func(t *testing.T) watchStore {
			s := NewRedis(redistest.Start(t).Client(t), "t")
			t.Cleanup(func() { _ = s.Close() })
			return s
		}, func(t *testing.T, s watchStore) {
			r := s.(*RedisStore)
			mustNoErr(t, r.client.Del(ctx, r.watchedKey(session)).Err())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.store(t)
			w, err := s.Watch(ctx, session, "")
			mustNoErr(t, err)
			_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
			mustNoErr(t, err)
			l.Publish(Delta{Content: "one"})
			first := next(t, w)
			if show(first) != "delta one" {
				t.Fatalf("got %q, want the delta", show(first))
			}
			w.Close()
			// The hub lets go once its last watch closed.
			deadline := time.Now().Add(5 * time.Second)
			for watchedHere(s) && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			tc.expire(t, s)
			_, err = s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0 + 1, Lease: l}, Policy{})
			mustNoErr(t, err)

			w2, err := s.Watch(ctx, session, first.Cursor.String())
			mustNoErr(t, err)
			defer w2.Close()
			var got []string
			for len(got) < 3 {
				e, err := nextWithin(w2, 3*time.Second)
				if err != nil {
					t.Fatalf("after %q: %v", got, err)
				}
				got = append(got, show(e))
				if e.Kind == EventComplete && e.Generation != l.Generation() {
					t.Errorf("complete of %q, want %q", e.Generation, l.Generation())
				}
			}
			if want := []string{"message q1", "message a1", "complete"}; !reflect.DeepEqual(got, want) {
				t.Errorf("got %q, want %q", got, want)
			}
		})
	}
}

// watchedHere reports whether s's process still reads the session for a
// watch.
func watchedHere(s watchStore) bool {
	switch st := s.(type) {
	case *MemoryStore:
		return st.hubs.watched(session)
	case *RedisStore:
		return st.hubs.watched(session)
	}
	return false
}

// TestWatchOfAnErasedSessionEnds: a watch showed the session's messages
// and went on after the session was erased: a console kept the erased
// conversation on screen, and the session's next turn (its conversation
// again "c1") appeared under it. The hub now notices, at its next keep,
// that what it showed is gone: the watch ends with ErrWatchGone, and its
// client's resume gets a fresh snapshot. A watch whose messages stay
// never ends so.
func TestWatchOfAnErasedSessionEnds(t *testing.T) {
	ctx := context.Background()
	defer func(k, b time.Duration) { hubKeep, hubBlock = k, b }(hubKeep, hubBlock)
	hubKeep, hubBlock = 20*time.Millisecond, 50*time.Millisecond
	eachWatchStore(t, func(t *testing.T, s watchStore) {
		appendQA(t, s, session, 1, t0, Policy{})
		w, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w.Close()
		// Turns go on: nothing is gone, the watch carries on.
		var last LiveEvent
		for i := 2; i <= 4; i++ {
			appendQA(t, s, session, i, t0+int64(i), Policy{})
			for range 2 {
				last = next(t, w)
			}
			time.Sleep(3 * hubKeep)
		}
		if got := show(last); got != "message a4" {
			t.Fatalf("got %q, want message a4", got)
		}
		if _, err := s.(interface {
			Erase(context.Context, string) (Erased, error)
		}).Erase(ctx, session); err != nil {
			t.Fatal(err)
		}
		e, err := nextWithin(w, 5*time.Second)
		if !errors.Is(err, ErrWatchGone) {
			t.Fatalf("after the erase: got %s, %v; want ErrWatchGone", show(e), err)
		}
		appendQA(t, s, session, 5, t0+5, Policy{})
		w2, err := s.Watch(ctx, session, last.Cursor.String())
		mustNoErr(t, err)
		defer w2.Close()
		if !w2.Fresh() {
			t.Error("resumed after the erase: got no snapshot")
		}
	})
}

// TestRedisWatchResumedAfterLostLeaseReleaseGetsComplete: a generation
// whose deltas were written, whose watchers then left and whose lease was
// lost (its TTL passed: the holder could not renew it), ends without a
// turn (the upstream failed: Lease.Release). No one holds the lease, so no
// other generation's end follows, and a watcher that comes back with its
// last id has no dead-holder check to end it (the lease is free when it
// starts): the release must say the end, or the console shows the reply
// as being written for good. Said once, also when the release is sent
// again.
func TestRedisWatchResumedAfterLostLeaseReleaseGetsComplete(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t")
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	w, err := s.Watch(ctx, session, "")
	mustNoErr(t, err)
	_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	l.Publish(Delta{Content: "one"})
	first := next(t, w)
	if show(first) != "delta one" {
		t.Fatalf("got %q, want the delta", show(first))
	}
	w.Close()
	deadline := time.Now().Add(5 * time.Second)
	for s.hubs.watched(session) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	mustNoErr(t, c.Del(ctx, s.watchedKey(session)).Err()) // the mark's TTL passed
	mustNoErr(t, c.Del(ctx, s.leaseKey(session)).Err())   // as if it expired
	mustNoErr(t, l.Release(ctx))
	// Sent again (releaseAnswered does): no second end.
	mustNoErr(t, redisLeaseBackend{s}.release(ctx, l))

	w2, err := s.Watch(ctx, session, first.Cursor.String())
	mustNoErr(t, err)
	defer w2.Close()
	if w2.Fresh() {
		t.Fatalf("resumed from a snapshot, want from %s", first.Cursor)
	}
	e, err := nextWithin(w2, 3*time.Second)
	if err != nil {
		t.Fatalf("no complete: %v", err)
	}
	if e.Kind != EventComplete || e.Generation != l.Generation() {
		t.Fatalf("got %s of %q, want complete of %q", show(e), e.Generation, l.Generation())
	}
	e, err = nextWithin(w2, 300*time.Millisecond)
	if err == nil {
		t.Errorf("got %s of %q after the complete, want nothing", show(e), e.Generation)
	}
}

// TestWatchOfAnExpiredStreamEnds: retention expired the session's stream
// (nothing written for longer than the retention). Redis drops the key at
// once, and the watch ends at its hub's next keep; the MemoryStore applied
// the expiry only when the session was next read or written, or at its
// sweep (once a minute in the proxy), so its watch went on showing the
// expired messages, which a snapshot no longer had.
func TestWatchOfAnExpiredStreamEnds(t *testing.T) {
	ctx := context.Background()
	defer func(k, b time.Duration) { hubKeep, hubBlock = k, b }(hubKeep, hubBlock)
	hubKeep, hubBlock = 20*time.Millisecond, 50*time.Millisecond
	eachWatchStore(t, func(t *testing.T, s watchStore) {
		p := Policy{Retention: 300 * time.Millisecond}
		appendQA(t, s, session, 1, time.Now().UnixMilli(), p)
		w, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w.Close()
		e, err := nextWithin(w, 5*time.Second)
		if !errors.Is(err, ErrWatchGone) {
			t.Fatalf("after the stream expired: got %s, %v; want ErrWatchGone", show(e), err)
		}
	})
}

// TestWatchStartedAfterAnEraseGoesOn: a watch that started from a
// snapshot after the session was erased, before its process's hub noticed
// the erase, joined that hub and was ended with it (ErrWatchGone), though
// nothing it showed was gone: a console opened on the erased session
// reconnected for nothing. It now goes on, on a hub of its own, and gets
// the session's next turn; the watch that showed the erased messages
// still ends.
func TestWatchStartedAfterAnEraseGoesOn(t *testing.T) {
	ctx := context.Background()
	defer func(k, b time.Duration) { hubKeep, hubBlock = k, b }(hubKeep, hubBlock)
	hubKeep, hubBlock = 300*time.Millisecond, 50*time.Millisecond
	eachWatchStore(t, func(t *testing.T, s watchStore) {
		appendQA(t, s, session, 1, t0, Policy{})
		w1, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w1.Close()
		if _, err := s.(interface {
			Erase(context.Context, string) (Erased, error)
		}).Erase(ctx, session); err != nil {
			t.Fatal(err)
		}
		w2, err := s.Watch(ctx, session, "")
		mustNoErr(t, err)
		defer w2.Close()
		e, err := nextWithin(w1, 5*time.Second)
		if !errors.Is(err, ErrWatchGone) {
			t.Fatalf("the watch of the erased messages: got %s, %v; want ErrWatchGone", show(e), err)
		}
		appendQA(t, s, session, 2, t0+2, Policy{})
		for _, want := range []string{"message q2", "message a2"} {
			e, err := nextWithin(w2, 5*time.Second)
			if err != nil || show(e) != want {
				t.Fatalf("the watch started after the erase: got %s, %v; want %s", show(e), err, want)
			}
		}
		if !watchedHere(s) {
			t.Error("the watch started after the erase is open: the session is not read for it")
		}
	})
}

// eachWatchStore runs f on a new memory store and on a Redis store of a
// redis-server of its own.
func eachWatchStore(t *testing.T, f func(t *testing.T, s watchStore)) {
	t.Run("memory", func(t *testing.T) { f(t, NewMemory()) })
	t.Run("redis", func(t *testing.T) {
		s := NewRedis(redistest.Start(t).Client(t), "t")
		t.Cleanup(func() { _ = s.Close() })
		f(t, s)
	})
}

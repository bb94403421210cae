package history

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// leaseStore is a store with turn leases; both stores are one.
type leaseStore interface {
	store
	TakeTurn(ctx context.Context, session string, n int, nowMs int64, p Policy, o TurnOptions) (Window, *Lease, error)
}

var (
	_ leaseStore = (*MemoryStore)(nil)
	_ leaseStore = (*RedisStore)(nil)
)

// leaseFixture is one store under test for the lease, with a look at its
// queue.
type leaseFixture struct {
	store leaseStore
	// waiting is how many requests wait for the session's lease.
	waiting func(t *testing.T, session string) int
}

func TestLeaseMemory(t *testing.T) {
	testLeaseConformance(t, func(t *testing.T) leaseFixture {
		s := NewMemory()
		return leaseFixture{store: s, waiting: func(t *testing.T, session string) int {
			s.mu.Lock()
			defer s.mu.Unlock()
			if tr := s.turns[session]; tr != nil {
				return len(tr.queue)
			}
			return 0
		}}
	})
}

func TestLeaseRedis(t *testing.T) {
	testLeaseConformance(t, redisLeaseFixture(redistest.Start(t).Client(t)))
}

func TestLeaseRedisCluster(t *testing.T) {
	testLeaseConformance(t, redisLeaseFixture(redistest.StartCluster(t).Client(t)))
}

func redisLeaseFixture(c redis.UniversalClient) func(t *testing.T) leaseFixture {
	return func(t *testing.T) leaseFixture {
		s := NewRedis(c, "t:"+t.Name())
		t.Cleanup(func() { _ = s.Close() })
		return leaseFixture{store: s, waiting: func(t *testing.T, session string) int {
			n, err := c.LLen(context.Background(), s.queueKey(session)).Result()
			mustNoErr(t, err)
			return int(n)
		}}
	}
}

// waitFor polls cond until it holds; the tests use it to learn that a
// request is queued before the next one comes, never as a timing check.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

var (
	hold = TurnOptions{Hold: true, Wait: time.Minute}
	peek = TurnOptions{Wait: time.Minute}
)

func testLeaseConformance(t *testing.T, newFixture func(t *testing.T) leaseFixture) {
	ctx := context.Background()

	t.Run("the window is the current conversation's, with turns written late to an older one after it", func(t *testing.T) {
		s := newFixture(t).store
		appendQA(t, s, session, 0, t0, Policy{})
		old := appendQA(t, s, session, 1, t0+1, Policy{}).ConversationID
		res, err := s.Append(ctx, session, Turn{Messages: qa(2), NowMs: t0 + 2, NewConversation: true}, Policy{})
		mustNoErr(t, err)
		cur := res.ConversationID
		// Replies that outlasted the new conversation's start, recorded
		// where they were read: the stream's newest entries are the old
		// conversation's.
		for i := 3; i <= 5; i++ {
			_, err := s.Append(ctx, session, Turn{Messages: qa(i), NowMs: t0 + int64(i), ConversationID: old}, Policy{})
			mustNoErr(t, err)
		}
		for _, n := range []int{1, 2, 4, 20} {
			w, _, err := s.TakeTurn(ctx, session, n, t0+6, Policy{}, peek)
			mustNoErr(t, err)
			want := []string{"q2", "a2"}[2-min(n, 2):]
			if w.ConversationID != cur || fmt.Sprint(contents(w.Messages)) != fmt.Sprint(want) {
				t.Errorf("n=%d: got %s %q, want %s %q", n, w.ConversationID, contents(w.Messages), cur, want)
			}
		}
		// And the old conversation's own newest, unchanged by the new one.
		_, err = s.Append(ctx, session, Turn{Messages: qa(6), NowMs: t0 + 7, NewConversation: true}, Policy{})
		mustNoErr(t, err)
		w, _, err := s.TakeTurn(ctx, session, 3, t0+8, Policy{}, peek)
		mustNoErr(t, err)
		if got := contents(w.Messages); fmt.Sprint(got) != fmt.Sprint([]string{"q6", "a6"}) {
			t.Errorf("after a third conversation: got %q, want [q6 a6]", got)
		}
	})

	t.Run("waiters take the turn in arrival order and read the turns before them", func(t *testing.T) {
		f := newFixture(t)
		s := f.store
		_, first, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		type got struct {
			i   int
			win []string
		}
		order := make(chan got, 3)
		var wg sync.WaitGroup
		for i := 1; i <= 3; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				w, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
				if err != nil {
					t.Errorf("turn %d: %v", i, err)
					return
				}
				order <- got{i, contents(w.Messages)}
				_, err = s.Append(ctx, session, Turn{Messages: qa(i), NowMs: t0 + int64(i), Lease: l}, Policy{})
				if err != nil {
					t.Errorf("append %d: %v", i, err)
				}
			}()
			// The next request arrives once this one is queued.
			waitFor(t, fmt.Sprintf("request %d to queue", i), func() bool { return f.waiting(t, session) == i })
		}
		_, err = s.Append(ctx, session, Turn{Messages: qa(0), NowMs: t0, Lease: first}, Policy{})
		mustNoErr(t, err)
		wg.Wait()
		close(order)
		want := []string{"q0", "a0"}
		k := 1
		for g := range order {
			if g.i != k {
				t.Fatalf("turn %d took the lease in place %d", g.i, k)
			}
			if fmt.Sprint(g.win) != fmt.Sprint(want) {
				t.Errorf("turn %d read %q, want %q", g.i, g.win, want)
			}
			want = append(want, fmt.Sprintf("q%d", k), fmt.Sprintf("a%d", k))
			k++
		}
		if !first.Released() {
			t.Error("the lease appended with is not released")
		}
		if n := f.waiting(t, session); n != 0 {
			t.Errorf("got %d requests still queued, want 0", n)
		}
	})

	t.Run("reject answers busy at once", func(t *testing.T) {
		s := newFixture(t).store
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		_, l2, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
		if !errors.Is(err, ErrBusy) || l2 != nil {
			t.Fatalf("got %v, %v; want ErrBusy and no lease", l2, err)
		}
		// Another session is not held up.
		_, l3, err := s.TakeTurn(ctx, "chat:other:support", 20, t0, Policy{}, TurnOptions{Hold: true})
		mustNoErr(t, err)
		mustNoErr(t, l3.Release(ctx))
		mustNoErr(t, l.Release(ctx))
		_, l4, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
		mustNoErr(t, err)
		mustNoErr(t, l4.Release(ctx))
	})

	t.Run("a wait that times out leaves the queue", func(t *testing.T) {
		f := newFixture(t)
		s := f.store
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		_, _, err = s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true, Wait: 50 * time.Millisecond})
		if !errors.Is(err, ErrBusy) {
			t.Fatalf("got %v, want ErrBusy", err)
		}
		waitFor(t, "the queue to empty", func() bool { return f.waiting(t, session) == 0 })
		mustNoErr(t, l.Release(ctx))
		// Nobody is left in front: the next request takes it at once.
		_, l2, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
		mustNoErr(t, err)
		mustNoErr(t, l2.Release(ctx))
	})

	t.Run("a waiter whose client leaves gives its place up", func(t *testing.T) {
		f := newFixture(t)
		s := f.store
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() {
			_, _, err := s.TakeTurn(cctx, session, 20, t0, Policy{}, hold)
			done <- err
		}()
		waitFor(t, "the waiter to queue", func() bool { return f.waiting(t, session) == 1 })
		next := make(chan *Lease, 1)
		go func() {
			_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
			if err != nil {
				t.Error(err)
			}
			next <- l
		}()
		waitFor(t, "the second waiter to queue", func() bool { return f.waiting(t, session) == 2 })
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
		mustNoErr(t, l.Release(ctx))
		select {
		case l2 := <-next:
			mustNoErr(t, l2.Release(ctx))
		case <-time.After(20 * time.Second):
			t.Fatal("the request behind the one that left never got the lease")
		}
	})

	t.Run("release without a turn hands the lease on", func(t *testing.T) {
		f := newFixture(t)
		s := f.store
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		got := make(chan *Lease, 1)
		go func() {
			_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
			if err != nil {
				t.Error(err)
			}
			got <- l
		}()
		waitFor(t, "the waiter to queue", func() bool { return f.waiting(t, session) == 1 })
		mustNoErr(t, l.Release(ctx))
		mustNoErr(t, l.Release(ctx)) // twice is harmless
		l2 := <-got
		if l2 == nil {
			t.Fatal("no lease")
		}
		// A turn appended with the first, released lease leaves the
		// second one held.
		_, err = s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0, Lease: l}, Policy{})
		mustNoErr(t, err)
		_, _, err = s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
		if !errors.Is(err, ErrBusy) {
			t.Fatalf("got %v, want ErrBusy while the second lease is held", err)
		}
		mustNoErr(t, l2.Release(ctx))
	})

	t.Run("a reader waits its turn but holds no one up", func(t *testing.T) {
		f := newFixture(t)
		s := f.store
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		read := make(chan []string, 1)
		go func() {
			w, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, peek)
			if err != nil || l != nil {
				t.Errorf("reader: got lease %v, err %v; want none", l, err)
			}
			read <- contents(w.Messages)
		}()
		waitFor(t, "the reader to queue", func() bool { return f.waiting(t, session) == 1 })
		writer := make(chan *Lease, 1)
		go func() {
			_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
			if err != nil {
				t.Error(err)
			}
			writer <- l
		}()
		waitFor(t, "the writer to queue", func() bool { return f.waiting(t, session) == 2 })
		_, err = s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0, Lease: l}, Policy{})
		mustNoErr(t, err)
		if got := <-read; fmt.Sprint(got) != "[q1 a1]" {
			t.Errorf("reader got %q, want the turn before it", got)
		}
		l2 := <-writer
		mustNoErr(t, l2.Release(ctx))
	})

	t.Run("held leases keep no goroutine of their own", func(t *testing.T) {
		// A lease is held for a whole reply, mostly waiting: its renewals
		// run from a timer (hpbench -mode hold counts what each open
		// stream costs).
		s := newFixture(t).store
		const n = 50
		_, l, err := s.TakeTurn(ctx, "warm-up", 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		mustNoErr(t, l.Release(ctx))
		before := runtime.NumGoroutine()
		leases := make([]*Lease, n)
		for i := range leases {
			_, leases[i], err = s.TakeTurn(ctx, fmt.Sprintf("%s-%d", session, i), 20, t0, Policy{}, hold)
			mustNoErr(t, err)
		}
		if grew := runtime.NumGoroutine() - before; grew >= n/2 {
			t.Errorf("%d held leases: %d goroutines more, want none of their own", n, grew)
		}
		for _, l := range leases {
			mustNoErr(t, l.Release(ctx))
		}
	})

	t.Run("a duplicate turn releases the lease too", func(t *testing.T) {
		s := newFixture(t).store
		_, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0, IdempotencyKey: "k"}, Policy{})
		mustNoErr(t, err)
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		mustNoErr(t, err)
		res, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0, IdempotencyKey: "k", Lease: l}, Policy{})
		mustNoErr(t, err)
		if !res.Duplicate {
			t.Fatalf("got %+v, want a duplicate", res)
		}
		_, l2, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
		mustNoErr(t, err)
		mustNoErr(t, l2.Release(ctx))
	})
}

// TestRedisLeaseExpires: a holder that dies (its renewals stop, it never
// releases) is taken over once its lease expires, and the waiter goes on.
func TestRedisLeaseExpires(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t", WithLeaseTTL(600*time.Millisecond))
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	_, dead, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	// Renewals keep a live holder's lease past its TTL.
	time.Sleep(900 * time.Millisecond)
	if _, _, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true}); !errors.Is(err, ErrBusy) {
		t.Fatalf("a renewed lease: got %v, want ErrBusy", err)
	}
	dead.ended() // the process dies: no renewal, no release
	start := time.Now()
	_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	if waited := time.Since(start); waited > 10*time.Second {
		t.Errorf("took over after %s, want about the lease's TTL", waited)
	}
	mustNoErr(t, l.Release(ctx))
}

// TestRedisDeadWaiterIsSkipped: a waiter that died in the queue (its time
// ran out) does not hold the session.
func TestRedisDeadWaiterIsSkipped(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t")
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	mustNoErr(t, c.RPush(ctx, s.queueKey(session), "dead").Err())
	mustNoErr(t, c.HSet(ctx, s.waitersKey(session), "dead", 1).Err())
	_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
	mustNoErr(t, err)
	mustNoErr(t, l.Release(ctx))
	if n := c.LLen(ctx, s.queueKey(session)).Val(); n != 0 {
		t.Errorf("got %d queued, want the dead waiter dropped", n)
	}
}

// TestPublishCostsWhatItHolds: a long reply published fragment by
// fragment costs memory in proportion to the reply, not to its square
// (each fragment must not copy the reply so far).
func TestPublishCostsWhatItHolds(t *testing.T) {
	s := NewMemory()
	ctx := context.Background()
	_, l, err := s.TakeTurn(ctx, session, 0, t0, Policy{}, TurnOptions{Hold: true})
	mustNoErr(t, err)
	defer func() { mustNoErr(t, l.Release(ctx)) }()
	frag := Delta{Content: "word "}
	for range 20000 { // 100 KB held
		l.Publish(frag)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 10000 {
		l.Publish(frag)
	}
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 10<<20 {
		t.Errorf("10,000 fragments of 5 bytes on a 100 KB reply allocated %d bytes, want well under 10 MB", got)
	}
}

func BenchmarkLeasePublish(b *testing.B) {
	s := NewMemory()
	ctx := context.Background()
	_, l, err := s.TakeTurn(ctx, session, 0, t0, Policy{}, TurnOptions{Hold: true})
	mustNoErr(b, err)
	defer func() { _ = l.Release(ctx) }()
	d := Delta{Content: "word "}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if i%40000 == 0 { // stay under maxLiveReply
			l.mu.Lock()
			l.all, l.over = &replyAcc{}, false
			l.mu.Unlock()
		}
		l.Publish(d)
	}
}

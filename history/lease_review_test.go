package history

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// takeAsync runs TakeTurn (holding) on its own goroutine and returns its
// lease (or error) on a channel.
func takeAsync(s *RedisStore, o TurnOptions) <-chan turnResult {
	out := make(chan turnResult, 1)
	go func() {
		start := time.Now()
		_, l, err := s.TakeTurn(context.Background(), session, 20, t0, Policy{}, o)
		out <- turnResult{l, err, time.Since(start)}
	}()
	return out
}

type turnResult struct {
	l      *Lease
	err    error
	waited time.Duration
}

// TestRedisRestartWhileWaiting: Redis restarts (its data kept, AOF) while
// a request waits for the session's turn; the holder gives the turn back
// after the restart, and the waiter goes on at once: its wake-up comes
// through the pub/sub connection that reconnected by itself, it does not
// wait for its next check (half the lease's TTL) or ordering_timeout.
func TestRedisRestartWhileWaiting(t *testing.T) {
	srv := redistest.Start(t, redistest.WithAOF())
	c := srv.Client(t)
	const ttl = 40 * time.Second // a check per 20 s: far past what the test allows
	s := NewRedis(c, "t", WithLeaseTTL(ttl))
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	_, holder, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	got := takeAsync(s, TurnOptions{Hold: true, Wait: time.Minute, OpTimeout: time.Second})
	waitFor(t, "the waiter to queue", func() bool { return c.LLen(ctx, s.queueKey(session)).Val() == 1 })
	time.Sleep(100 * time.Millisecond) // subscribed, asleep

	srv.Restart(t)
	waitFor(t, "redis to answer", func() bool { return c.Ping(ctx).Err() == nil })
	// The pub/sub connection needs a moment to notice and subscribe again;
	// a release before that is found by the waiter's own check on resubscribing.
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	mustNoErr(t, holder.Release(ctx))
	select {
	case r := <-got:
		mustNoErr(t, r.err)
		t.Logf("the waiter went on %s after the release", time.Since(start))
		mustNoErr(t, r.l.Release(ctx))
	case <-time.After(10 * time.Second):
		t.Fatalf("the waiter still waits 10 s after the turn was given back (a Redis restart while it waited)")
	}
}

// TestRedisRestartLosesLeaseWaiterGoesOn: Redis restarts without its data
// while a request waits: the lease is gone with it, and the waiter goes on
// once the store answers again, not after half the lease's TTL.
func TestRedisRestartLosesLeaseWaiterGoesOn(t *testing.T) {
	srv := redistest.Start(t)
	c := srv.Client(t)
	const ttl = 40 * time.Second
	s := NewRedis(c, "t", WithLeaseTTL(ttl))
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	_, holder, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	defer func() { _ = holder.Release(ctx) }()
	got := takeAsync(s, TurnOptions{Hold: true, Wait: time.Minute, OpTimeout: time.Second})
	waitFor(t, "the waiter to queue", func() bool { return c.LLen(ctx, s.queueKey(session)).Val() == 1 })
	time.Sleep(100 * time.Millisecond)

	srv.Restart(t)
	select {
	case r := <-got:
		mustNoErr(t, r.err)
		mustNoErr(t, r.l.Release(ctx))
	case <-time.After(10 * time.Second):
		t.Fatalf("the waiter still waits 10 s after Redis came back without the lease")
	}
}

// TestRedisDeadHolderAndDeadWaiter: the process that held the lease dies
// with a request of its own queued first (a double click), and a request
// waits on another instance. It goes on as soon as both the dead holder's
// lease and the dead waiter's place have run out (the TTL), not a further
// half TTL later.
func TestRedisDeadHolderAndDeadWaiter(t *testing.T) {
	c := redistest.Start(t).Client(t)
	const ttl = 4 * time.Second
	s := NewRedis(c, "t", WithLeaseTTL(ttl))
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	_, dead, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	dead.ended() // its process dies: no renewal, no release
	time.Sleep(ttl / 2)
	// Its waiter checked a moment before the process died: its place lasts
	// a TTL from then, a little past the lease.
	now, err := c.Time(ctx).Result()
	mustNoErr(t, err)
	deadline := now.Add(ttl/2 + 300*time.Millisecond)
	mustNoErr(t, c.RPush(ctx, s.queueKey(session), "dead-waiter").Err())
	mustNoErr(t, c.HSet(ctx, s.waitersKey(session), "dead-waiter", deadline.UnixMilli()).Err())

	r := <-takeAsync(s, TurnOptions{Hold: true, Wait: time.Minute})
	mustNoErr(t, r.err)
	defer func() { _ = r.l.Release(ctx) }()
	want := time.Until(deadline) + r.waited // from the waiter's start
	t.Logf("waited %s; the dead waiter's place ran out after %s", r.waited, want)
	if r.waited > want+time.Second {
		t.Errorf("the waiter went on %s after the dead waiter's place ran out, want at once", r.waited-want)
	}
}

// TestRedisLostLeaseHolderRecordsWithoutReleasing: a holder whose lease
// ran out while its reply still ran (its renewals failed for a TTL) finds
// another request holding the turn when its turn is written: its turn is
// recorded (it was answered), and the other request keeps the turn (a
// third still waits for it).
func TestRedisLostLeaseHolderRecordsWithoutReleasing(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t", WithLeaseTTL(time.Second))
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	_, stale, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	// Its renewals failed for a TTL (the store unreachable from its
	// process): the lease is gone, as when it runs out...
	mustNoErr(t, c.Del(ctx, s.leaseKey(session)).Err())
	// ...and the next request takes the turn.
	r := <-takeAsync(s, TurnOptions{Hold: true, Wait: time.Minute})
	mustNoErr(t, r.err)
	third := takeAsync(s, TurnOptions{Hold: true, Wait: time.Minute})
	waitFor(t, "the third request to queue", func() bool { return c.LLen(ctx, s.queueKey(session)).Val() == 1 })

	if _, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0 + 1, Lease: stale}, Policy{}); err != nil {
		t.Fatalf("the stale holder's turn: %v", err)
	}
	w, err := s.Window(ctx, session, 20, t0+1, Policy{})
	mustNoErr(t, err)
	if len(w.Messages) != 2 {
		t.Fatalf("got %d messages, want the stale holder's turn recorded", len(w.Messages))
	}
	if busy, _ := s.Busy(ctx, session); !busy {
		t.Fatal("the stale holder's append gave back a lease it no longer held")
	}
	select {
	case r3 := <-third:
		t.Fatalf("the third request went on (%v) while the second still held the turn", r3.err)
	case <-time.After(300 * time.Millisecond):
	}
	mustNoErr(t, r.l.Release(ctx))
	r3 := <-third
	mustNoErr(t, r3.err)
	mustNoErr(t, r3.l.Release(ctx))
}

// TestRejectBurst: 20 requests at once on a free session, ordering:
// reject: one takes the turn, every other gets ErrBusy at once, none is
// left queued, and the session is free again once the one is done.
func TestRejectBurst(t *testing.T) {
	for name, newStore := range map[string]func(t *testing.T) leaseStore{
		"memory": func(t *testing.T) leaseStore { return NewMemory() },
		"redis": func(t *testing.T) leaseStore {
			s := NewRedis(redistest.Start(t).Client(t), "t")
			t.Cleanup(func() { _ = s.Close() })
			return s
		},
	} {
		t.Run(name, func(t *testing.T) {
			s := newStore(t)
			ctx := context.Background()
			type res struct {
				l   *Lease
				err error
			}
			out := make(chan res, 20)
			startGate := make(chan struct{})
			for range 20 {
				go func() {
					<-startGate
					_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
					out <- res{l, err}
				}()
			}
			close(startGate)
			var won *Lease
			for range 20 {
				r := <-out
				switch {
				case r.err == nil && won == nil:
					won = r.l
				case r.err == nil:
					t.Fatal("two requests hold the turn at once")
				case !errors.Is(r.err, ErrBusy):
					t.Fatalf("got %v, want ErrBusy", r.err)
				}
			}
			if won == nil {
				t.Fatal("no request took the free session's turn")
			}
			if _, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0, Lease: won}, Policy{}); err != nil {
				t.Fatal(err)
			}
			_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, TurnOptions{Hold: true})
			mustNoErr(t, err)
			mustNoErr(t, l.Release(ctx))
		})
	}
}

// TestRedisWaiterWhoLeavesDoesNotStallTheQueue: the request first in line
// gives up (its client left) while the turn is held; when the holder is
// done, the request behind it goes on at once, not when the leaver's place
// would have run out (a TTL, here 40 s).
func TestRedisWaiterWhoLeavesDoesNotStallTheQueue(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t", WithLeaseTTL(40*time.Second))
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	_, holder, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
	mustNoErr(t, err)
	lctx, leave := context.WithCancel(ctx)
	left := make(chan error, 1)
	go func() {
		_, _, err := s.TakeTurn(lctx, session, 20, t0, Policy{}, hold)
		left <- err
	}()
	waitFor(t, "the first waiter to queue", func() bool { return c.LLen(ctx, s.queueKey(session)).Val() == 1 })
	second := takeAsync(s, TurnOptions{Hold: true, Wait: time.Minute})
	waitFor(t, "the second waiter to queue", func() bool { return c.LLen(ctx, s.queueKey(session)).Val() == 2 })
	leave()
	if err := <-left; err == nil {
		t.Fatal("the waiter whose client left got the turn")
	}
	waitFor(t, "the leaver to leave the queue", func() bool { return c.LLen(ctx, s.queueKey(session)).Val() == 1 })
	mustNoErr(t, holder.Release(ctx))
	select {
	case r := <-second:
		mustNoErr(t, r.err)
		mustNoErr(t, r.l.Release(ctx))
	case <-time.After(10 * time.Second):
		t.Fatal("the request behind a waiter that left still waits 10 s after the turn was given back")
	}
}

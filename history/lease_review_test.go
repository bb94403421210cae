package history

import (
	"context"
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

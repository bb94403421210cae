package history

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// beatLog is a leaseBackend that records the lease's beats: when each
// began, what it wrote, and how many ran at once. A beat waits on gate
// when it is set.
type beatLog struct {
	mu        sync.Mutex
	starts    []time.Time
	writes    []string // the content of each delta written
	inFlight  int
	overlap   bool          // two beats ran at once
	gate      chan struct{} // when set, a beat waits for it
	mark      string        // the watch mark beats report
	beginning chan struct{} // a beat began (buffered)
	released  bool          // release was called: beats find the lease gone
}

func newBeatLog(mark string) *beatLog {
	return &beatLog{mark: mark, beginning: make(chan struct{}, 100)}
}

func (b *beatLog) beat(ctx context.Context, _ *Lease, d *Delta) (bool, string, error) {
	b.mu.Lock()
	b.inFlight++
	b.overlap = b.overlap || b.inFlight > 1
	b.starts = append(b.starts, time.Now())
	if d != nil {
		b.writes = append(b.writes, d.Content)
	}
	gate, mark := b.gate, b.mark
	b.mu.Unlock()
	select {
	case b.beginning <- struct{}{}:
	default:
	}
	if gate != nil {
		<-gate
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.inFlight--
	return !b.released, mark, nil
}

func (b *beatLog) release(context.Context, *Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.released = true
	return nil
}

func (b *beatLog) snapshot() (starts []time.Time, writes []string, overlap bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]time.Time(nil), b.starts...), append([]string(nil), b.writes...), b.overlap
}

// TestLeaseRenewsUntilReleased: a held lease is renewed every interval
// (a third of its TTL) from its timer, one beat at a time, and not once
// it is released (but for a renewal that had begun).
func TestLeaseRenewsUntilReleased(t *testing.T) {
	b := newBeatLog("")
	l := newLease(session, b, "", 60*time.Millisecond, time.Second, nil, nil) // renewed every 20 ms
	l.start()
	waitFor(t, "5 renewals", func() bool { starts, _, _ := b.snapshot(); return len(starts) >= 5 })
	mustNoErr(t, l.Release(context.Background()))
	starts, _, overlap := b.snapshot()
	for i := 1; i < len(starts); i++ {
		if gap := starts[i].Sub(starts[i-1]); gap < 20*time.Millisecond {
			t.Errorf("renewal %d came %s after the one before, want 20 ms at least", i, gap)
		}
	}
	if overlap {
		t.Error("two beats ran at once")
	}
	time.Sleep(100 * time.Millisecond)
	if after, _, _ := b.snapshot(); len(after) > len(starts)+1 {
		t.Errorf("%d renewals after the release, want none but one that had begun", len(after)-len(starts))
	}
}

// TestLeaseWritesWatchedFragments: a watched lease writes a fragment at
// once, merges those that come while a write is in flight and for
// minDeltaGap after it into the next write, and writes none once
// released, a write in flight at the release included.
func TestLeaseWritesWatchedFragments(t *testing.T) {
	b := newBeatLog("1")
	b.gate = make(chan struct{})
	l := newLease(session, b, "1", DefaultLeaseTTL, time.Second, nil, nil)
	l.start()
	start := time.Now()
	l.Publish(Delta{Content: "a"})
	<-b.beginning
	if waited := time.Since(start); waited > 500*time.Millisecond {
		t.Errorf("the first fragment was written after %s, want at once", waited)
	}
	// Written meanwhile: merged into one write, after the gap.
	l.Publish(Delta{Content: "b"})
	l.Publish(Delta{Content: "c"})
	b.gate <- struct{}{}
	<-b.beginning
	b.gate <- struct{}{}
	// A write in flight when the lease is released.
	l.Publish(Delta{Content: "d"})
	<-b.beginning
	mustNoErr(t, l.Release(context.Background()))
	l.Publish(Delta{Content: "e"})
	close(b.gate)
	time.Sleep(100 * time.Millisecond)

	starts, writes, overlap := b.snapshot()
	if want := []string{"a", "bc", "d"}; len(writes) != len(want) || writes[0] != want[0] || writes[1] != want[1] || writes[2] != want[2] {
		t.Errorf("wrote %q, want %q", writes, want)
	}
	for i := 1; i < len(starts); i++ {
		if gap := starts[i].Sub(starts[i-1]); gap < minDeltaGap {
			t.Errorf("write %d came %s after the one before, want %s at least", i, gap, minDeltaGap)
		}
	}
	if overlap {
		t.Error("two beats ran at once")
	}
}

// lockedBuffer is a log's output, written from the lease's timer.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *lockedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestLeaseRenewalCrossingReleaseIsNotLost: a renewal in flight when the
// lease is released (by Release, or the turn's append) finds the lease
// gone; that is its end, not a lease lost to its TTL, and logs no warning
// (it did: "turn lease lost before its turn was recorded").
func TestLeaseRenewalCrossingReleaseIsNotLost(t *testing.T) {
	b := newBeatLog("")
	b.gate = make(chan struct{})
	var out lockedBuffer
	l := newLease(session, b, "", 60*time.Millisecond, time.Second, nil, slog.New(slog.NewTextHandler(&out, nil)))
	l.start()
	<-b.beginning // a renewal, held at the gate
	mustNoErr(t, l.Release(context.Background()))
	close(b.gate)
	time.Sleep(100 * time.Millisecond)
	if got := out.String(); got != "" {
		t.Errorf("logged %q, want nothing", got)
	}
}

// failingStore is a lease backend whose every beat fails at once, as a
// Redis that refuses connections does.
type failingStore struct {
	mu     sync.Mutex
	writes int // beats that carried a delta
	beats  int
}

func (f *failingStore) beat(_ context.Context, _ *Lease, d *Delta) (bool, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.beats++
	if d != nil {
		f.writes++
	}
	return false, "", errors.New("dial tcp 127.0.0.1:6379: connect: connection refused")
}

func (f *failingStore) release(context.Context, *Lease) error { return nil }

// TestLeaseFailedWriteWaitsForRenewal: a delta write that fails is tried
// again with the next renewal (carrying the whole reply), not at the next
// fragment: a store that fails at once would otherwise get a write, of
// the whole reply so far, for every fragment of every open stream.
func TestLeaseFailedWriteWaitsForRenewal(t *testing.T) {
	f := &failingStore{}
	l := newLease(session, f, "1", DefaultLeaseTTL, time.Second, nil, nil) // renewed every second
	l.start()
	defer func() { _ = l.Release(context.Background()) }()
	for range 100 {
		l.Publish(Delta{Content: "x"})
		time.Sleep(2 * time.Millisecond)
	}
	f.mu.Lock()
	writes := f.writes
	f.mu.Unlock()
	if writes > 2 {
		t.Errorf("%d writes tried for 100 fragments in %s against a failing store, want the first and none before the next renewal", writes, 100*2*time.Millisecond)
	}
}

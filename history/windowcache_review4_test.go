package history

import (
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/metrics"
)

// TestWindowCacheReadsCountedOnceAfterWaiting: a take that waits for the
// turn (its first scripts find the session busy) counts once, when granted.
func TestWindowCacheReadsCountedOnceAfterWaiting(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s, reg := observedStore(t, c)
	a := "chat:a@example.com:support"
	appendQA(t, s, a, 0, t0, Policy{})
	_, l, err := s.TakeTurn(ctx, a, 6, t0+1, Policy{}, TurnOptions{Hold: true, Wait: time.Second})
	mustNoErr(t, err)
	cacheReads(t, reg, "the holder's take", 0, 1, 0)
	done := make(chan error, 1)
	go func() {
		_, _, err := s.TakeTurn(ctx, a, 6, t0+2, Policy{}, TurnOptions{Wait: 5 * time.Second})
		done <- err
	}()
	// Released once the waiter is queued, so that it has re-tried.
	for deadline := time.Now().Add(5 * time.Second); ; {
		if n, _ := c.LLen(ctx, s.queueKey(a)).Result(); n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the waiter never queued")
		}
		time.Sleep(5 * time.Millisecond)
	}
	mustNoErr(t, l.Release(ctx))
	mustNoErr(t, <-done)
	cacheReads(t, reg, "after the waiter's take", 1, 1, 0)
}

// TestWindowCacheWindowNotCounted: Window (ordering off) reads by the
// script and neither uses nor counts the cache, as README says.
func TestWindowCacheWindowNotCounted(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s, reg := observedStore(t, c)
	appendQA(t, s, session, 0, t0, Policy{})
	for range 2 {
		_, err := s.Window(ctx, session, 6, t0+1, Policy{})
		mustNoErr(t, err)
	}
	cacheReads(t, reg, "two Window reads", 0, 0, 0)
}

// TestWindowCacheErasedAndWrittenAgainIsStale: a session erased by another
// instance and written again with at least the window's entries counts
// stale (README: "a session erased and written again"), not hit: none of
// the tail was used.
func TestWindowCacheErasedAndWrittenAgainIsStale(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s, reg := observedStore(t, c)
	other := NewRedis(c, "t")
	defer other.Close()
	a := "chat:a@example.com:support"
	appendQA(t, s, a, 0, t0, Policy{})
	takeNow(t, s, a, 2, t0+1, Policy{})
	cacheReads(t, reg, "first take", 0, 1, 0)
	if _, err := other.Erase(ctx, a); err != nil {
		t.Fatal(err)
	}
	appendQA(t, other, a, 8, t0+200, Policy{})
	appendQA(t, other, a, 9, t0+201, Policy{})
	if got := contents(takeNow(t, s, a, 2, t0+300, Policy{}).Messages); len(got) != 2 || got[0] != "q9" {
		t.Fatalf("after the erase: window %v, want q9 and a9", got)
	}
	cacheReads(t, reg, "after an erase elsewhere", 0, 1, 1)
}

// TestWindowCacheReadsCountedOnCluster: the cache and its counts work the
// same on a cluster.
func TestWindowCacheReadsCountedOnCluster(t *testing.T) {
	var c redis.UniversalClient = redistest.StartCluster(t).Client(t)
	s, reg := observedStore(t, c)
	a := "chat:a@example.com:support"
	appendQA(t, s, a, 0, t0, Policy{})
	takeNow(t, s, a, 4, t0+1, Policy{})
	appendQA(t, s, a, 1, t0+2, Policy{})
	takeNow(t, s, a, 4, t0+3, Policy{})
	cacheReads(t, reg, "cluster", 1, 1, 0)
}

// TestWindowCacheGaugesRace: scrapes during takes of many sessions (run
// with -race).
func TestWindowCacheGaugesRace(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s, reg := observedStore(t, c)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := "chat:" + string(rune('a'+g)) + "@example.com:support"
			for i := range 5 {
				if _, err := s.Append(context.Background(), id, Turn{Messages: qa(i), NowMs: t0 + int64(i)}, Policy{}); err != nil {
					t.Error(err)
					return
				}
				if _, _, err := s.TakeTurn(context.Background(), id, 4, t0+int64(i), Policy{}, TurnOptions{Wait: 5 * time.Second}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	stop := make(chan struct{})
	scraped := make(chan struct{})
	go func() {
		defer close(scraped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := reg.Gather(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	wg.Wait()
	close(stop)
	<-scraped
	cacheReads(t, reg, "4 sessions of 5 takes", 16, 4, 0)
	if v, _ := gathered(t, reg, "historyproxy_window_cache_sessions", ""); v != 4 {
		t.Errorf("sessions: got %v, want 4", v)
	}
}

// TestWindowCacheNewConversationKeepsTheTail: a take that finds no current
// conversation (the idle timeout passed, or the session was reset) reads
// no window, and the stream has not changed: it neither counts a stale
// tail nor drops it, so the next turn, the new conversation's, reads only
// what is new. It counted stale and dropped the tail, and the next turn
// counted a miss and read its whole window.
func TestWindowCacheNewConversationKeepsTheTail(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	h := &streamReads{}
	c.AddHook(h)
	s, reg := observedStore(t, c)
	idle := Policy{IdleTimeout: time.Hour}
	a := "chat:a@example.com:support"
	for i := range 2 {
		appendQA(t, s, a, i, t0+int64(i), idle)
	}
	takeNow(t, s, a, 6, t0+10, idle)
	cacheReads(t, reg, "the first take", 0, 1, 0)
	later := t0 + 2*time.Hour.Milliseconds()
	for _, step := range []struct {
		name  string
		start func()
	}{
		{"idle", func() {}},
		{"reset", func() { _, err := s.Reset(ctx, a); mustNoErr(t, err) }},
	} {
		step.start()
		if w := takeNow(t, s, a, 6, later, idle); w.ConversationID != "" || len(w.Messages) != 0 {
			t.Fatalf("%s: the take found %+v, want no conversation", step.name, w)
		}
		if s.cache.get(a) == nil {
			t.Fatalf("%s: the take that found no conversation dropped the tail", step.name)
		}
		_, stale := gathered(t, reg, "historyproxy_window_cache_reads_total", "stale")
		if v, _ := gathered(t, reg, "historyproxy_window_cache_reads_total", "stale"); v != 0 || !stale {
			t.Fatalf("%s: stale %v, want 0", step.name, v)
		}
		res := appendQA(t, s, a, 5, later, idle)
		later += 10
		want := [][2]string{{"+", "(" + idBefore(t, c, s.streamKey(a), res.IDs[0])}}
		h.take()
		if got := contents(takeNow(t, s, a, 6, later, idle).Messages); !slices.Equal(got, []string{"q5", "a5"}) {
			t.Fatalf("%s: the new conversation's window %v, want q5 a5", step.name, got)
		}
		if _, bounds := h.take(); !reflect.DeepEqual(bounds, want) {
			t.Fatalf("%s: the new conversation's first take read %v, want %v (only after the tail)", step.name, bounds, want)
		}
		later += 2 * time.Hour.Milliseconds()
	}
	cacheReads(t, reg, "the new conversations' takes", 2, 1, 0)
}

// windowScripts counts the windowScript runs a client sends.
type windowScripts struct{ n atomic.Int64 }

func (h *windowScripts) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *windowScripts) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if a := cmd.Args(); len(a) >= 2 && strings.EqualFold(fmt.Sprint(a[0]), "evalsha") && a[1] == windowScript.Hash() {
			h.n.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (h *windowScripts) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestWindowCacheHitWithASecondRead: turns written late to an older
// conversation crowd the current one's window out of the stream's newest
// n: the take reads the window again by the script, as one without the
// cache does, though its tail held, and counts a hit (README's row says
// so; it said a hit read only the entries after the tail).
func TestWindowCacheHitWithASecondRead(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	h := &windowScripts{}
	c.AddHook(h)
	s, reg := observedStore(t, c)
	a := "chat:a@example.com:support"
	idle := Policy{IdleTimeout: time.Hour}
	appendQA(t, s, a, 0, t0, idle)
	old := takeNow(t, s, a, 4, t0+1, idle).ConversationID
	later := t0 + 2*time.Hour.Milliseconds()
	appendQA(t, s, a, 1, later, idle) // a new conversation
	if w := takeNow(t, s, a, 4, later+1, idle); w.ConversationID == old {
		t.Fatal("no new conversation")
	}
	cacheReads(t, reg, "before the late turns", 1, 1, 0)
	for i := 2; i < 4; i++ {
		_, err := s.Append(ctx, a, Turn{Messages: qa(i), NowMs: later + 2, ConversationID: old}, idle)
		mustNoErr(t, err)
	}
	before := h.n.Load()
	if got := contents(takeNow(t, s, a, 4, later+3, idle).Messages); !slices.Equal(got, []string{"q1", "a1"}) {
		t.Fatalf("window %v, want q1 a1", got)
	}
	if h.n.Load() != before+1 {
		t.Fatalf("%d window scripts, want 1 (the late turns crowd the window out)", h.n.Load()-before)
	}
	cacheReads(t, reg, "the take after the late turns", 2, 1, 0)
}

// observedStore is a Redis store with a window cache whose reads are
// counted into a registry of its own; it closes with the test.
func observedStore(t *testing.T, c redis.UniversalClient) (*RedisStore, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	s := NewRedis(c, "t", WithWindowCacheObserver(metrics.New(reg, 0)))
	t.Cleanup(func() { s.Close() })
	return s, reg
}

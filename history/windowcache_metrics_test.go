package history

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/metrics"
)

var _ WindowCacheObserver = (*metrics.Metrics)(nil)

// cacheReads fails unless reg exports the window cache's reads as hit,
// miss and stale.
func cacheReads(t *testing.T, reg *prometheus.Registry, step string, hit, miss, stale int) {
	t.Helper()
	for _, r := range []struct {
		result string
		want   int
	}{{"hit", hit}, {"miss", miss}, {"stale", stale}} {
		v, ok := gathered(t, reg, "historyproxy_window_cache_reads_total", r.result)
		if !ok || v != float64(r.want) {
			t.Fatalf("%s: window_cache_reads_total{result=%q}: got %v (exported %v), want %d", step, r.result, v, ok, r.want)
		}
	}
}

// gathered returns the value of reg's series of family whose label
// (its only one, if any) is result ("" for none), and whether there is one.
func gathered(t *testing.T, reg *prometheus.Registry, family, result string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	mustNoErr(t, err)
	for _, mf := range mfs {
		if mf.GetName() != family {
			continue
		}
		for _, m := range mf.GetMetric() {
			var v string
			if ls := m.GetLabel(); len(ls) == 1 {
				v = ls[0].GetValue()
			}
			if v != result {
				continue
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue(), true
			}
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// TestWindowCacheReadsCounted: takes through a RedisStore with its cache
// on are counted, through package metrics, as hits (a tail used), misses
// (a new session; a tail shorter than the window; after a stale take) and stale (a trim, an erase by
// another instance), and the gauges report what the cache holds.
func TestWindowCacheReadsCounted(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	reg := prometheus.NewRegistry()
	m := metrics.New(reg, 0)
	s := NewRedis(c, "t", WithWindowCacheObserver(m))
	defer s.Close()
	other := NewRedis(c, "t") // another instance
	defer other.Close()
	cacheReads(t, reg, "at start", 0, 0, 0)

	a := "chat:a@example.com:support"
	for i := range 3 {
		appendQA(t, s, a, i, t0+int64(i), Policy{})
	}
	take := func(session string, n int) Window {
		t.Helper()
		return takeNow(t, s, session, n, t0+100, Policy{})
	}
	take(a, 4)
	cacheReads(t, reg, "a's first take", 0, 1, 0)
	take(a, 6)
	cacheReads(t, reg, "a take of more than a's tail holds", 0, 2, 0)
	appendQA(t, s, a, 3, t0+3, Policy{})
	take(a, 6)
	take(a, 4)
	cacheReads(t, reg, "two takes with a's tail", 2, 2, 0)
	take(a, 0) // reads no window: not counted
	cacheReads(t, reg, "a take of no messages", 2, 2, 0)

	// A trim (as retention's) changes the stream other than by appends.
	mustNoErr(t, c.XTrimMaxLen(ctx, s.streamKey(a), 5).Err())
	if w := take(a, 6); len(w.Messages) != 5 {
		t.Fatalf("after the trim: a window of %d messages, want 5", len(w.Messages))
	}
	cacheReads(t, reg, "after a trim", 2, 2, 1)
	take(a, 6) // the stale tail was dropped
	cacheReads(t, reg, "the take after a stale one", 2, 3, 1)

	// An erase by another instance, which cannot drop this one's tail,
	// and the session written again.
	if _, err := other.Erase(ctx, a); err != nil {
		t.Fatal(err)
	}
	appendQA(t, other, a, 9, t0+200, Policy{})
	if got := contents(take(a, 6).Messages); len(got) != 2 || got[0] != "q9" {
		t.Fatalf("after the erase: window %v, want q9 and a9", got)
	}
	cacheReads(t, reg, "after an erase elsewhere", 2, 3, 2)
	take(a, 6)
	cacheReads(t, reg, "a's tail read again", 2, 4, 2)

	bytes, sessions := s.cache.size()
	if bytes <= 0 || sessions != 1 {
		t.Fatalf("the cache holds %d bytes of %d sessions, want a's tail", bytes, sessions)
	}
	for _, g := range []struct {
		name string
		want int64
	}{{"historyproxy_window_cache_bytes", bytes}, {"historyproxy_window_cache_sessions", int64(sessions)}} {
		if v, ok := gathered(t, reg, g.name, ""); !ok || v != float64(g.want) {
			t.Errorf("%s: got %v (exported %v), want %d (what the cache holds)", g.name, v, ok, g.want)
		}
	}
}

// TestWindowCacheMissAfterEviction: a session whose tail was evicted
// (the cache has room for one of two sessions of the same size) counts a
// miss.
func TestWindowCacheMissAfterEviction(t *testing.T) {
	c := redistest.Start(t).Client(t)
	a, b := "chat:a@example.com:support", "chat:b@example.com:support"
	probe := NewRedis(c, "t")
	defer probe.Close()
	for _, id := range []string{a, b} {
		for i := range 3 {
			appendQA(t, probe, id, i, t0+int64(i), Policy{})
		}
	}
	// One session's tail, as a cache of its own counts it (a's and b's
	// are the same size: ids of one length, the same messages).
	takeNow(t, probe, a, 6, t0+10, Policy{})
	one, _ := probe.cache.size()

	reg := prometheus.NewRegistry()
	m := metrics.New(reg, 0)
	s := NewRedis(c, "t", WithWindowCacheBytes(2*one-1), WithWindowCacheObserver(m))
	defer s.Close()
	takeNow(t, s, a, 6, t0+10, Policy{})
	takeNow(t, s, a, 6, t0+11, Policy{})
	takeNow(t, s, b, 6, t0+12, Policy{})
	if s.cache.get(a) != nil || s.cache.get(b) == nil {
		t.Fatal("b's tail did not evict a's")
	}
	takeNow(t, s, a, 6, t0+13, Policy{})
	cacheReads(t, reg, "a, a, b, a evicted", 1, 3, 0)
	if v, _ := gathered(t, reg, "historyproxy_window_cache_sessions", ""); v != 1 {
		t.Errorf("historyproxy_window_cache_sessions: got %v, want 1", v)
	}
}

// TestWindowCacheOffExportsNothing: with the cache off the store neither
// registers the cache's metrics nor counts its takes.
func TestWindowCacheOffExportsNothing(t *testing.T) {
	c := redistest.Start(t).Client(t)
	reg := prometheus.NewRegistry()
	m := metrics.New(reg, 0)
	s := NewRedis(c, "t", WithWindowCacheObserver(m), WithWindowCacheBytes(0))
	defer s.Close()
	appendQA(t, s, session, 0, t0, Policy{})
	takeNow(t, s, session, 6, t0+1, Policy{})
	takeNow(t, s, session, 6, t0+2, Policy{})
	mfs, err := reg.Gather()
	mustNoErr(t, err)
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "historyproxy_window_cache") {
			t.Errorf("with the cache off, %s is exported", mf.GetName())
		}
	}
}

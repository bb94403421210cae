package metrics

import "github.com/prometheus/client_golang/prometheus"

// Results of historyproxy_window_cache_reads_total (see
// history.WindowCacheObserver for what each means).
const (
	cacheHit   = "hit"
	cacheMiss  = "miss"
	cacheStale = "stale"
)

// windowCache holds the metrics of a Redis store's window cache. They are
// built by New, so that counting needs no check, and registered only by
// WindowCacheOn: a memory store, or a Redis store with the cache off,
// exports none of them.
type windowCache struct {
	reads            *prometheus.CounterVec // result
	hit, miss, stale prometheus.Counter     // its children, resolved once
}

func newWindowCache() windowCache {
	c := windowCache{reads: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "window_cache_reads_total",
		Help: "Turns that read their session's window with the window cache on, by result: hit (the cached tail was used: the stream read only after it, and the window again only when turns written late to an older conversation crowd it out), miss (no tail to use: the session's first turn on this instance, its tail evicted, or one shorter than the window asked for) or stale (the tail no longer held: dropped, and the window read again).",
	}, []string{"result"})}
	// Resolved here, so a take adds to a counter without a label lookup,
	// and all three are exported at 0 from the start.
	c.hit = c.reads.WithLabelValues(cacheHit)
	c.miss = c.reads.WithLabelValues(cacheMiss)
	c.stale = c.reads.WithLabelValues(cacheStale)
	return c
}

var (
	windowCacheBytesDesc = prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "window_cache_bytes"),
		"Heap the window cache counts for the tails it holds (bounded by store.window_cache_bytes).", nil, nil)
	windowCacheSessionsDesc = prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "window_cache_sessions"),
		"Sessions whose newest entries the window cache holds.", nil, nil)
)

// cacheHeld exports what the window cache holds, read from it at each
// scrape: both figures from one call, so they describe the same moment.
type cacheHeld func() (bytes int64, sessions int)

func (h cacheHeld) Describe(ch chan<- *prometheus.Desc) {
	ch <- windowCacheBytesDesc
	ch <- windowCacheSessionsDesc
}

func (h cacheHeld) Collect(ch chan<- prometheus.Metric) {
	bytes, sessions := h()
	ch <- prometheus.MustNewConstMetric(windowCacheBytesDesc, prometheus.GaugeValue, float64(bytes))
	ch <- prometheus.MustNewConstMetric(windowCacheSessionsDesc, prometheus.GaugeValue, float64(sessions))
}

// WindowCacheOn registers the window cache's metrics, for a store whose
// cache is on: the reads at 0 by each result, and what held reports,
// read at scrape time. It panics when called twice on one Metrics, as New
// does for a registry used twice: one process has one store.
func (m *Metrics) WindowCacheOn(held func() (bytes int64, sessions int)) {
	m.reg.MustRegister(m.cache.reads, cacheHeld(held))
}

// WindowCacheHit counts a turn that used its session's cached tail.
func (m *Metrics) WindowCacheHit() { m.cache.hit.Inc() }

// WindowCacheMiss counts a turn that had no cached tail to use.
func (m *Metrics) WindowCacheMiss() { m.cache.miss.Inc() }

// WindowCacheStale counts a turn whose cached tail no longer held.
func (m *Metrics) WindowCacheStale() { m.cache.stale.Inc() }

package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// leaseWaitBuckets spans a free session (0) to the longest ordering
// timeout a deployment would set.
var leaseWaitBuckets = []float64{0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300}

// BusyReasons are the values of historyproxy_busy_rejections_total's
// "reason" label: the agent rejects a busy session at once, or the wait
// for the turn passed ordering_timeout.
var BusyReasons = []string{"reject", "timeout"}

// live holds the metrics of ordered turns, generations and watches.
type live struct {
	leaseWait   *prometheus.HistogramVec // channel, agent
	busy        *prometheus.CounterVec   // channel, agent, reason
	generations prometheus.Gauge
	watches     prometheus.Gauge
	published   prometheus.Counter
	dropped     prometheus.Counter
}

func newLive() live {
	l := live{
		leaseWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "lease_wait_seconds",
			Help:    "Time a chat request waited for its session's turn (another request of the session was generating); 0 when the session was free.",
			Buckets: leaseWaitBuckets,
		}, []string{"channel", "agent"}),
		busy: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "busy_rejections_total",
			Help: "Chat requests answered 409 conversation_busy, by reason: reject (the agent's ordering is reject) or timeout (ordering_timeout passed).",
		}, []string{"channel", "agent", "reason"}),
		generations: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "active_generations",
			Help: "Turn leases this instance holds: requests generating a reply that will be recorded.",
		}),
		watches: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "watches_open",
			Help: "Open watch streams (GET /admin/v1/sessions/{id}/watch) on this instance.",
		}),
		published: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "deltas_published_total",
			Help: "Reply deltas written for watchers (each may merge several upstream fragments).",
		}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "deltas_dropped_total",
			Help: "Reply deltas given up: a reply past what is kept for watchers, or a failed write (the next delta then carries the whole reply so far).",
		}),
	}
	return l
}

func (l live) collectors() []prometheus.Collector {
	return []prometheus.Collector{l.leaseWait, l.busy, l.generations, l.watches, l.published, l.dropped}
}

// observeOrdering records a session request's wait for its turn, or its
// 409 conversation_busy; the rejections exist at 0, for each reason, from
// the first session request of a channel and agent, so that a dashboard
// shows 0 rather than "no data" and rate() sees the first one.
func (l live) observeOrdering(r Request, channel, agent string) {
	for _, reason := range BusyReasons {
		c := l.busy.WithLabelValues(channel, agent, reason)
		if reason == r.Busy {
			c.Inc()
		}
	}
	if r.Busy == "" && r.Ordered {
		l.leaseWait.WithLabelValues(channel, agent).Observe(max(r.LeaseWait, 0).Seconds())
	}
}

// GenerationStarted and GenerationEnded bracket each turn lease held by
// this instance.
func (m *Metrics) GenerationStarted() { m.live.generations.Inc() }

// GenerationEnded: see GenerationStarted.
func (m *Metrics) GenerationEnded() { m.live.generations.Dec() }

// DeltasPublished counts reply deltas written for watchers.
func (m *Metrics) DeltasPublished(n int) { m.live.published.Add(float64(max(n, 0))) }

// DeltasDropped counts reply deltas given up.
func (m *Metrics) DeltasDropped(n int) { m.live.dropped.Add(float64(max(n, 0))) }

// WatchOpened and WatchClosed bracket each open watch stream.
func (m *Metrics) WatchOpened() { m.live.watches.Inc() }

// WatchClosed: see WatchOpened.
func (m *Metrics) WatchClosed() { m.live.watches.Dec() }

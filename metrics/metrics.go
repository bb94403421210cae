// Package metrics defines historyproxy's Prometheus metrics: what each proxied
// request cost, in tokens and dollars, per channel, agent, model and session,
// how long it took, and how the history store behaves.
//
// Every collector lives in a Metrics value registered on a registerer the
// caller chooses, never on the global default registry, so tests get a fresh
// registry each and the binary serves exactly what it registered.
//
// Label values that come from clients (model, channel, agent, session) are
// bounded, because each distinct value is a new time series that Prometheus
// keeps in memory: models, channels and agents are capped at a fixed number of
// distinct values, taken only by requests that reached the upstream and given
// back when unused for a while, and sessions at the limit given to New,
// dropping the least recently active session's series when a new one arrives.
//
// Costs are added up in whole nano-USD, so totals never drift by rounding,
// and exported in USD.
package metrics

import (
	"container/list"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const (
	namespace = "historyproxy"

	// DefaultSessionLimit is the number of sessions with per-session series
	// when New is given 0.
	DefaultSessionLimit = 10000

	// maxLabelValues caps the distinct values of each client-supplied label
	// (model, channel, agent). Models are free-form strings from request
	// bodies, and channel and agent come from session ids, so a client, by
	// mistake or on purpose, could otherwise mint a series per request. Values
	// past the cap are reported as otherValue. 100 is far above the handful
	// of models and agents a deployment really uses.
	maxLabelValues = 100

	// labelIdle is how long a model, channel or agent value must go unseen
	// before a new value may take its slot (deleting its series) once the
	// cap is full. Long enough that a value in use never churns, short
	// enough that junk values cannot hold the cap for long.
	labelIdle = time.Hour

	// maxLabelLen truncates absurdly long model, channel and agent values (a
	// 1 MB model name is an attack, not a model). Session labels are never
	// cut, since two sessions must never share a series; see SessionLabel.
	maxLabelLen = 256

	// otherValue stands for every value past a label's cap.
	otherValue = "other"
	// unknownValue stands for an empty value, which Prometheus would treat as
	// a missing label.
	unknownValue = "unknown"
)

// Token types, the values of the "type" label.
const (
	tokenPrompt     = "prompt"
	tokenCompletion = "completion"
	tokenCached     = "cached"
	tokenReasoning  = "reasoning"
	tokenHistory    = "history"
)

// tokenTypes lists every value of the "type" label, so that evicting a
// session deletes each of its series by exact labels instead of scanning all
// series with DeletePartialMatch.
var tokenTypes = []string{tokenPrompt, tokenCompletion, tokenCached, tokenReasoning, tokenHistory}

// Buckets, in base units. LLM calls are slow and long-tailed, the proxy's own
// work and Redis are fast, so each histogram gets its own range.
var (
	// requestBuckets spans a cached short completion to a long reasoning
	// stream: the upstream may take up to its 10-minute timeout before the
	// first byte, and a stream may run on after that.
	requestBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800}
	// ttftBuckets is where users notice (under a second feels live), up to
	// reasoning models that think for minutes before the first token, and
	// the upstream's 10-minute timeout.
	ttftBuckets = []float64{0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600}
	// overheadBuckets is what the proxy adds around the upstream call:
	// reading history, counting tokens, rewriting the body.
	overheadBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}
	// storeBuckets is a Redis round trip, from loopback to a distant replica.
	storeBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}
	// historyMessageBuckets starts at 0 to count first turns with no history.
	historyMessageBuckets = []float64{0, 1, 2, 5, 10, 20, 50, 100, 200, 500}
	// historyTokenBuckets doubles up to the largest context windows.
	historyTokenBuckets = []float64{0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072}
)

// Metrics holds every historyproxy collector. Its methods are safe for
// concurrent use. Build it with New; the zero value is not usable.
type Metrics struct {
	// labelMu is held shared by every request observation and exclusively
	// while a model, channel or agent value gives its slot back, so that no
	// observation can recreate a series being deleted (a series nothing
	// tracks would never be deleted).
	labelMu                  sync.RWMutex
	models, channels, agents *valueCap

	requests     *prometheus.CounterVec // channel, agent, model, code
	tokens       *prometheus.CounterVec // channel, agent, model, type, purpose
	cost         *nanoVec               // channel, agent, model, purpose
	estimated    *prometheus.CounterVec // channel, agent, model
	unpriced     *prometheus.CounterVec // model
	truncated    *prometheus.CounterVec // channel, agent
	duration     *prometheus.HistogramVec
	upstream     *prometheus.HistogramVec
	ttft         *prometheus.HistogramVec
	upstreamTTFT *prometheus.HistogramVec
	overhead     *prometheus.HistogramVec
	histMsgs     *prometheus.HistogramVec
	histTokens   *prometheus.HistogramVec

	sessionLabel   SessionLabel
	sessions       sessionLRU
	sessionTokens  *prometheus.CounterVec // session, type
	sessionCost    *nanoVec               // session
	evictions      prometheus.Counter
	sessionsActive prometheus.Gauge

	storeDuration *prometheus.HistogramVec // op
	storeErrors   *prometheus.CounterVec   // op
	storeUp       prometheus.Gauge
	retryDepth    prometheus.Gauge
	retries       *prometheus.CounterVec // result
	retryDropped  prometheus.Counter

	background *prometheus.CounterVec // purpose, result

	live live

	// reg is where New registered the collectors, and WindowCacheOn
	// registers the window cache's.
	reg   prometheus.Registerer
	cache windowCache

	// recent tallies the last day a minute at a time, for the console.
	recent Recent
}

// Recent is the last day's tally of requests, tokens and cost by agent
// and model, as this process counted them.
func (m *Metrics) Recent() *Recent { return &m.recent }

// Option changes how New builds the metrics.
type Option func(*Metrics)

// WithSessionLabel sets how a session id becomes the value of the
// "session" label (and whether there are per-session series at all). The
// default is SessionLabel's zero value: the id itself.
func WithSessionLabel(l SessionLabel) Option {
	return func(m *Metrics) { m.sessionLabel = l }
}

// New builds the metrics and registers every collector on reg. It panics if
// a collector is already registered there, as MustRegister does: that is a
// programming error (New called twice on one registry).
//
// sessionLimit caps how many sessions have per-session series at once; 0 or
// less means DefaultSessionLimit.
func New(reg prometheus.Registerer, sessionLimit int, opts ...Option) *Metrics {
	if sessionLimit <= 0 {
		sessionLimit = DefaultSessionLimit
	}
	caa := []string{"channel", "agent"}
	cam := []string{"channel", "agent", "model"}
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "requests_total",
			Help: "Proxied requests by the HTTP status code returned to the client.",
		}, append(cam, "code")),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "tokens_total",
			Help: "Tokens of requests the upstream answered with success, by type: prompt, completion, cached and reasoning as the upstream reported them (or estimated); history is the part of prompt the proxy injected. By purpose: chat (proxied requests), compaction and title (the proxy's own background calls).",
		}, append(slices.Clone(cam), "type", "purpose")),
		cost: newNanoVec(prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "cost_usd_total"),
			"Cost in US dollars, from the price table, by purpose: chat (proxied requests), compaction and title (background calls); added up in whole nano-USD, so it never drifts by rounding.",
			append(slices.Clone(cam), "purpose"), nil)),
		estimated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "estimated_usage_requests_total",
			Help: "Requests whose token counts are local estimates because the upstream reported no usage.",
		}, cam),
		unpriced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "unpriced_requests_total",
			Help: "Requests that used tokens of a model with no price in the table, so their cost is missing from historyproxy_cost_usd_total.",
		}, []string{"model"}),
		truncated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "history_truncated_total",
			Help: "Requests whose available history was cut to fit the history token budget.",
		}, caa),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "request_duration_seconds",
			Help:    "Time from receiving a request to sending the end of its response.",
			Buckets: requestBuckets,
		}, caa),
		upstream: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "upstream_duration_seconds",
			Help:    "Time spent in the upstream call, for requests that reached the upstream.",
			Buckets: requestBuckets,
		}, caa),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "time_to_first_token_seconds",
			Help:    "Time from receiving a streaming request to relaying its first token, the proxy's own work (history read, counting) included.",
			Buckets: ttftBuckets,
		}, caa),
		upstreamTTFT: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "upstream_time_to_first_token_seconds",
			Help:    "Time from forwarding a streaming request to the upstream to its first token: the upstream's own share of historyproxy_time_to_first_token_seconds.",
			Buckets: ttftBuckets,
		}, caa),
		overhead: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "proxy_overhead_seconds",
			Help:    "Request duration minus upstream duration: the time the proxy itself adds.",
			Buckets: overheadBuckets,
		}, caa),
		histMsgs: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "history_injected_messages",
			Help:    "Messages of stored history injected into each session request.",
			Buckets: historyMessageBuckets,
		}, caa),
		histTokens: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "history_injected_tokens",
			Help:    "Tokens of stored history injected into each session request.",
			Buckets: historyTokenBuckets,
		}, caa),

		sessions: newSessionLRU(sessionLimit),
		sessionTokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "session_tokens_total",
			Help: "Tokens by type per session, for the most recently active sessions only (see historyproxy_session_series_evictions_total).",
		}, []string{"session", "type"}),
		sessionCost: newNanoVec(prometheus.NewDesc(prometheus.BuildFQName(namespace, "", "session_cost_usd_total"),
			"Cost in US dollars per session, for the most recently active sessions only; added up in whole nano-USD.",
			[]string{"session"}, nil)),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "session_series_evictions_total",
			Help: "Sessions whose per-session series were deleted to stay under the session limit.",
		}),
		sessionsActive: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "sessions_tracked",
			Help: "Sessions that currently have per-session series.",
		}),

		storeDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "store_operation_duration_seconds",
			Help:    "Duration of history store operations, failed ones included.",
			Buckets: storeBuckets,
		}, []string{"op"}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "store_errors_total",
			Help: "History store operations that returned an error.",
		}, []string{"op"}),
		storeUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "store_up",
			Help: "Whether the history store answered its last check (1) or not (0).",
		}),
		retryDepth: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "retry_queue_depth",
			Help: "Turns waiting to be written to the history store after a failed write.",
		}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "retry_attempts_total",
			Help: "Attempts to write a queued turn to the history store, by result (ok or error).",
		}, []string{"result"}),
		retryDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "retry_dropped_total",
			Help: "Queued turns given up on (queue full or retries exhausted): history lost.",
		}),
		background: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "background_calls_total",
			Help: "The proxy's own upstream calls, by purpose (compaction, title) and result: ok, error (nothing stored; retried later) or dropped (the queue was full).",
		}, []string{"purpose", "result"}),
		live:  newLive(),
		reg:   reg,
		cache: newWindowCache(),
	}
	// A value giving its slot back takes every series it labels with it.
	m.models = newValueCap(maxLabelValues, labelIdle, func(v string) {
		m.deleteLabel("model", v, m.requests, m.tokens, m.estimated, m.unpriced)
		m.cost.deleteMatching(2, v)
	})
	m.channels = newValueCap(maxLabelValues, labelIdle, func(v string) {
		m.deleteLabel("channel", v, m.requests, m.tokens, m.estimated, m.truncated, m.duration, m.upstream,
			m.ttft, m.upstreamTTFT, m.overhead, m.histMsgs, m.histTokens, m.live.leaseWait, m.live.busy)
		m.cost.deleteMatching(0, v)
	})
	m.agents = newValueCap(maxLabelValues, labelIdle, func(v string) {
		m.deleteLabel("agent", v, m.requests, m.tokens, m.estimated, m.truncated, m.duration, m.upstream,
			m.ttft, m.upstreamTTFT, m.overhead, m.histMsgs, m.histTokens, m.live.leaseWait, m.live.busy)
		m.cost.deleteMatching(1, v)
	})
	for _, o := range opts {
		o(m)
	}
	// Both results exist from the start so rate() over them works before the
	// first retry, and a dashboard shows 0 rather than "no data".
	m.retries.WithLabelValues("ok")
	m.retries.WithLabelValues("error")
	for _, p := range []string{PurposeCompaction, PurposeTitle} {
		for _, r := range []string{ResultOK, ResultError, ResultDropped} {
			m.background.WithLabelValues(p, r)
		}
	}
	// The same for the store operations the proxy makes.
	for _, op := range StoreOps {
		m.storeErrors.WithLabelValues(op)
		m.storeDuration.WithLabelValues(op)
	}

	reg.MustRegister(
		m.requests, m.tokens, m.cost, m.estimated, m.unpriced, m.truncated,
		m.duration, m.upstream, m.ttft, m.upstreamTTFT, m.overhead, m.histMsgs, m.histTokens,
		m.sessionTokens, m.sessionCost, m.evictions, m.sessionsActive,
		m.storeDuration, m.storeErrors, m.storeUp,
		m.retryDepth, m.retries, m.retryDropped, m.background,
	)
	reg.MustRegister(m.live.collectors()...)
	return m
}

// partialDeleter is a metric vector whose series can be deleted by one label.
type partialDeleter interface {
	DeletePartialMatch(prometheus.Labels) int
}

// deleteLabel deletes every series of vecs whose label name is v.
func (m *Metrics) deleteLabel(name, v string, vecs ...partialDeleter) {
	for _, vec := range vecs {
		vec.DeletePartialMatch(prometheus.Labels{name: v})
	}
}

// NewRegistry returns a fresh registry with the Go runtime and process
// collectors. The binary serves this one, never the global default, so that
// nothing a dependency registers globally leaks into the exposition.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// Handler serves reg in the Prometheus text format, or OpenMetrics when the
// scraper asks for it. Errors while gathering are counted on reg
// (promhttp_metric_handler_errors_total) and answered with a 500.
func Handler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		Registry:          reg,
		EnableOpenMetrics: true,
	})
}

// Request is everything known about one proxied request when it ends.
type Request struct {
	// Channel, Agent and Model label the request. "" is allowed and reported
	// as "unknown"; values beyond the label caps are reported as "other".
	Channel, Agent, Model string
	// Reached says the upstream answered the request (any status). Only
	// such requests may give a new model, channel or agent value a label of
	// its own: a request rejected before forwarding is reported under values
	// already known, else "other", so junk cannot fill the caps.
	Reached bool
	// Session is the session id; "" means a stateless request, which has no
	// per-session series and no history histograms.
	Session string
	// Code is the HTTP status returned to the client.
	Code   int
	Stream bool
	// Duration is the whole request; Upstream the upstream call (0: the
	// request never reached the upstream). TTFT is the time from the
	// request's arrival to its first token, UpstreamTTFT from forwarding it
	// to the first token (0: not a stream, or no token was sent).
	Duration, Upstream, TTFT, UpstreamTTFT time.Duration
	// Billed says the upstream answered with success, so the request's
	// prompt (history included) and reply were billed: the token counts,
	// HistoryTokens in the token counters, and the cost count only then.
	Billed bool
	// Token counts; values of 0 or less add nothing.
	PromptTokens, CompletionTokens, CachedTokens, ReasoningTokens int64
	// Estimated says the counts are local estimates, not upstream usage.
	Estimated bool
	// HistoryMessages and HistoryTokens were injected from the store; the
	// history histograms observe them for every session request.
	HistoryMessages, HistoryTokens int
	// HistoryTruncated says the available history was cut by the budget.
	HistoryTruncated bool
	// CostNanos is the cost in billionths of a US dollar; it counts only
	// when Billed and Priced. Priced false means the model has no price: a
	// billed request that used tokens is then counted in
	// historyproxy_unpriced_requests_total, so nobody is silently unbilled.
	CostNanos int64
	Priced    bool
	// Ordered says the request took its session's turn (its agent orders
	// turns) after waiting LeaseWait for it (0: the session was free).
	// Busy is the reason (BusyReasons) of a 409 conversation_busy answer.
	Ordered   bool
	LeaseWait time.Duration
	Busy      string
}

// labels are a request's label values after the caps.
type labels struct{ channel, agent, model string }

// ObserveRequest records one finished request in every request, token, cost
// and latency metric, and in its session's series.
func (m *Metrics) ObserveRequest(r Request) {
	m.labelMu.RLock()
	if l, ok := m.labels(r, false); ok {
		m.observe(r, l)
		m.labelMu.RUnlock()
		return
	}
	m.labelMu.RUnlock()
	// A value takes the slot of one unused for labelIdle, whose series are
	// deleted: rare, and done with every other observation held off.
	m.labelMu.Lock()
	defer m.labelMu.Unlock()
	l, _ := m.labels(r, true)
	m.observe(r, l)
}

// labels returns r's label values; ok is false when a value would take an
// idle value's slot but evict is false.
func (m *Metrics) labels(r Request, evict bool) (l labels, ok bool) {
	var okC, okA, okM bool
	l.channel, okC = m.channels.value(r.Channel, r.Reached, evict)
	l.agent, okA = m.agents.value(r.Agent, r.Reached, evict)
	l.model, okM = m.models.value(r.Model, r.Reached, evict)
	return l, okC && okA && okM
}

func (m *Metrics) observe(r Request, l labels) {
	channel, agent, model := l.channel, l.agent, l.model
	m.requests.WithLabelValues(channel, agent, model, strconv.Itoa(r.Code)).Inc()

	var counts [5]int64
	if r.Billed {
		counts = [...]int64{
			r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens,
			int64(r.HistoryTokens),
		}
	}
	for i, typ := range tokenTypes {
		// Adding 0 still creates the series, so every type of a known
		// channel/agent/model starts at 0 and rate() sees its first increase.
		addNonNegative(m.tokens.WithLabelValues(channel, agent, model, typ, PurposeChat), float64(counts[i]))
	}
	// The counters that count only some requests exist, at 0, from the
	// first request of their channel, agent and model, so that a dashboard
	// shows 0 rather than "no data" and rate() sees their first increase.
	unpriced := m.unpriced.WithLabelValues(model)
	estimated := m.estimated.WithLabelValues(channel, agent, model)
	// Cost too, at 0 until a billed, priced request adds to it (a model
	// with no price costs 0, and historyproxy_unpriced_requests_total says so).
	var costNanos int64
	switch {
	case !r.Billed:
		// Nothing was billed: no cost, and not an unbilled request either.
	case r.Priced:
		costNanos = max(r.CostNanos, 0)
	case r.PromptTokens > 0 || r.CompletionTokens > 0:
		unpriced.Inc()
	}
	m.cost.add(costNanos, channel, agent, model, PurposeChat)
	rc := RecentCounts{Requests: 1, PromptTokens: max(counts[0], 0), CompletionTokens: max(counts[1], 0),
		CachedTokens: max(counts[2], 0), HistoryTokens: max(counts[4], 0), CostNanos: costNanos}
	if r.Code >= 400 {
		rc.Errors = 1
	}
	m.recent.Add(time.Now(), RecentKey{Agent: agent, Model: model}, rc)
	if r.Billed && r.Estimated {
		estimated.Inc()
	}

	m.duration.WithLabelValues(channel, agent).Observe(r.Duration.Seconds())
	if r.Upstream > 0 {
		m.upstream.WithLabelValues(channel, agent).Observe(r.Upstream.Seconds())
		// A clock step could make this negative; the proxy never takes
		// negative time.
		m.overhead.WithLabelValues(channel, agent).Observe(max(r.Duration-r.Upstream, 0).Seconds())
	}
	if r.Stream && r.TTFT > 0 {
		m.ttft.WithLabelValues(channel, agent).Observe(r.TTFT.Seconds())
	}
	if r.Stream && r.UpstreamTTFT > 0 {
		m.upstreamTTFT.WithLabelValues(channel, agent).Observe(r.UpstreamTTFT.Seconds())
	}

	if r.Session == "" {
		return
	}
	m.live.observeOrdering(r, channel, agent)
	// Only session requests have history; observing stateless ones as 0 would
	// drown the distribution.
	m.histMsgs.WithLabelValues(channel, agent).Observe(float64(max(r.HistoryMessages, 0)))
	m.histTokens.WithLabelValues(channel, agent).Observe(float64(max(r.HistoryTokens, 0)))
	if truncated := m.truncated.WithLabelValues(channel, agent); r.HistoryTruncated {
		truncated.Inc()
	}
	var cost int64
	if r.Billed && r.Priced {
		cost = r.CostNanos
	}
	if session, ok := m.sessionLabel.Label(r.Session); ok {
		m.observeSession(session, counts, cost)
	}
}

// observeSession adds a request's tokens and cost to its session's series,
// making room by evicting the least recently active session when the limit
// is reached. A request that adds nothing neither creates series nor takes
// a slot, so it cannot evict a session that has some.
func (m *Metrics) observeSession(session string, counts [5]int64, costNanos int64) {
	adds := costNanos > 0
	for _, n := range counts {
		adds = adds || n > 0
	}
	if !adds {
		return
	}
	l := &m.sessions
	l.mu.Lock()
	// The counters are updated under the lock too: otherwise a concurrent
	// eviction of this session could run between the touch and the Add, and
	// the Add would recreate series that nothing tracks, and so nothing ever
	// deletes.
	defer l.mu.Unlock()
	if evicted, ok := l.touch(session); ok {
		for _, typ := range tokenTypes {
			m.sessionTokens.DeleteLabelValues(evicted, typ)
		}
		m.sessionCost.delete(evicted)
		m.evictions.Inc()
	}
	m.sessionsActive.Set(float64(l.order.Len()))

	for i, typ := range tokenTypes {
		// Unlike the aggregate series, only types the session used get a
		// series: sessions are many, and each series costs memory.
		if counts[i] > 0 {
			m.sessionTokens.WithLabelValues(session, typ).Add(float64(counts[i]))
		}
	}
	if costNanos > 0 {
		m.sessionCost.add(costNanos, session)
	}
}

// ForgetSession deletes the per-session series of session id and frees its
// place under the session limit, as erasing a session must leave none of
// its data behind. It is not counted as an eviction. Forgetting a session
// without series does nothing. It reports whether the session had series
// here; other instances keep theirs until they evict them or restart.
func (m *Metrics) ForgetSession(id string) bool {
	label, ok := m.sessionLabel.Label(id)
	if !ok {
		return false
	}
	l := &m.sessions
	l.mu.Lock()
	defer l.mu.Unlock()
	e, found := l.index[label]
	if found {
		l.order.Remove(e)
		delete(l.index, label)
	}
	for _, typ := range tokenTypes {
		m.sessionTokens.DeleteLabelValues(label, typ)
	}
	m.sessionCost.delete(label)
	m.sessionsActive.Set(float64(l.order.Len()))
	return found
}

// StoreOps are the store operations the proxy reports to ObserveStore;
// their series exist from the start.
var StoreOps = []string{"window", "append"}

// ObserveStore records one store operation ("window", "append", ...), its
// duration, and its error if err is not nil.
func (m *Metrics) ObserveStore(op string, d time.Duration, err error) {
	op = sanitize(op)
	m.storeDuration.WithLabelValues(op).Observe(d.Seconds())
	if err != nil {
		m.storeErrors.WithLabelValues(op).Inc()
	}
}

// SetRetryQueueDepth reports how many turns wait in the retry queue
// (fail_open mode: turns whose write to the store failed).
func (m *Metrics) SetRetryQueueDepth(n int) { m.retryDepth.Set(float64(n)) }

// RetryAttempt counts one attempt to write a queued turn, by whether it
// succeeded.
func (m *Metrics) RetryAttempt(ok bool) {
	result := "error"
	if ok {
		result = "ok"
	}
	m.retries.WithLabelValues(result).Inc()
}

// RetryDropped counts one queued turn given up on.
func (m *Metrics) RetryDropped() { m.retryDropped.Inc() }

// SetStoreUp sets whether the store answered its last check. Until the first
// call the store is reported down (0).
func (m *Metrics) SetStoreUp(up bool) {
	v := 0.0
	if up {
		v = 1
	}
	m.storeUp.Set(v)
}

// addNonNegative adds v to c, ignoring negative values, on which a counter
// would panic: a bad count from upstream must not take the proxy down.
func addNonNegative(c prometheus.Counter, v float64) {
	if v >= 0 {
		c.Add(v)
	}
}

// sanitize makes a client-supplied string a safe label value: the Prometheus
// client panics on invalid UTF-8, and a huge value would be stored in every
// sample.
func sanitize(v string) string {
	if len(v) > maxLabelLen {
		v = v[:maxLabelLen]
	}
	return strings.ToValidUTF8(v, "\uFFFD")
}

// valueCap bounds the distinct values of one label. A value takes a slot
// only when admitted (its request reached the upstream); once limit values
// hold slots, a new one takes the slot of the value seen least recently if
// that one has gone unseen for idle, else it is reported as otherValue.
type valueCap struct {
	limit  int
	idle   time.Duration
	now    func() time.Time
	forget func(v string) // deletes v's series when it gives its slot back

	mu    sync.Mutex
	order *list.List               // of *capEntry, most recently seen first
	index map[string]*list.Element // value -> its element in order
}

type capEntry struct {
	value string
	seen  time.Time
}

func newValueCap(limit int, idle time.Duration, forget func(string)) *valueCap {
	return &valueCap{limit: limit, idle: idle, now: time.Now, forget: forget,
		order: list.New(), index: make(map[string]*list.Element, limit)}
}

// value returns the label value to use for v. admit says v may take a slot;
// otherwise only a value that holds one keeps its own label. ok is false
// when v could take an idle value's slot but evict is false: the caller
// retries with evict true, holding off every other observation, since the
// idle value's series are deleted.
func (c *valueCap) value(v string, admit, evict bool) (label string, ok bool) {
	if v == "" {
		return unknownValue, true
	}
	v = sanitize(v)
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, found := c.index[v]; found {
		if admit {
			e.Value.(*capEntry).seen = c.now()
			c.order.MoveToFront(e)
		}
		return v, true
	}
	if !admit {
		return otherValue, true
	}
	now := c.now()
	if c.order.Len() >= c.limit {
		oldest := c.order.Back()
		if oldest == nil || now.Sub(oldest.Value.(*capEntry).seen) < c.idle {
			return otherValue, true
		}
		if !evict {
			return "", false
		}
		gone := c.order.Remove(oldest).(*capEntry).value
		delete(c.index, gone)
		c.forget(gone)
	}
	c.index[v] = c.order.PushFront(&capEntry{value: v, seen: now})
	return v, true
}

// sessionLRU orders sessions by last activity, most recent at the front, so
// that both a touch and finding the session to evict are O(1).
type sessionLRU struct {
	limit int
	mu    sync.Mutex
	order *list.List               // of string, most recent first
	index map[string]*list.Element // session -> its element in order
}

func newSessionLRU(limit int) sessionLRU {
	return sessionLRU{limit: limit, order: list.New(), index: make(map[string]*list.Element)}
}

// touch marks session as the most recently active. If adding it exceeded the
// limit, it returns the least recently active session, now forgotten, whose
// series the caller must delete. l.mu must be held.
func (l *sessionLRU) touch(session string) (evicted string, ok bool) {
	if e, found := l.index[session]; found {
		l.order.MoveToFront(e)
		return "", false
	}
	l.index[session] = l.order.PushFront(session)
	if l.order.Len() <= l.limit {
		return "", false
	}
	oldest := l.order.Back()
	l.order.Remove(oldest)
	evicted = oldest.Value.(string)
	delete(l.index, evicted)
	return evicted, true
}

// Purposes of upstream calls, the values of the "purpose" label: chat is a
// proxied request, compaction and title the proxy's own background calls.
const (
	PurposeChat       = "chat"
	PurposeCompaction = "compaction"
	PurposeTitle      = "title"
)

// Results of background calls.
const (
	ResultOK      = "ok"
	ResultError   = "error"
	ResultDropped = "dropped"
)

// Background is one of the proxy's own upstream calls (a summary, a
// title), made for a session.
type Background struct {
	Purpose string // PurposeCompaction or PurposeTitle
	Result  string // ResultOK, ResultError, ResultDropped
	// Channel, Agent, Model and Session are those of the session the call
	// was made for; its tokens and cost count there, under Purpose.
	Channel, Agent, Model, Session string
	// Token counts and cost, when the upstream billed the call (an error
	// that was billed, an empty answer, carries them too).
	PromptTokens, CompletionTokens, CachedTokens, ReasoningTokens int64
	Estimated                                                     bool
	CostNanos                                                     int64
	Priced                                                        bool
}

// ObserveBackground counts one background call: in
// historyproxy_background_calls_total, and its tokens and cost in the
// token and cost counters under its purpose and in its session's series.
func (m *Metrics) ObserveBackground(b Background) {
	m.background.WithLabelValues(sanitize(b.Purpose), sanitize(b.Result)).Inc()
	billed := b.PromptTokens > 0 || b.CompletionTokens > 0
	if !billed {
		return
	}
	r := Request{Channel: b.Channel, Agent: b.Agent, Model: b.Model, Reached: true}
	m.labelMu.RLock()
	l, ok := m.labels(r, false)
	if !ok {
		m.labelMu.RUnlock()
		m.labelMu.Lock()
		defer m.labelMu.Unlock()
		l, _ = m.labels(r, true)
	} else {
		defer m.labelMu.RUnlock()
	}
	counts := [5]int64{b.PromptTokens, b.CompletionTokens, b.CachedTokens, b.ReasoningTokens, 0}
	for i, typ := range tokenTypes {
		addNonNegative(m.tokens.WithLabelValues(l.channel, l.agent, l.model, typ, b.Purpose), float64(counts[i]))
	}
	var cost int64
	if b.Priced {
		cost = max(b.CostNanos, 0)
	} else {
		m.unpriced.WithLabelValues(l.model).Inc()
	}
	m.cost.add(cost, l.channel, l.agent, l.model, b.Purpose)
	if b.Estimated {
		m.estimated.WithLabelValues(l.channel, l.agent, l.model).Inc()
	}
	if b.Session == "" {
		return
	}
	if session, ok := m.sessionLabel.Label(b.Session); ok {
		m.observeSession(session, counts, cost)
	}
}

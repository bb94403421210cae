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
// distinct values, and sessions at the limit given to New, dropping the least
// recently active session's series when a new one arrives.
package metrics

import (
	"container/list"
	"net/http"
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
	// first seen after the cap is reached are reported as otherValue. 100 is
	// far above the handful of models and agents a deployment really uses.
	maxLabelValues = 100

	// maxLabelLen truncates absurdly long label values (a session id is a
	// few dozen bytes; a 1 MB model name is an attack, not a model).
	maxLabelLen = 256

	// otherValue stands for every value first seen after a label's cap.
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
	// requestBuckets spans a cached short completion to a long reasoning stream.
	requestBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300}
	// ttftBuckets is where users notice: under a second feels live.
	ttftBuckets = []float64{0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20}
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
	models, channels, agents *valueCap

	requests   *prometheus.CounterVec // channel, agent, model, code
	tokens     *prometheus.CounterVec // channel, agent, model, type
	cost       *prometheus.CounterVec // channel, agent, model
	estimated  *prometheus.CounterVec // channel, agent, model
	unpriced   *prometheus.CounterVec // model
	truncated  *prometheus.CounterVec // channel, agent
	duration   *prometheus.HistogramVec
	upstream   *prometheus.HistogramVec
	ttft       *prometheus.HistogramVec
	overhead   *prometheus.HistogramVec
	histMsgs   *prometheus.HistogramVec
	histTokens *prometheus.HistogramVec

	sessions       sessionLRU
	sessionTokens  *prometheus.CounterVec // session, type
	sessionCost    *prometheus.CounterVec // session
	evictions      prometheus.Counter
	sessionsActive prometheus.Gauge

	storeDuration *prometheus.HistogramVec // op
	storeErrors   *prometheus.CounterVec   // op
	storeUp       prometheus.Gauge
	retryDepth    prometheus.Gauge
	retries       *prometheus.CounterVec // result
	retryDropped  prometheus.Counter
}

// New builds the metrics and registers every collector on reg. It panics if
// a collector is already registered there, as MustRegister does: that is a
// programming error (New called twice on one registry).
//
// sessionLimit caps how many sessions have per-session series at once; 0 or
// less means DefaultSessionLimit.
func New(reg prometheus.Registerer, sessionLimit int) *Metrics {
	if sessionLimit <= 0 {
		sessionLimit = DefaultSessionLimit
	}
	caa := []string{"channel", "agent"}
	cam := []string{"channel", "agent", "model"}
	m := &Metrics{
		models:   newValueCap(maxLabelValues),
		channels: newValueCap(maxLabelValues),
		agents:   newValueCap(maxLabelValues),

		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "requests_total",
			Help: "Proxied requests by the HTTP status code returned to the client.",
		}, append(cam, "code")),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "tokens_total",
			Help: "Tokens by type: prompt, completion, cached and reasoning as reported upstream (or estimated); history is the part of prompt the proxy injected.",
		}, append(cam, "type")),
		cost: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "cost_usd_total",
			Help: "Cost of proxied requests in US dollars, from the configured price table.",
		}, cam),
		estimated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "estimated_usage_requests_total",
			Help: "Requests whose token counts are local estimates because the upstream reported no usage.",
		}, cam),
		unpriced: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "unpriced_requests_total",
			Help: "Requests that used tokens of a model with no configured price, so their cost is missing from historyproxy_cost_usd_total.",
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
			Help:    "Time from receiving a streaming request to relaying its first token.",
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
		sessionCost: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "session_cost_usd_total",
			Help: "Cost in US dollars per session, for the most recently active sessions only.",
		}, []string{"session"}),
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
	}
	// Both results exist from the start so rate() over them works before the
	// first retry, and a dashboard shows 0 rather than "no data".
	m.retries.WithLabelValues("ok")
	m.retries.WithLabelValues("error")

	reg.MustRegister(
		m.requests, m.tokens, m.cost, m.estimated, m.unpriced, m.truncated,
		m.duration, m.upstream, m.ttft, m.overhead, m.histMsgs, m.histTokens,
		m.sessionTokens, m.sessionCost, m.evictions, m.sessionsActive,
		m.storeDuration, m.storeErrors, m.storeUp,
		m.retryDepth, m.retries, m.retryDropped,
	)
	return m
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
	// Session is the session id; "" means a stateless request, which has no
	// per-session series and no history histograms.
	Session string
	// Code is the HTTP status returned to the client.
	Code   int
	Stream bool
	// Duration is the whole request; Upstream the upstream call (0: the
	// request never reached the upstream); TTFT the time to the first token
	// of a stream (0: not a stream, or no token was sent).
	Duration, Upstream, TTFT time.Duration
	// Token counts; values of 0 or less add nothing.
	PromptTokens, CompletionTokens, CachedTokens, ReasoningTokens int64
	// Estimated says the counts are local estimates, not upstream usage.
	Estimated bool
	// HistoryMessages and HistoryTokens were injected from the store.
	HistoryMessages, HistoryTokens int
	// HistoryTruncated says the available history was cut by the budget.
	HistoryTruncated bool
	// CostNanos is the cost in billionths of a US dollar; it counts only
	// when Priced. Priced false means the model has no price: the request is
	// counted in historyproxy_unpriced_requests_total if it used tokens, so
	// nobody is silently unbilled.
	CostNanos int64
	Priced    bool
}

// ObserveRequest records one finished request in every request, token, cost
// and latency metric, and in its session's series.
func (m *Metrics) ObserveRequest(r Request) {
	channel := m.channels.value(r.Channel)
	agent := m.agents.value(r.Agent)
	model := m.models.value(r.Model)

	m.requests.WithLabelValues(channel, agent, model, strconv.Itoa(r.Code)).Inc()

	counts := [...]int64{
		r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens,
		int64(r.HistoryTokens),
	}
	for i, typ := range tokenTypes {
		// Adding 0 still creates the series, so every type of a known
		// channel/agent/model starts at 0 and rate() sees its first increase.
		addNonNegative(m.tokens.WithLabelValues(channel, agent, model, typ), float64(counts[i]))
	}
	if r.Priced {
		addNonNegative(m.cost.WithLabelValues(channel, agent, model), float64(r.CostNanos)/1e9)
	} else if r.PromptTokens > 0 || r.CompletionTokens > 0 {
		// A request that used no tokens (say, the upstream was unreachable)
		// cost nothing, so it is not an unbilled one.
		m.unpriced.WithLabelValues(model).Inc()
	}
	if r.Estimated {
		m.estimated.WithLabelValues(channel, agent, model).Inc()
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

	if r.Session == "" {
		return
	}
	// Only session requests have history; observing stateless ones as 0 would
	// drown the distribution.
	m.histMsgs.WithLabelValues(channel, agent).Observe(float64(max(r.HistoryMessages, 0)))
	m.histTokens.WithLabelValues(channel, agent).Observe(float64(max(r.HistoryTokens, 0)))
	if r.HistoryTruncated {
		m.truncated.WithLabelValues(channel, agent).Inc()
	}
	m.observeSession(sanitize(r.Session), counts, r)
}

// observeSession adds r's tokens and cost to its session's series, making room
// by evicting the least recently active session when the limit is reached.
func (m *Metrics) observeSession(session string, counts [5]int64, r Request) {
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
		m.sessionCost.DeleteLabelValues(evicted)
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
	if r.Priced && r.CostNanos > 0 {
		m.sessionCost.WithLabelValues(session).Add(float64(r.CostNanos) / 1e9)
	}
}

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

// valueCap bounds the distinct values of one label: the first limit values
// seen are kept, later new ones become otherValue. Values are never
// forgotten, so a kept value always keeps its own series.
type valueCap struct {
	limit int
	mu    sync.RWMutex
	seen  map[string]struct{}
}

func newValueCap(limit int) *valueCap {
	return &valueCap{limit: limit, seen: make(map[string]struct{}, limit)}
}

// value returns the label value to use for v.
func (c *valueCap) value(v string) string {
	if v == "" {
		return unknownValue
	}
	v = sanitize(v)
	c.mu.RLock()
	_, ok := c.seen[v]
	c.mu.RUnlock()
	if ok {
		return v
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.seen[v]; ok {
		return v
	}
	if len(c.seen) >= c.limit {
		return otherValue
	}
	c.seen[v] = struct{}{}
	return v
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

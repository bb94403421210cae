// Package proxy is the OpenAI-compatible reverse proxy: it resolves a
// request's session, injects the stored history into chat completions,
// forwards every call to the upstream (streams included, byte for byte),
// and records each new turn before the client sees the end of the reply.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/metrics"
	"github.com/historyproxy/historyproxy/tokens"
)

// Store is what the proxy needs of a history store.
type Store interface {
	Window(ctx context.Context, session string, n int, nowMs int64, p history.Policy) (history.Window, error)
	// TakeTurn takes the session's turn lease (waiting for it as o says)
	// and reads the window in the same store operation.
	TakeTurn(ctx context.Context, session string, n int, nowMs int64, p history.Policy, o history.TurnOptions) (history.Window, *history.Lease, error)
	Append(ctx context.Context, session string, t history.Turn, p history.Policy) (history.AppendResult, error)
	Ping(ctx context.Context) error
}

// Observer receives what the proxy measures; *metrics.Metrics is one.
type Observer interface {
	ObserveRequest(metrics.Request)
	ObserveStore(op string, d time.Duration, err error)
	RetryObserver
}

// Agent modes.
const (
	ModePerUser = "per_user"
	ModeShared  = "shared"
	ModeOff     = "off"
)

// Orderings of a session's turns (Agent.Ordering).
const (
	OrderingWait   = "wait"
	OrderingReject = "reject"
	OrderingOff    = "off"
)

// Agent is one agent's history settings.
type Agent struct {
	Mode          string // per_user (or ""), shared, off
	MaxTokens     int    // history token budget
	MaxMessages   int
	OutputReserve int // reserved output tokens when the request names none
	Policy        history.Policy
	// Ordering is what a request that reads or records history does while
	// another request of its session holds the turn: OrderingWait for it
	// (up to OrderingTimeout, then 409), OrderingReject (409 at once), or
	// OrderingOff ("" too): no turn lease, both read the same history.
	Ordering        string
	OrderingTimeout time.Duration
	// OnClientDisconnect is what a reply to be recorded does when its
	// client goes away: DisconnectCancel ("" too) cancels the upstream
	// call, what was generated is recorded incomplete; DisconnectFinish
	// reads it to its end and records it complete.
	OnClientDisconnect string
}

// Options configure a Proxy. Upstream, Store, Counter, Catalog and Agent
// are required.
type Options struct {
	Upstream *url.URL // base URL including /v1
	// APIKey, when not empty, replaces the client's Authorization header,
	// and the client's OpenAI-Organization and OpenAI-Project headers are
	// dropped: the key is the proxy's, so is what it bills.
	APIKey string
	// Passthrough lists the calls forwarded upstream as ServeMux patterns
	// on the client's path ("GET /v1/models/{model...}"); "*" allows all.
	// Empty: every call without an APIKey, DefaultPassthrough with one.
	Passthrough []string
	// Organization and Project, when not empty, are sent as the
	// OpenAI-Organization and OpenAI-Project headers instead of the
	// client's.
	Organization, Project string
	// UpstreamTimeout bounds the wait for the upstream's response headers
	// (then 504). Zero: no bound.
	UpstreamTimeout time.Duration
	// UpstreamIdleTimeout bounds the upstream's silence once a chat
	// completion's response headers came: when no byte of its body
	// arrives within it, the upstream call is cut (a stream is recorded
	// incomplete, a whole reply gets 504). Zero: no bound.
	UpstreamIdleTimeout time.Duration
	// Transport overrides the upstream transport (tests).
	Transport http.RoundTripper

	Store   Store
	Counter *tokens.Counter
	Catalog *tokens.Catalog
	Agent   func(name string) Agent
	Metrics Observer // nil: nothing observed

	DefaultChannel, DefaultAgent string
	RequireSession               bool
	MaxBodyBytes                 int64         // chat request bodies; 0: 20 MiB
	StoreTimeout                 time.Duration // per store call; 0: 2s
	// FailClosed answers 503 when the store fails, instead of serving
	// without history.
	FailClosed bool
	// RetryQueue is how many turns are held for a retry while the store
	// is down (fail open only); 0 holds none, so such turns are lost.
	RetryQueue int
	// RetryQueueBytes bounds the bytes those turns hold (an estimate);
	// 0: no bound.
	RetryQueueBytes int64
	// MaxRequestMessages and MaxContentParts bound a chat request's
	// messages and its content parts (all messages together); 0: no bound.
	MaxRequestMessages, MaxContentParts int
	// MaxRequestTools bounds a chat request's tools, and the tool calls of
	// its messages (all together); 0: no bound.
	MaxRequestTools int
	// MaxTurnMessages bounds the request messages one turn records, so no
	// single store write grows with the request; a request that would
	// record more is refused before it is forwarded. 0: no bound.
	MaxTurnMessages int

	// MaxInflightBytes bounds the bytes of chat request bodies held at
	// once; a request past it gets 503 with Retry-After. Zero: no bound.
	MaxInflightBytes int64
	// ClientWriteTimeout bounds how long one write to the client may wait
	// for a client that stopped reading (then the response is cut). It is
	// renewed per write, so a stream being read is never cut. Zero: no
	// bound.
	ClientWriteTimeout time.Duration

	// AfterTurn, when not nil, is told of each turn written to the store,
	// on the request's path or the retry queue's (a turn written once the
	// store is back): it must only queue work, never wait.
	AfterTurn func(Recorded)

	Logger *slog.Logger
	Now    func() time.Time
}

// Recorded is a turn just written, as AfterTurn is told of it.
type Recorded struct {
	// Session is the store's id (channel:*:agent in a shared agent);
	// Channel and Agent are the request's.
	Session, Channel, Agent string
	Conversation            string
	Model                   string
	// Auth is the request's Authorization header when the proxy holds no
	// key ("" otherwise): a background call made for the turn uses it.
	Auth string
	// Unsummarized counts the conversation's messages its latest summary
	// does not cover; NewConversation says the turn started it.
	Unsummarized    int64
	NewConversation bool
}

// DefaultPassthrough is what a held key may reach when Options.Passthrough
// is empty: chat completions, models, embeddings and moderations.
var DefaultPassthrough = []string{
	"POST " + chatPath,
	"GET /v1/models",
	"GET /v1/models/{model...}",
	"POST /v1/embeddings",
	"POST /v1/moderations",
}

// Proxy is the client-facing handler.
type Proxy struct {
	opt   Options
	rp    *httputil.ReverseProxy
	allow *endpoints // nil: every call is forwarded
	log   *slog.Logger
	now   func() time.Time
	retry *retryQueue // nil: fail closed, or no queue
	// storeOK is whether the store's last answer was a success; failing
	// closed, a request after a failure checks the store before it is
	// forwarded.
	storeOK atomic.Bool
	lost    atomic.Int64 // turns given up, see LostTurns
	// inflight holds the chat bodies being served, against
	// MaxInflightBytes.
	inflight inflight
	// unpriced remembers the models logged as having no price.
	unpriced unpricedLog
	stop     context.CancelFunc
	done     chan struct{}
	// cut ends the upstream calls of replies that outlive their clients
	// (Cut).
	cut        context.Context
	cutReplies context.CancelFunc
}

// New builds the proxy.
func New(opt Options) (*Proxy, error) {
	if opt.Upstream == nil || opt.Store == nil || opt.Counter == nil || opt.Catalog == nil || opt.Agent == nil {
		return nil, errors.New("proxy: Upstream, Store, Counter, Catalog and Agent are required")
	}
	if opt.MaxBodyBytes <= 0 {
		opt.MaxBodyBytes = 20 << 20
	}
	if opt.StoreTimeout <= 0 {
		opt.StoreTimeout = 2 * time.Second
	}
	if opt.Metrics == nil {
		opt.Metrics = discard{}
	}
	p := &Proxy{opt: opt, log: opt.Logger, now: opt.Now, inflight: inflight{max: opt.MaxInflightBytes}}
	p.cut, p.cutReplies = context.WithCancel(context.Background())
	patterns := opt.Passthrough
	if len(patterns) == 0 && opt.APIKey != "" {
		patterns = DefaultPassthrough
	}
	var err error
	if p.allow, err = newEndpoints(patterns); err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	p.storeOK.Store(true)
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.now == nil {
		p.now = time.Now
	}
	p.stop, p.done = func() {}, make(chan struct{})
	if !opt.FailClosed && opt.RetryQueue > 0 {
		p.retry = newRetryQueue(opt.Store, opt.RetryQueue, opt.RetryQueueBytes, opt.StoreTimeout, opt.Metrics, p.log)
		p.retry.after = opt.AfterTurn
		ctx, cancel := context.WithCancel(context.Background())
		p.stop = cancel
		go func() { // stops when Close cancels ctx
			defer close(p.done)
			p.retry.run(ctx)
		}()
	} else {
		close(p.done)
	}
	tr := opt.Transport
	if tr == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = opt.UpstreamTimeout
		t.MaxIdleConnsPerHost = 256
		tr = t
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite:        p.rewrite,
		Transport:      tr,
		BufferPool:     &copyBuffers{},
		ModifyResponse: p.modifyResponse,
		ErrorHandler:   p.errorHandler,
		ErrorLog:       slog.NewLogLogger(p.log.Handler(), slog.LevelWarn),
	}
	return p, nil
}

// Close writes the turns still waiting for the store, then stops the retry
// worker. Call it after the server has drained. It keeps writing as long as
// turns go through, and gives up when ctx is done or twice StoreTimeout
// passes without one written (the store is still down). Each turn left
// behind is logged with its session and counted as dropped, and the error
// says how many there were.
func (p *Proxy) Close(ctx context.Context) error {
	if p.retry != nil {
		p.retry.hurry()
		p.retry.drain(ctx, 2*p.opt.StoreTimeout)
	}
	p.stop()
	<-p.done
	if p.retry == nil {
		return nil
	}
	left := p.retry.take()
	for _, t := range left {
		p.opt.Metrics.RetryDropped()
		p.log.Error("shutdown: turn not written to the store is lost", "session", t.session)
	}
	if len(left) > 0 {
		p.lost.Add(int64(len(left)))
		return fmt.Errorf("%d turns could not be written to the store", len(left))
	}
	return nil
}

// LostTurns is how many turns were given up since the proxy was built: a
// full retry queue, a write that failed with nowhere to queue it, or turns
// still queued when Close gave up.
func (p *Proxy) LostTurns() int64 { return p.lost.Load() }

// Handler returns the client-facing routes. Every request is routed on
// its path's canonical form (see canonicalPath), and only the calls of the
// allow-list reach the upstream.
func (p *Proxy) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+chatPath, p.chat)
	mux.HandleFunc("/v1/", p.passthrough)
	mux.HandleFunc("/v1", p.passthrough) // the base itself; the mux would redirect it, losing a /s/ prefix
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		p.echoSession(w, r.Header, pathSessionFrom(r.Context()))
		writeError(w, &apiError{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "unknown_url",
			Message: "historyproxy serves the OpenAI API under /v1/ (or /s/{channel}/{user}/{agent}/v1/); " + r.Method + " " + quote(r.URL.Path) + " is not part of it"})
	})
	return p.stallBound(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		dec, esc, err := canonicalPath(r.URL.EscapedPath())
		if err != nil {
			p.echoFullSession(w, r.Header)
			writeError(w, err)
			return
		}
		ps, rest, err := parsePathSession(dec)
		if err != nil {
			p.echoFullSession(w, r.Header)
			writeError(w, err)
			return
		}
		ctx := r.Context()
		if ps.ok {
			// Route the rest of the path as if the app had used /v1
			// directly. Canonical segments hold no slash, so the escaped
			// path splits where the decoded one does.
			ctx = context.WithValue(ctx, pathSessionKey{}, ps)
			dec, esc = rest, "/"+strings.SplitN(esc, "/", 6)[5]
		}
		if r.Method == http.MethodPost && strings.EqualFold(dec, chatPath) {
			// A router that ignores case would serve this as a chat
			// completion: so does the proxy.
			dec, esc = chatPath, chatPath
		}
		u := *r.URL
		u.Path, u.RawPath = dec, esc
		r = r.WithContext(ctx)
		r.URL = &u
		if (dec == "/v1" || strings.HasPrefix(dec, "/v1/")) && !p.allow.allows(r) {
			p.echoSession(w, r.Header, ps)
			writeError(w, notAllowed(r.Method, dec))
			return
		}
		if p.allow != nil && methodInQuery(r.URL.RawQuery) {
			writeError(w, &apiError{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "endpoint_not_allowed",
				Message: "a _method query parameter would make the upstream read this call as another one; this proxy forwards none (upstream.passthrough)"})
			return
		}
		mux.ServeHTTP(w, r)
	}))
}

// echoSession names the session in X-Session-ID on an answer given before
// a handler resolved it (404 unknown_url, 403 endpoint_not_allowed): every
// answer to a request with a session carries its id. A bad session header
// only means there is no id to echo; the answer is about the path.
func (p *Proxy) echoSession(w http.ResponseWriter, h http.Header, ps pathSession) {
	if s, ok, err := resolveSession(h, ps, "", p.opt.DefaultChannel, p.opt.DefaultAgent); err == nil && ok {
		w.Header().Set(headerSessionID, s.ID())
	}
}

// echoFullSession is echoSession for a path that could not be read: only
// X-Session-ID, which names all three parts whatever the path says, gives
// a session then. Part headers are not enough, since the broken path may
// have named the other parts.
func (p *Proxy) echoFullSession(w http.ResponseWriter, h http.Header) {
	if len(h.Values(headerSessionID)) > 0 {
		p.echoSession(w, h, pathSession{})
	}
}

type pathSessionKey struct{}

func pathSessionFrom(ctx context.Context) pathSession {
	ps, _ := ctx.Value(pathSessionKey{}).(pathSession)
	return ps
}

// passthrough forwards any other /v1/ call unchanged; it resolves the
// session from headers and path only, to echo it back.
func (p *Proxy) passthrough(w http.ResponseWriter, r *http.Request) {
	s, ok, err := resolveSession(r.Header, pathSessionFrom(r.Context()), "", p.opt.DefaultChannel, p.opt.DefaultAgent)
	if err != nil {
		writeError(w, err)
		return
	}
	if ok {
		w.Header().Set(headerSessionID, s.ID())
	}
	// The request body streams through while the reply may already be
	// flowing back; without full duplex the server may close the body
	// under the transport and cut the reply (golang/go#40747).
	_ = http.NewResponseController(w).EnableFullDuplex()
	p.rp.ServeHTTP(w, r)
}

// OpenAI's headers that pick the organization and project a key bills.
const (
	headerOrganization = "OpenAI-Organization"
	headerProject      = "OpenAI-Project"
)

// proxyHeaders are the proxy's own request headers, never forwarded.
var proxyHeaders = []string{headerSessionID, headerSessionChannel, headerSessionUser, headerSessionAgent, headerHistory, headerMessageID}

func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	u := p.opt.Upstream
	pr.Out.URL.Scheme = u.Scheme
	pr.Out.URL.Host = u.Host
	// Keep the client's escaping (an id with %3F must stay one segment):
	// the raw path is joined alongside the decoded one. Both are canonical
	// (see Handler), so the result stays under the upstream's base path.
	pr.Out.URL.Path = strings.TrimSuffix(u.Path, "/") + strings.TrimPrefix(pr.In.URL.Path, "/v1")
	pr.Out.URL.RawPath = strings.TrimSuffix(u.EscapedPath(), "/") + strings.TrimPrefix(pr.In.URL.EscapedPath(), "/v1")
	pr.Out.Host = u.Host
	for _, h := range proxyHeaders {
		pr.Out.Header.Del(h)
	}
	// A chunked body may end in trailers, fields the header rules below
	// never see (an Authorization or OpenAI-Organization sent after the
	// body); a chat body read whole has them filled in by the time it is
	// forwarded. The API uses no request trailers: none are forwarded.
	pr.Out.Trailer = nil
	if p.allow != nil {
		// The allow-list decided on this method and path: no header may
		// make the upstream route on others.
		for _, h := range overrideHeaders {
			dropHeader(pr.Out.Header, h)
		}
	}
	if p.opt.APIKey != "" {
		pr.Out.Header.Set("Authorization", "Bearer "+p.opt.APIKey)
		dropHeader(pr.Out.Header, headerOrganization)
		dropHeader(pr.Out.Header, headerProject)
	}
	if p.opt.Organization != "" {
		dropHeader(pr.Out.Header, headerOrganization)
		pr.Out.Header.Set(headerOrganization, p.opt.Organization)
	}
	if p.opt.Project != "" {
		dropHeader(pr.Out.Header, headerProject)
		pr.Out.Header.Set(headerProject, p.opt.Project)
	}
	if exchangeFrom(pr.In.Context()) != nil {
		// The proxy reads the reply: ask for it uncompressed so a client's
		// Accept-Encoding: gzip cannot blind the observer.
		pr.Out.Header.Set("Accept-Encoding", "identity")
	}
}

// overrideHeaders make servers route a request on another method or path
// than its own: Symfony and Laravel, Express's method-override and
// Google's front ends read the method headers, IIS rewrites and older
// Symfony the URL ones.
var overrideHeaders = []string{"X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-URL", "X-Rewrite-URL"}

// methodInQuery reports whether a query carries a _method parameter, which
// Laravel and Symfony (and Express's method-override, when set up so) read
// as the request's method. PHP reads a "." or " " in a parameter's name as
// "_", so ".method" is one too.
func methodInQuery(raw string) bool {
	if raw == "" {
		return false
	}
	q, _ := url.ParseQuery(raw) // what parses is what a server reads
	for k := range q {
		k = strings.TrimLeft(k, " ")
		if k, _, _ = strings.Cut(k, "["); len(k) == len("_method") && strings.EqualFold(strings.NewReplacer(".", "_", " ", "_").Replace(k), "_method") {
			return true
		}
	}
	return false
}

// dropHeader deletes name from h in every spelling a server may read as
// it: servers that hand headers to apps as CGI variables (WSGI, Rack, PHP)
// read OpenAI_Organization as OpenAI-Organization.
func dropHeader(h http.Header, name string) {
	for k := range h {
		if len(k) == len(name) && strings.EqualFold(strings.ReplaceAll(k, "_", "-"), name) {
			delete(h, k)
		}
	}
}

// maxUnpricedLogged bounds the models remembered as logged: model names
// come from clients, so they must not grow memory without end.
const maxUnpricedLogged = 1000

// unpricedLog logs each model without a price once, so that an operator
// learns which models to name in the config without a line per request.
// The zero value is ready to use.
type unpricedLog struct {
	mu     sync.Mutex
	logged map[string]struct{}
}

func (u *unpricedLog) log(log *slog.Logger, model string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if _, ok := u.logged[model]; ok {
		return
	}
	if u.logged == nil {
		u.logged = make(map[string]struct{})
	}
	switch n := len(u.logged); {
	case n < maxUnpricedLogged:
		log.Warn("model has no price: its requests cost 0 and are counted in historyproxy_unpriced_requests_total; give it a price under models: in the config",
			"model", model)
	case n == maxUnpricedLogged:
		log.Warn("more models have no price; no longer logging each", "models", n)
	default:
		return
	}
	u.logged[model] = struct{}{}
}

// errStore aborts a response whose turn could not be stored (fail_closed).
var errStore = errors.New("history store unavailable")

func (p *Proxy) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	if x := exchangeFrom(r.Context()); x != nil {
		x.upstreamErr = err
	}
	var ne net.Error
	switch {
	case errors.Is(context.Cause(r.Context()), errUpstreamStalled):
		writeError(w, &apiError{Status: http.StatusGatewayTimeout, Type: "upstream_error", Code: "upstream_timeout",
			Message: "the upstream stopped sending its reply"})
	case errors.Is(err, errStore):
		e := storeUnavailable()
		if x := exchangeFrom(r.Context()); x != nil && x.record {
			// The write failed or timed out; a timed-out write may still
			// land, so a blind retry could store the turn twice.
			e.Message = "the conversation history store did not take this turn, so the answer is withheld; it may have been stored all the same: retry with the header " +
				headerMessageID + ": " + x.idemKey + " and it is stored once"
		}
		writeError(w, e)
	case r.Context().Err() != nil:
		// The client went away; nobody reads an answer. 499 as nginx logs it.
		w.WriteHeader(499)
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
		writeError(w, &apiError{Status: http.StatusGatewayTimeout, Type: "upstream_error", Code: "upstream_timeout",
			Message: "the upstream did not answer in time"})
	default:
		// The cause names addresses of the proxy's network (dial tcp
		// 10.0.3.7:443: connection refused): the log gets it, the client
		// only that the upstream failed.
		p.log.Warn("upstream unreachable", "upstream", p.opt.Upstream.Redacted(), "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, &apiError{Status: http.StatusBadGateway, Type: "upstream_error", Code: "upstream_unreachable",
			Message: "the upstream could not be reached; the proxy's log has the details"})
	}
}

func storeUnavailable() *apiError {
	return &apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "history_unavailable",
		Message: "the conversation history store is unavailable; try again later"}
}

// copyBuffers lends the reverse proxy the buffers it copies replies
// through: without them it allocates 32 KiB for every reply, a fifth of
// the bytes a chat request allocated. An open stream holds its buffer
// until it ends, and its events are a few hundred bytes each (a stream's
// relay reads the upstream into it, see streamBody.Read): 4 KiB, not 32,
// the size of the transport's and the server's own buffers. A stream's
// reads return an event or a few (the upstream flushes each), so a larger
// buffer saves no system call; it only cost 4 KB more per open stream
// (BenchmarkHeldStreams). A whole reply is copied from memory.
type copyBuffers struct{ pool sync.Pool }

// copyBufferSize is the size of the buffers copyBuffers lends.
const copyBufferSize = 4 << 10

func (c *copyBuffers) Get() []byte {
	if b, ok := c.pool.Get().(*[]byte); ok {
		return *b
	}
	return make([]byte, copyBufferSize)
}

func (c *copyBuffers) Put(b []byte) { c.pool.Put(&b) }

type discard struct{}

func (discard) ObserveRequest(metrics.Request)            {}
func (discard) ObserveStore(string, time.Duration, error) {}
func (discard) SetRetryQueueDepth(int)                    {}
func (discard) RetryAttempt(bool)                         {}
func (discard) RetryDropped()                             {}
func (discard) SetStoreUp(bool)                           {}

// Command historyproxy is an OpenAI-compatible proxy that gives LLM apps
// conversation memory: point an app's OpenAI base URL at it.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/historyproxy/historyproxy/admin"
	"github.com/historyproxy/historyproxy/compaction"
	"github.com/historyproxy/historyproxy/config"
	"github.com/historyproxy/historyproxy/console"
	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/metrics"
	"github.com/historyproxy/historyproxy/proxy"
	"github.com/historyproxy/historyproxy/tokens"
	upstreamclient "github.com/historyproxy/historyproxy/upstream"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// The first SIGINT or SIGTERM starts the drain; a second one ends it at
	// once (what is in flight is still recorded).
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	hurry := make(chan struct{})
	go func() { // stops after the second signal, or with the process
		<-sigs
		stop()
		<-sigs
		close(hurry)
	}()
	if err := cli(withHurry(ctx, hurry), os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		var logged loggedError
		if !errors.As(err, &logged) { // else already in the log, in its format
			fmt.Fprintln(os.Stderr, "historyproxy:", err)
		}
		os.Exit(1)
	}
}

// command is a subcommand: historyproxy NAME [args].
type command struct {
	name, args, summary string
	run                 func(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error
}

// commands lists the subcommands in the order -h shows them. Without one,
// historyproxy runs the proxy.
var commands = []command{
	{
		name: "healthcheck", args: "[flags]",
		summary: "ask the admin listener's /healthz (of the address the flags, environment and file configure) and exit 1 unless it answers 200; the container's HEALTHCHECK, since the image has no curl",
		run: func(_ context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
			if err := healthcheck(args, getenv, stdout); err != nil {
				return fmt.Errorf("healthcheck: %w", err)
			}
			return nil
		},
	},
	{
		name: "sessions", args: "[flags]",
		summary: "list sessions as a table, most recently active first (-channel, -agent, -user, -q, -active, -limit, -json); reads the Redis the flags, environment and file configure, with the proxy running or not",
		run:     sessionsCommand,
	},
	{
		name: "transcript", args: "SESSION_ID [flags]",
		summary: "print a conversation as a readable transcript: roles, tool calls and results, token counts, cost and status (-conversation, -json)",
		run:     transcriptCommand,
	},
	{
		name: "erase", args: "SESSION_ID [flags]",
		summary: "erase everything a session has in the store",
		run:     eraseCommand,
	},
	{
		name: "migrate", args: "[flags]",
		summary: "move the sessions an older version stored (one Redis stream per conversation) into the current layout; safe while the proxy serves, and to run again",
		run:     migrateCommand,
	},
	{
		name: "version", summary: "print the version and exit (also -version)",
		run: func(_ context.Context, args []string, _ func(string) string, stdout io.Writer) error {
			// No flags, but -h shows the usage as every command's does.
			fs := flag.NewFlagSet("historyproxy version", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
				fmt.Fprintf(stdout, "Usage: historyproxy version\n\nPrints the version, the Go release and the platform of this build (also -version).\n")
				return err
			} else if err != nil {
				return fmt.Errorf("version: %w", err)
			}
			if fs.NArg() > 0 {
				return fmt.Errorf("version: unexpected argument %q: it takes none", fs.Arg(0))
			}
			_, err := fmt.Fprintln(stdout, versionLine())
			return err
		},
	},
}

// cli dispatches a command line: a subcommand, -version, or else the proxy
// itself (run). With -h it adds the subcommands to the flags' usage.
func cli(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		name := args[0]
		if name == "-version" || name == "--version" {
			name = "version"
		}
		for _, c := range commands {
			if c.name == name {
				return c.run(ctx, args[1:], getenv, stdout)
			}
		}
	}
	err := run(ctx, args, getenv, stderr, nil)
	if errors.Is(err, flag.ErrHelp) {
		printCommands(stderr)
	}
	return err
}

// printCommands ends -h's usage with the subcommands.
func printCommands(w io.Writer) {
	fmt.Fprintf(w, "\nCommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  historyproxy %s", c.name)
		if c.args != "" {
			fmt.Fprintf(w, " %s", c.args)
		}
		fmt.Fprintf(w, "\n    \t%s\n", c.summary)
	}
}

// versionLine says which build this is.
func versionLine() string {
	return fmt.Sprintf("historyproxy %s (%s, %s/%s)", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// addrs are the addresses the program listens on, once it serves.
type addrs struct{ Proxy, Admin string }

// run is the whole program: it loads the configuration, opens the
// listeners, builds the store, metrics and proxy, serves until ctx is done,
// then drains. ready (may be nil) learns the bound addresses, so a test can
// listen on port 0.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer, ready func(addrs)) (err error) {
	cfg, err := config.Load(args, getenv, stderr)
	if err != nil {
		return err
	}
	log, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	// From here on, what stops the program goes to the log, in its
	// format (a JSON log stays JSON on every line), and main does not
	// print it again.
	defer func() {
		var logged loggedError
		if err != nil && !errors.As(err, &logged) {
			log.Error("historyproxy stopped", "err", err)
			err = loggedError{err}
		}
	}()
	// go-redis logs to the process's stderr with its own format; route it
	// through slog so a JSON log stays JSON. The logger is process-wide.
	redis.SetLogger(redisLogger{log.With("component", "redis")})

	pl, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	defer pl.Close()
	al, err := net.Listen("tcp", cfg.AdminListen)
	if err != nil {
		return fmt.Errorf("admin listen %s: %w", cfg.AdminListen, err)
	}
	defer al.Close()

	sessionLabel, err := metrics.NewSessionLabel(cfg.Metrics.SessionLabel, []byte(cfg.Metrics.SessionLabelKey))
	if err != nil {
		return fmt.Errorf("metrics.session_label: %w", err)
	}
	reg := metrics.NewRegistry()
	met := metrics.New(reg, cfg.Metrics.SessionSeriesLimit, metrics.WithSessionLabel(sessionLabel))

	store, closeStore, err := newStore(ctx, cfg, log, met)
	if err != nil {
		return err
	}
	defer closeStore()
	if err := checkStore(ctx, store, cfg, log); err != nil {
		return err
	}

	counter, err := tokens.New(cfg.Tokens.DefaultEncoding)
	if err != nil {
		return fmt.Errorf("tokens: %w", err)
	}
	models := make(map[string]tokens.Model, len(cfg.Models))
	for name, m := range cfg.Models {
		models[name] = tokens.Model{ContextWindow: m.ContextWindow, Input: m.Input, CachedInput: m.CachedInput, Output: m.Output}
	}

	failClosed := cfg.Store.OnError == "fail_closed"
	upstream, err := url.Parse(cfg.Upstream.URL)
	if err != nil {
		return fmt.Errorf("upstream %q: %w", cfg.Upstream.URL, err)
	}
	catalog := tokens.NewCatalog(models)
	// Summaries and titles: queued after turns, run in the background,
	// never in a request's path.
	worker := compaction.New(compaction.Options{
		Store: store,
		Upstream: upstreamclient.New(upstreamclient.Options{URL: upstream, APIKey: cfg.Upstream.APIKey,
			Organization: cfg.Upstream.Organization, Project: cfg.Upstream.Project}),
		Counter:      counter,
		Catalog:      catalog,
		Settings:     func(name string) compaction.Settings { return compactionSettings(cfg.Agent(name).Compaction) },
		Metrics:      met,
		StoreTimeout: cfg.Store.Timeout,
		Logger:       log.With("component", "compaction"),
	})
	warnCompactionGap(cfg, log)
	wctx, stopWorker := context.WithCancel(context.Background())
	workerDone := make(chan struct{})
	go func() { // stops when stopWorker is called, at shutdown
		defer close(workerDone)
		worker.Run(wctx)
	}()
	defer func() { stopWorker(); <-workerDone }()
	px, err := proxy.New(proxy.Options{
		Upstream:        upstream,
		APIKey:          cfg.Upstream.APIKey,
		Passthrough:     cfg.Upstream.Passthrough,
		Organization:    cfg.Upstream.Organization,
		Project:         cfg.Upstream.Project,
		UpstreamTimeout: cfg.Upstream.Timeout,
		// A reply whose upstream falls silent this long is cut (stored
		// incomplete): see README, Reliability.
		UpstreamIdleTimeout: cfg.Upstream.StreamIdleTimeout,
		Store:               store,
		Counter:             counter,
		Catalog:             catalog,
		Agent:               func(name string) proxy.Agent { return agent(cfg.Agent(name)) },
		AfterTurn: func(r proxy.Recorded) {
			worker.Recorded(compaction.Turn{Session: r.Session, Channel: r.Channel, Agent: r.Agent, Conversation: r.Conversation,
				Model: r.Model, Auth: r.Auth, Unsummarized: r.Unsummarized, NewConversation: r.NewConversation})
		},
		Metrics:        met,
		DefaultChannel: cfg.Session.DefaultChannel,
		DefaultAgent:   cfg.Session.DefaultAgent,
		RequireSession: cfg.Session.Require,
		MaxBodyBytes:   cfg.MaxBodyBytes,
		// Past this, chat requests get 503: see README, Reliability.
		MaxInflightBytes: cfg.MaxInflightBytes,
		StoreTimeout:     cfg.Store.Timeout,
		FailClosed:       failClosed,
		RetryQueue:       cfg.Store.RetryQueue,
		RetryQueueBytes:  cfg.Store.RetryQueueBytes,
		Logger:           log,

		ClientWriteTimeout: cfg.Client.WriteTimeout,
		MaxRequestMessages: cfg.MaxRequestMessages,
		MaxContentParts:    cfg.MaxRequestContentParts,
		MaxRequestTools:    cfg.MaxRequestTools,
		MaxTurnMessages:    cfg.MaxTurnMessages,
	})
	if err != nil {
		return err
	}

	// Handlers run under hctx, so that a drain that runs out of time can
	// cut them: each then records what it has, as a client's disconnect
	// would.
	hctx, cutHandlers := context.WithCancel(context.Background())
	defer cutHandlers()
	srv := &http.Server{Handler: px.Handler(), ReadHeaderTimeout: min(30*time.Second, cfg.Client.ReadTimeout), MaxHeaderBytes: 1 << 20,
		// The whole request must arrive within ReadTimeout; the server
		// lifts that deadline once the body is read, so a long response
		// is not cut by it. Writes are bounded per write by the proxy.
		ReadTimeout: cfg.Client.ReadTimeout, IdleTimeout: cfg.Client.IdleTimeout,
		ErrorLog:    slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		BaseContext: func(net.Listener) context.Context { return hctx }}
	var draining atomic.Bool
	var api http.Handler
	var conversations *admin.API
	if adminAllowed(cfg.Admin.Token, al.Addr()) {
		conversations = admin.New(admin.Options{
			Store:        store,
			Counter:      counter,
			Policy:       func(name string) history.Policy { return agent(cfg.Agent(name)).Policy },
			Token:        cfg.Admin.Token,
			Metrics:      met,
			Label:        sessionLabel.Label,
			StoreTimeout: cfg.Store.Timeout,
			Recent:       met.Recent(),
			Started:      time.Now(),
			Compactor:    worker,
			Logger:       log,
		})
		api = conversations.Handler()
	} else {
		log.Warn("the conversations API (/admin/v1) and the console (/console/) are off: the admin listener is not on loopback and no admin token is set; set admin.token_env (flag -admin-token-env) to the name of a variable holding a token, or listen on 127.0.0.1",
			"admin", al.Addr().String())
	}
	// The admin listener takes the client port's bounds: a request must
	// arrive within client.read_timeout, an idle connection is closed
	// after client.idle_timeout, and each write may wait at most
	// client.write_timeout for a reader that stopped (per write, never a
	// whole response: a watch runs for hours).
	routes := adminRoutes(store, reg, failClosed, cfg.Store.Timeout, &draining, api)
	if cfg.Admin.Pprof {
		routes = withPprof(routes)
		log.Warn("Go's profiler is served under /debug/pprof/ on the admin listener (admin.pprof), without authentication", "admin", al.Addr().String())
	}
	// Outermost, so that the path-cleaning redirects of the muxes inside
	// carry the console's security headers too.
	routes = console.Headers(routes)
	adminSrv := &http.Server{Handler: proxy.WriteDeadlines(cfg.Client.WriteTimeout, routes),
		ReadHeaderTimeout: min(10*time.Second, cfg.Client.ReadTimeout), ReadTimeout: cfg.Client.ReadTimeout, IdleTimeout: cfg.Client.IdleTimeout,
		MaxHeaderBytes: 1 << 20, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	if conversations != nil {
		// Watches are long-lived: they end when the admin server shuts
		// down, and their clients reconnect (to another instance).
		adminSrv.RegisterOnShutdown(conversations.Close)
	}
	errc := make(chan error, 2)
	go func() { errc <- serve(srv, pl) }()
	go func() { errc <- serve(adminSrv, al) }()
	log.Info("historyproxy started", "version", version, "listen", pl.Addr().String(), "admin", al.Addr().String(),
		"upstream", upstream.Redacted(), "store", storeName(cfg.Redis))
	if ready != nil {
		ready(addrs{Proxy: pl.Addr().String(), Admin: al.Addr().String()})
	}

	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	draining.Store(true) // /readyz answers 503 from now on
	lostBefore := px.LostTurns()
	log.Info("shutting down: draining in-flight requests", "timeout", cfg.DrainTimeout)
	drain, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer cancel()
	go func() { // stops when the drain ends, or on a second signal
		select {
		case <-hurryFrom(ctx):
			log.Warn("second signal: ending the drain now")
			cancel()
		case <-drain.Done():
		}
	}()
	// Shutdown closes the listeners at once and waits for every request,
	// streams included, to finish.
	if err := srv.Shutdown(drain); err != nil {
		// Out of time: cut what is still in flight. A cut stream records
		// what was generated as incomplete, within store.timeout, so the
		// wait for the handlers to end is bounded by that.
		log.Warn("drain ended with requests in flight: cutting them", "err", err)
		cutHandlers()
		px.Cut() // replies that outlive their clients too
		final, cancelFinal := context.WithTimeout(context.Background(), 2*cfg.Store.Timeout+time.Second)
		if err := srv.Shutdown(final); errors.Is(err, context.DeadlineExceeded) {
			log.Error("requests still running after they were cut; their turns may be lost")
		}
		cancelFinal()
	}
	// Turns queued while the store was down are written as long as the
	// store takes them.
	if err := px.Close(context.Background()); err != nil {
		log.Error("shutdown", "err", err)
	}
	adminCtx, cancelAdmin := context.WithTimeout(context.Background(), time.Second)
	defer cancelAdmin()
	_ = adminSrv.Shutdown(adminCtx)
	if lost := px.LostTurns() - lostBefore; lost > 0 {
		err := fmt.Errorf("shutdown: %d turns could not be stored", lost)
		log.Error("stopped", "err", err)
		return loggedError{err}
	}
	log.Info("stopped")
	return nil
}

// loggedError is an error run has already logged: main exits non-zero
// without writing it again (a JSON log stays JSON).
type loggedError struct{ error }

func (e loggedError) Unwrap() error { return e.error }

type hurryKey struct{}

// withHurry returns ctx carrying hurry. run drains when ctx is done; when
// hurry is closed too (a second signal), it ends the drain at once.
func withHurry(ctx context.Context, hurry <-chan struct{}) context.Context {
	return context.WithValue(ctx, hurryKey{}, hurry)
}

// hurryFrom returns the channel withHurry put in ctx; nil (never ready)
// when there is none.
func hurryFrom(ctx context.Context) <-chan struct{} {
	h, _ := ctx.Value(hurryKey{}).(<-chan struct{})
	return h
}

func serve(s *http.Server, l net.Listener) error {
	if err := s.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve %s: %w", l.Addr(), err)
	}
	return nil
}

// sweepInterval is how often the in-memory store applies the expiries
// Redis applies on its own (retention, idempotency keys).
const sweepInterval = time.Minute

// store is what the program needs of a history store: the proxy's part
// and the admin API's. Both history stores are one.
type store interface {
	proxy.Store
	admin.Store
	compaction.Store
}

// storeObserver counts what a store does: its turn leases and deltas,
// and a Redis store's window cache.
type storeObserver interface {
	history.LiveObserver
	history.WindowCacheObserver
}

// newStore builds the configured store; obs counts its turn leases and
// deltas, and its window cache when it is a Redis store with one.
func newStore(ctx context.Context, cfg config.Config, log *slog.Logger, obs storeObserver) (store, func(), error) {
	rc := cfg.Redis
	if !rc.Enabled() {
		log.Warn("no Redis configured: conversations are kept in memory and lost on restart (set -redis-url)")
		m := history.NewMemory(history.WithMaxBytes(cfg.Store.MemoryMaxBytes), history.WithLogger(log), history.WithMemoryLiveObserver(obs))
		ctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { // stops when the store is closed
			defer close(done)
			m.Run(ctx, sweepInterval)
		}()
		return m, func() { cancel(); <-done; _ = m.Close() }, nil
	}
	client, err := newRedisClient(rc)
	if err != nil {
		return nil, nil, err
	}
	// The watches' blocking reads hold a connection each (one per session
	// watched from this process) on a pool of their own, so that they
	// never take the connections turns need.
	blocking, err := newRedisClient(rc, poolOf(blockingPool), noMaintNotifications)
	if err != nil {
		return nil, nil, err
	}
	s := history.NewRedis(client, rc.Prefix, history.WithLeaseTTL(cfg.Store.LeaseTTL), history.WithLiveObserver(obs),
		history.WithRedisLogger(log.With("component", "store")), history.WithBlockingClient(blocking),
		history.WithWindowCacheBytes(cfg.Store.WindowCacheBytes), history.WithWindowCacheObserver(obs))
	return s, func() { _ = s.Close(); _ = blocking.Close(); _ = client.Close() }, nil
}

// blockingPool bounds the connections of the watches' blocking reads: the
// sessions one process may watch at once. They open as needed, and close
// after a minute idle.
const blockingPool = 10000

// poolOf sizes a client's pool.
func poolOf(n int) func(*redis.UniversalOptions) {
	return func(o *redis.UniversalOptions) { o.PoolSize, o.ConnMaxIdleTime = n, time.Minute }
}

// noMaintNotifications turns off go-redis's handling of Redis Enterprise's
// maintenance notifications (handing connections over to a moving
// endpoint) for the watches' blocking client. go-redis sizes its queue by
// the pool: for blockingPool's 10,000 connections 5.9 MB, allocated at
// start, the largest thing in the proxy's idle heap. A watch whose
// connection breaks in a maintenance reconnects as from any other break.
func noMaintNotifications(o *redis.UniversalOptions) {
	o.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
}

// newRedisClient builds the client of one of the three topologies: a URL,
// a cluster or a sentinel-watched master.
func newRedisClient(rc config.Redis, opts ...func(*redis.UniversalOptions)) (redis.UniversalClient, error) {
	var pool redis.UniversalOptions
	for _, o := range opts {
		o(&pool)
	}
	if rc.URL != "" {
		opts, err := redis.ParseURL(rc.URL)
		if err != nil {
			return nil, fmt.Errorf("redis url: %w", err)
		}
		// Without this go-redis ignores the context's deadline and waits
		// its own 5 s read timeout: store.timeout would bound nothing
		// against a server that accepts but does not answer.
		opts.ContextTimeoutEnabled = true
		if pool.PoolSize > 0 {
			opts.PoolSize, opts.ConnMaxIdleTime = pool.PoolSize, pool.ConnMaxIdleTime
		}
		if pool.MaintNotificationsConfig != nil {
			opts.MaintNotificationsConfig = pool.MaintNotificationsConfig
		}
		return redis.NewClient(opts), nil
	}
	var tlsConfig *tls.Config
	if rc.TLS {
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return redis.NewUniversalClient(&redis.UniversalOptions{
		PoolSize:                 pool.PoolSize,
		ConnMaxIdleTime:          pool.ConnMaxIdleTime,
		MaintNotificationsConfig: pool.MaintNotificationsConfig,
		TLSConfig:                tlsConfig,
		Addrs:                    append(rc.ClusterAddrs, rc.SentinelAddrs...),
		MasterName:               rc.SentinelMaster,
		IsClusterMode:            len(rc.ClusterAddrs) > 0,
		Username:                 rc.Username,
		Password:                 rc.Password,
		// As for the URL form: store.timeout bounds each operation.
		ContextTimeoutEnabled: true,
	}), nil
}

// checkStore asks the configured Redis to answer once, within
// store.timeout, so that a wrong address, password or database shows at
// start-up rather than only in /readyz. With store.require_at_start it
// refuses to start; otherwise it logs the problem as an error and the proxy
// serves as store.on_error says until Redis answers.
func checkStore(ctx context.Context, s proxy.Store, cfg config.Config, log *slog.Logger) error {
	if !cfg.Redis.Enabled() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Store.Timeout)
	defer cancel()
	err := s.Ping(ctx)
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) {
		// go-redis retries a refused dial until the deadline, then reports
		// only the deadline.
		err = fmt.Errorf("no answer within %s (store.timeout): %w", cfg.Store.Timeout, err)
	}
	if cfg.Store.RequireAtStart {
		return fmt.Errorf("store %s does not answer and store.require_at_start is true: %w", storeName(cfg.Redis), err)
	}
	what := "serving without history until it answers (store.on_error: fail_open)"
	if cfg.Store.OnError == "fail_closed" {
		what = "answering 503 to requests with a session until it answers (store.on_error: fail_closed)"
	}
	log.Error("store does not answer at start-up: "+what, "store", storeName(cfg.Redis), "err", err)
	return nil
}

func storeName(rc config.Redis) string {
	switch {
	case rc.URL != "":
		if u, err := url.Parse(rc.URL); err == nil {
			return u.Redacted()
		}
		return "redis"
	case len(rc.ClusterAddrs) > 0:
		return "redis cluster " + strings.Join(rc.ClusterAddrs, ",")
	case rc.SentinelMaster != "":
		return "redis sentinel " + rc.SentinelMaster
	}
	return "memory"
}

// compactionSettings is an agent's compaction configuration as the worker
// takes it.
func compactionSettings(c config.Compaction) compaction.Settings {
	return compaction.Settings{Enabled: c.On(), TriggerMessages: c.TriggerMessages, TargetMessages: c.TargetMessages,
		KeepRecentTurns: c.KeepRecentTurns, Model: c.Model, Prompt: c.Prompt, MaxSummaryTokens: c.MaxSummaryTokens, Titles: c.TitlesOn()}
}

// warnCompactionGap warns of agents whose messages between a summary and
// the window are injected by neither: max_messages below the number a
// compaction leaves uncovered.
func warnCompactionGap(cfg config.Config, log *slog.Logger) {
	check := func(name string, a config.Agent) {
		if c := a.Compaction; c.On() && a.MaxMessages > 0 && a.MaxMessages < c.TriggerMessages {
			log.Warn("compaction: max_messages is below compaction.trigger_messages, so up to the difference of the messages after the latest summary are injected by neither the summary nor the window; raise max_messages, or lower the trigger",
				"agent", name, "max_messages", a.MaxMessages, "trigger_messages", c.TriggerMessages)
		}
	}
	check("defaults", cfg.Defaults)
	for name := range cfg.Agents {
		check(name, cfg.Agent(name))
	}
}

func agent(a config.Agent) proxy.Agent {
	return proxy.Agent{Mode: a.Mode, MaxTokens: a.MaxTokens, MaxMessages: a.MaxMessages, OutputReserve: a.OutputReserve,
		Policy:   history.Policy{IdleTimeout: a.IdleTimeout, Retention: a.Retention},
		Ordering: a.Ordering, OrderingTimeout: a.OrderingTimeout, OnClientDisconnect: a.OnClientDisconnect}
}

// adminAllowed says whether the conversations API may be served: always
// behind a token, and without one only on a loopback listener, where no
// other machine can reach it.
func adminAllowed(token string, addr net.Addr) bool {
	if token != "" {
		return true
	}
	ta, ok := addr.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}

// adminRoutes serves health, readiness and metrics, off the client port,
// and the conversations API under /admin/v1/ and the console under
// /console/ when api is not nil (the console shows nothing without it).
// Readiness fails on a store outage only when failing closed: failing open,
// the proxy still serves (without history), and pulling every instance out
// of the load balancer at once would turn a Redis blip into an outage.
//
// The readiness ping is bounded by store.timeout: a probe that waits longer
// than the orchestrator's own timeout (1 s by default in Kubernetes) fails
// every instance at once.
//
// While the process drains, readiness fails at once: the load balancer
// must stop sending before the listener is gone.
func adminRoutes(s proxy.Store, reg *prometheus.Registry, failClosed bool, storeTimeout time.Duration, draining *atomic.Bool, api http.Handler) http.Handler {
	mux := http.NewServeMux()
	if api != nil {
		mux.Handle(admin.Prefix, api)
		ui := console.Handler()
		mux.Handle(console.Prefix, ui)
		mux.Handle("GET /console", ui)
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if draining.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, `{"status":"draining"}`)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), storeTimeout)
		defer cancel()
		if err := s.Ping(ctx); err != nil {
			status, code := "degraded", http.StatusOK
			if failClosed {
				status, code = "unavailable", http.StatusServiceUnavailable
			}
			w.WriteHeader(code)
			fmt.Fprintf(w, "{\"status\":%q,\"store\":%q}\n", status, err.Error())
			return
		}
		fmt.Fprintln(w, `{"status":"ok","store":"ok"}`)
	})
	mux.Handle("GET /metrics", metrics.Handler(reg))
	return mux
}

// withPprof adds Go's profiler (net/http/pprof) under /debug/pprof/ to
// the admin routes (admin.pprof): CPU and heap profiles of the running
// proxy, under its real load, are what tell where its time and memory go.
// Its handlers are mounted here only; the package's own registration on
// http.DefaultServeMux is served by nothing.
func withPprof(next http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.Handle("/", next)
	return mux
}

func newLogger(c config.Log, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.Level)); err != nil {
		return nil, fmt.Errorf("log.level %q: %w", c.Level, err)
	}
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		// slog writes a time.Duration to JSON as integer nanoseconds; a Go
		// duration string ("1.5s") is what the text format and the
		// configuration show, and what a reader expects.
		opts.ReplaceAttr = func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() == slog.KindDuration {
				a.Value = slog.StringValue(a.Value.Duration().String())
			}
			return a
		}
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}

// redisLogger hands go-redis's log lines to slog. go-redis logs only what
// goes wrong (failed dials, bad connections), so they are warnings.
type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.WarnContext(ctx, strings.TrimPrefix(fmt.Sprintf(format, v...), "redis: "))
}

// healthcheck asks the admin listener's /healthz; it exits non-zero when
// the process does not answer. -h writes its usage to usage.
func healthcheck(args []string, getenv func(string) string, usage io.Writer) error {
	cfg, _, err := config.LoadCommand(config.Command{
		Name:    "healthcheck",
		Summary: "Asks the admin listener's /healthz and exits 1 unless it answers 200: the container's HEALTHCHECK, since the image has no curl.",
	}, args, getenv, usage)
	if err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(cfg.AdminListen)
	if err != nil {
		return err
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(host, port) + "/healthz")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthz answered %s", resp.Status)
	}
	return nil
}

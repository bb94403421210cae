// Package config holds historyproxy's settings: defaults, an optional YAML
// file, HISTORYPROXY_* environment variables and command-line flags, in
// rising order of precedence. Loading has no side effects.
package config

import (
	"cmp"
	"maps"
	"net/url"
	"slices"
	"time"
)

// Config is the whole configuration. The zero value is not useful; use
// Default or Load.
type Config struct {
	Listen      string `yaml:"listen"`       // client-facing address, default ":8080"
	AdminListen string `yaml:"admin_listen"` // health, readiness and metrics; default "127.0.0.1:9090"

	Upstream Upstream `yaml:"upstream"`
	Admin    Admin    `yaml:"admin"`
	Redis    Redis    `yaml:"redis"`
	Store    Store    `yaml:"store"`
	Session  Session  `yaml:"session"`
	Client   Client   `yaml:"client"`

	// Defaults are the agent settings used for any agent not listed in
	// Agents, and the base that listed agents' unset fields fall back to.
	Defaults Agent            `yaml:"defaults"`
	Agents   map[string]Agent `yaml:"agents"`

	Tokens  Tokens           `yaml:"tokens"`
	Models  map[string]Model `yaml:"models"` // extends or overrides the built-in model table
	Metrics Metrics          `yaml:"metrics"`
	Log     Log              `yaml:"log"`

	DrainTimeout time.Duration `yaml:"drain_timeout"`  // default 30s
	MaxBodyBytes int64         `yaml:"max_body_bytes"` // default 20 MiB

	// MaxRequestMessages bounds the messages of one chat request (400
	// beyond). Default 4096.
	MaxRequestMessages int `yaml:"max_request_messages"`
	// MaxRequestContentParts bounds the content parts of all the messages
	// of one chat request together (400 beyond). Default 4096.
	MaxRequestContentParts int `yaml:"max_request_content_parts"`
	// MaxRequestTools bounds the tools of one chat request, and the tool
	// calls of all its messages together (400 beyond). Default 4096.
	MaxRequestTools int `yaml:"max_request_tools"`
	// MaxTurnMessages bounds the request messages one turn records (the
	// reply comes on top), so that no single write holds Redis for long. A
	// request that would record more is refused with 400 before it is
	// forwarded. Default 256.
	MaxTurnMessages int `yaml:"max_turn_messages"`
	// MaxInflightBytes bounds the bytes of chat request bodies held at
	// once; past it a request gets 503 with Retry-After. Default 256 MiB.
	MaxInflightBytes int64 `yaml:"max_inflight_bytes"`
}

// Upstream is the real OpenAI-compatible server.
type Upstream struct {
	URL string `yaml:"url"` // base URL including /v1, default "https://api.openai.com/v1"
	// APIKeyEnv names an environment variable holding the upstream key.
	// When set (and the variable is not empty) the proxy sends that key and
	// drops the client's Authorization header.
	APIKeyEnv string `yaml:"api_key_env"`
	// APIKey is read from APIKeyEnv at load time, never from the file.
	APIKey string `yaml:"-"`
	// Timeout bounds the wait for the upstream's response headers (504
	// after it). A stream, once started, is not cut by it. Default 10m.
	Timeout time.Duration `yaml:"timeout"`
	// StreamIdleTimeout bounds the upstream's silence once a chat
	// completion's response has begun: a reply (streamed or whole) whose
	// next bytes do not come within it is cut. Default 5m.
	StreamIdleTimeout time.Duration `yaml:"stream_idle_timeout"`
	// Passthrough lists the calls forwarded upstream, as net/http ServeMux
	// patterns on the client's path ("GET /v1/models/{model...}"); "*"
	// forwards everything. Empty: everything without a held key; with one
	// (APIKeyEnv set), the proxy's default list: chat completions, models,
	// embeddings and moderations.
	Passthrough []string `yaml:"passthrough"`
	// Organization and Project, when set, are sent as the OpenAI-Organization
	// and OpenAI-Project headers in place of the client's. With a held key
	// the client's own are always dropped, so that a client cannot pick
	// what the proxy's key bills.
	Organization string `yaml:"organization"`
	Project      string `yaml:"project"`
}

// Admin configures the conversations API, served under /admin/v1 on the
// admin listener.
type Admin struct {
	// TokenEnv names an environment variable holding the bearer token that
	// every /admin/v1 route then requires. Without one, the routes answer
	// only when the admin listener is on loopback.
	TokenEnv string `yaml:"token_env"`
	// Token is read from TokenEnv at load time, never from the file.
	Token string `yaml:"-"`
	// Pprof serves Go's profiler (net/http/pprof) under /debug/pprof/ on
	// the admin listener. Off by default: a profile shows the program's
	// inner workings and costs CPU while it runs.
	Pprof bool `yaml:"pprof"`
}

// MinAdminToken is the shortest admin token Load accepts: a short one
// could be guessed.
const MinAdminToken = 16

// Redis says where conversations live. All empty: the in-memory store.
type Redis struct {
	URL            string   `yaml:"url"` // redis:// or rediss://
	ClusterAddrs   []string `yaml:"cluster_addrs"`
	SentinelMaster string   `yaml:"sentinel_master"`
	SentinelAddrs  []string `yaml:"sentinel_addrs"`
	Username       string   `yaml:"username"`
	// PasswordEnv names an environment variable holding the password, for
	// the address-list forms (a URL carries its own).
	PasswordEnv string `yaml:"password_env"`
	Password    string `yaml:"-"`
	// TLS connects with TLS in the address-list forms; a URL says
	// rediss:// instead.
	TLS    bool   `yaml:"tls"`
	Prefix string `yaml:"prefix"` // key prefix, default "hp"
}

// Enabled reports whether a Redis store is configured.
func (r Redis) Enabled() bool {
	return r.URL != "" || len(r.ClusterAddrs) > 0 || len(r.SentinelAddrs) > 0
}

// Store is how the proxy treats store failures.
type Store struct {
	// OnError is "fail_open" (default: serve without history, queue the
	// turn for retry) or "fail_closed" (503, nothing forwarded).
	OnError    string        `yaml:"on_error"`
	RetryQueue int           `yaml:"retry_queue"` // turns held while the store is down, default 10000
	Timeout    time.Duration `yaml:"timeout"`     // per store operation, default 2s
	// MemoryMaxBytes caps the in-memory store (no Redis configured): past
	// it, the least recently active sessions are erased. 0: no cap.
	// Default 256 MiB.
	MemoryMaxBytes int64 `yaml:"memory_max_bytes"`
	// RequireAtStart refuses to start when the configured Redis does not
	// answer at start-up. False (default): start anyway, log the problem
	// as an error, and serve as on_error says until Redis answers.
	RequireAtStart bool `yaml:"require_at_start"`
	// LeaseTTL is how long a session's turn lease lasts in Redis without
	// renewal (its holder renews it while its reply runs): how long the
	// session waits, at most, for a request whose process died. Default
	// 10s.
	LeaseTTL time.Duration `yaml:"lease_ttl"`
	// RetryQueueBytes bounds the bytes the retry queue's turns hold (an
	// estimate), so that an outage with very large turns cannot exhaust
	// memory. 0: no bound in bytes. Default 64 MiB.
	RetryQueueBytes int64 `yaml:"retry_queue_bytes"`
	// WindowCacheBytes bounds the heap a Redis store keeps of each
	// session's newest messages, so that a turn reads from Redis only the
	// messages added since the session's last one. 0: no cache. Default
	// 16 MiB.
	WindowCacheBytes int64 `yaml:"window_cache_bytes"`
}

// Client bounds what one client connection can hold on the client port.
type Client struct {
	// ReadTimeout bounds the reading of a whole request, headers and body
	// (then 408 or a closed connection). Default 60s.
	ReadTimeout time.Duration `yaml:"read_timeout"`
	// WriteTimeout bounds how long one write to the client may wait for a
	// client that stopped reading; the response is then cut. It is renewed
	// on every write, so a stream being read is never cut. Default 30s.
	WriteTimeout time.Duration `yaml:"write_timeout"`
	// IdleTimeout closes a keep-alive connection left idle that long.
	// Default 120s.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
}

// Session is how requests map to sessions.
type Session struct {
	Require        bool   `yaml:"require"`         // 400 when no user can be found
	DefaultChannel string `yaml:"default_channel"` // default "api"
	DefaultAgent   string `yaml:"default_agent"`   // default "default"
}

// Agent modes.
const (
	ModePerUser = "per_user"
	ModeShared  = "shared"
	ModeOff     = "off"
)

// What a streamed reply does when its client goes away
// (Agent.OnClientDisconnect).
const (
	DisconnectCancel = "cancel"
	DisconnectFinish = "finish"
)

// Orderings of a session's turns (Agent.Ordering).
const (
	OrderingWait   = "wait"
	OrderingReject = "reject"
	OrderingOff    = "off"
)

// Agent is one agent's history settings. Zero fields fall back to
// Config.Defaults.
type Agent struct {
	Mode          string        `yaml:"mode"`           // per_user (default), shared, off
	MaxTokens     int           `yaml:"max_tokens"`     // history token budget, default 4000
	MaxMessages   int           `yaml:"max_messages"`   // default 20
	OutputReserve int           `yaml:"output_reserve"` // reserved output tokens when the request names none, default 1024
	IdleTimeout   time.Duration `yaml:"idle_timeout"`   // 0: never idle
	Retention     time.Duration `yaml:"retention"`      // 0: keep forever
	// Ordering is what a request does when another request of its session
	// is generating: wait (default) for its turn, reject (409
	// conversation_busy at once), or off (no ordering: both read the same
	// history).
	Ordering string `yaml:"ordering"`
	// OrderingTimeout bounds the wait for the turn (then 409
	// conversation_busy). Default 60s.
	OrderingTimeout time.Duration `yaml:"ordering_timeout"`
	// OnClientDisconnect is what a reply does when its client goes away:
	// cancel (default: the upstream request is cancelled, what was
	// generated is recorded incomplete) or finish (the reply is read to
	// its end from the upstream and recorded complete).
	OnClientDisconnect string `yaml:"on_client_disconnect"`
	// Compaction summarizes a long conversation's older turns in the
	// background, instead of letting them fall out of the window.
	Compaction Compaction `yaml:"compaction"`
}

// Compaction is an agent's compaction settings. In an agents entry, a
// field left out (nil or 0) inherits from defaults.compaction.
type Compaction struct {
	// Enabled turns summaries on; default off, so no upstream call is made
	// that the operator did not ask for.
	Enabled *bool `yaml:"enabled"`
	// TriggerMessages: a conversation whose messages not covered by a
	// summary pass this is compacted after its turn (default 50).
	TriggerMessages int `yaml:"trigger_messages"`
	// TargetMessages is how many messages stay uncovered after a
	// compaction (default 30).
	TargetMessages int `yaml:"target_messages"`
	// KeepRecentTurns: the newest this many user turns are never folded
	// in (default 10).
	KeepRecentTurns int `yaml:"keep_recent_turns"`
	// Model summarizes; "" means the model of the request that triggered
	// the compaction.
	Model string `yaml:"model"`
	// Prompt is the summarizer's system prompt; "" means the built-in one.
	Prompt string `yaml:"prompt"`
	// MaxSummaryTokens bounds a summary's length (default 512).
	MaxSummaryTokens int `yaml:"max_summary_tokens"`
	// Titles generates a conversation's title in the background after its
	// first turn (default false).
	Titles *bool `yaml:"titles"`
}

// On reports whether summaries are enabled.
func (c Compaction) On() bool { return c.Enabled != nil && *c.Enabled }

// TitlesOn reports whether titles are generated in the background.
func (c Compaction) TitlesOn() bool { return c.Titles != nil && *c.Titles }

// Tokens configures counting.
type Tokens struct {
	DefaultEncoding string `yaml:"default_encoding"` // for unknown models, default "o200k_base"
}

// Model is one model's entry in the model table. Prices are USD per one
// million tokens.
type Model struct {
	ContextWindow int     `yaml:"context_window"`
	Input         float64 `yaml:"input"`
	CachedInput   float64 `yaml:"cached_input"`
	Output        float64 `yaml:"output"`
}

// Metrics configures Prometheus export.
type Metrics struct {
	SessionSeriesLimit int `yaml:"session_series_limit"` // default 10000
	// SessionLabel is how per-session series name their session: id (the
	// default), hash (channel:<keyed hash>:agent) or off (no per-session
	// series).
	SessionLabel string `yaml:"session_label"`
	// SessionLabelKeyEnv names an environment variable holding the key of
	// the hash (at least 16 bytes); required with session_label hash.
	SessionLabelKeyEnv string `yaml:"session_label_key_env"`
	// SessionLabelKey is read from SessionLabelKeyEnv at load time, never
	// from the file.
	SessionLabelKey string `yaml:"-"`
}

// Log configures log/slog.
type Log struct {
	Format string `yaml:"format"` // text (default) or json
	Level  string `yaml:"level"`  // debug, info (default), warn, error
}

// Default returns the configuration used before any file, environment
// variable or flag is applied. Every field a later source may leave unset
// has a working value here, so a proxy started with no configuration runs
// against api.openai.com with an in-memory store.
func Default() Config {
	return Config{
		Listen:      ":8080",
		AdminListen: "127.0.0.1:9090",
		Upstream: Upstream{
			URL:               "https://api.openai.com/v1",
			Timeout:           10 * time.Minute,
			StreamIdleTimeout: 5 * time.Minute,
		},
		Redis: Redis{Prefix: "hp"},
		Store: Store{
			OnError:          "fail_open",
			RetryQueue:       10000,
			RetryQueueBytes:  64 << 20,
			Timeout:          2 * time.Second,
			MemoryMaxBytes:   256 << 20,
			LeaseTTL:         10 * time.Second,
			WindowCacheBytes: 16 << 20,
		},
		Session: Session{
			DefaultChannel: "api",
			DefaultAgent:   "default",
		},
		Client: Client{
			ReadTimeout:  time.Minute,
			WriteTimeout: 30 * time.Second,
			// Longer than the 60 s idle timeout of common load balancers,
			// so that they close an idle connection first and never send
			// on one the proxy is closing.
			IdleTimeout: 2 * time.Minute,
		},
		Defaults: Agent{
			Mode:          ModePerUser,
			MaxTokens:     4000,
			MaxMessages:   20,
			OutputReserve: 1024,

			Ordering:           OrderingWait,
			OrderingTimeout:    time.Minute,
			OnClientDisconnect: DisconnectCancel,
			Compaction: Compaction{
				Enabled:          new(bool),
				TriggerMessages:  50,
				TargetMessages:   30,
				KeepRecentTurns:  10,
				MaxSummaryTokens: 512,
				Titles:           new(bool),
			},
		},
		Tokens:           Tokens{DefaultEncoding: "o200k_base"},
		Metrics:          Metrics{SessionSeriesLimit: 10000, SessionLabel: "id"},
		Log:              Log{Format: "text", Level: "info"},
		DrainTimeout:     30 * time.Second,
		MaxBodyBytes:     20 << 20,
		MaxInflightBytes: 256 << 20,

		MaxRequestMessages:     4096,
		MaxRequestContentParts: 4096,
		MaxRequestTools:        4096,
		MaxTurnMessages:        256,
	}
}

// Agent returns the settings for the named agent: its entry in Agents with
// every zero field taken from Defaults, or Defaults itself for an agent not
// listed. Because zero means "inherit", an entry cannot set IdleTimeout or
// Retention back to 0 (never) when Defaults sets them; leave them unset in
// Defaults instead.
func (c Config) Agent(name string) Agent {
	a, ok := c.Agents[name]
	if !ok {
		return c.Defaults
	}
	d := c.Defaults
	a.Mode = cmp.Or(a.Mode, d.Mode)
	a.MaxTokens = cmp.Or(a.MaxTokens, d.MaxTokens)
	a.MaxMessages = cmp.Or(a.MaxMessages, d.MaxMessages)
	a.OutputReserve = cmp.Or(a.OutputReserve, d.OutputReserve)
	a.IdleTimeout = cmp.Or(a.IdleTimeout, d.IdleTimeout)
	a.Retention = cmp.Or(a.Retention, d.Retention)
	a.Ordering = cmp.Or(a.Ordering, d.Ordering)
	a.OrderingTimeout = cmp.Or(a.OrderingTimeout, d.OrderingTimeout)
	a.OnClientDisconnect = cmp.Or(a.OnClientDisconnect, d.OnClientDisconnect)
	a.Compaction = a.Compaction.inherit(d.Compaction)
	return a
}

// inherit fills c's unset fields from d.
func (c Compaction) inherit(d Compaction) Compaction {
	c.Enabled = cmp.Or(c.Enabled, d.Enabled)
	c.TriggerMessages = cmp.Or(c.TriggerMessages, d.TriggerMessages)
	c.TargetMessages = cmp.Or(c.TargetMessages, d.TargetMessages)
	c.KeepRecentTurns = cmp.Or(c.KeepRecentTurns, d.KeepRecentTurns)
	c.Model = cmp.Or(c.Model, d.Model)
	c.Prompt = cmp.Or(c.Prompt, d.Prompt)
	c.MaxSummaryTokens = cmp.Or(c.MaxSummaryTokens, d.MaxSummaryTokens)
	c.Titles = cmp.Or(c.Titles, d.Titles)
	return c
}

// redacted replaces a secret in a configuration meant for logs.
const redacted = "REDACTED"

// Redacted returns a copy safe to log: the upstream API key, the Redis
// password and any password inside Redis.URL are replaced by "REDACTED"
// when set. Maps and slices are copied too, so changing the copy never
// changes c.
func (c Config) Redacted() Config {
	if c.Upstream.APIKey != "" {
		c.Upstream.APIKey = redacted
	}
	if c.Redis.Password != "" {
		c.Redis.Password = redacted
	}
	if c.Admin.Token != "" {
		c.Admin.Token = redacted
	}
	if c.Metrics.SessionLabelKey != "" {
		c.Metrics.SessionLabelKey = redacted
	}
	c.Redis.URL = redactURL(c.Redis.URL)
	c.Upstream.Passthrough = slices.Clone(c.Upstream.Passthrough)
	c.Redis.ClusterAddrs = slices.Clone(c.Redis.ClusterAddrs)
	c.Redis.SentinelAddrs = slices.Clone(c.Redis.SentinelAddrs)
	c.Agents = maps.Clone(c.Agents)
	c.Models = maps.Clone(c.Models)
	return c
}

// redactURL hides the password of a Redis URL. A URL that does not parse
// is hidden whole, since where its password would be cannot be known.
func redactURL(raw string) string {
	if raw == "" {
		return ""
	}
	u, err := url.Parse(raw)
	if err != nil {
		return redacted
	}
	if u.User == nil {
		return raw
	}
	if _, ok := u.User.Password(); !ok {
		return raw
	}
	u.User = url.UserPassword(u.User.Username(), redacted)
	return u.String()
}

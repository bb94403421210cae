package config

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/historyproxy/historyproxy/history"
)

// Accepted values of the enumerated settings.
var (
	onErrorPolicies = []string{"fail_open", "fail_closed"}
	agentModes      = []string{ModePerUser, ModeShared, ModeOff}
	orderings       = []string{OrderingWait, OrderingReject, OrderingOff}
	disconnects     = []string{DisconnectCancel, DisconnectFinish}
	encodings       = []string{"o200k_base", "cl100k_base", "p50k_base", "r50k_base"}
	logFormats      = []string{"text", "json"}
	logLevels       = []string{"debug", "info", "warn", "error"}
	redisSchemes    = []string{"redis", "rediss", "unix"}
	sessionLabels   = []string{"id", "hash", "off"}
)

// minSessionLabelKey is the shortest key of metrics.session_label hash, as
// metrics.MinSessionLabelKey.
const minSessionLabelKey = 16

// maxPartLen is the longest session part, as the proxy accepts them.
const maxPartLen = history.MaxPartLen

// Prices are USD per 1M tokens. The proxy counts costs in whole nano-USD
// per token (tokens.PriceDecimals), so a price may have at most three
// decimals; refusing finer ones beats rounding them (0.0004 would become 0).
// maxPrice keeps a request's cost far inside an int64 of nano-USD.
const (
	priceDecimals = 3
	maxPrice      = 1_000_000
)

// decimals returns how many decimals the shortest exact form of f has.
func decimals(f float64) int {
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if i := strings.IndexByte(s, '.'); i >= 0 {
		return len(s) - i - 1
	}
	return 0
}

// Validate reports every problem in c at once, joined with errors.Join.
// Each error starts with the field's YAML path and quotes the bad value,
// e.g. `agents.support.mode: "sometimes" is not one of per_user, shared,
// off`. Load calls it; a caller that builds a Config by hand can too.
func (c Config) Validate() error {
	var v validator

	v.hostPort("listen", c.Listen)
	v.hostPort("admin_listen", c.AdminListen)

	if u, err := url.Parse(c.Upstream.URL); err != nil {
		v.addf("upstream.url", c.Upstream.URL, "is not a URL: %v", err)
	} else if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		v.addf("upstream.url", c.Upstream.URL, "is not an absolute http or https URL")
	}
	v.positive("upstream.timeout", c.Upstream.Timeout)
	v.positive("upstream.stream_idle_timeout", c.Upstream.StreamIdleTimeout)
	v.passthrough(c.Upstream.Passthrough)

	r := c.Redis
	if r.URL != "" {
		if u, err := url.Parse(r.URL); err != nil {
			// url.Error quotes the URL; redact it, since it may hold a password.
			v.addf("redis.url", redactURL(r.URL), "is not a URL")
		} else if !slices.Contains(redisSchemes, u.Scheme) {
			v.addf("redis.url", redactURL(r.URL), "has scheme %q, not one of %s", u.Scheme, strings.Join(redisSchemes, ", "))
		}
		if len(r.ClusterAddrs) > 0 || len(r.SentinelAddrs) > 0 || r.SentinelMaster != "" {
			v.addf("redis.url", redactURL(r.URL), "cannot be used with redis.cluster_addrs or redis.sentinel_addrs/sentinel_master; choose one")
		}
		// A URL carries its own user, password and scheme; these settings
		// would be ignored, and a tls: true ignored means plain text.
		if r.TLS {
			v.addf("redis.tls", r.TLS, "cannot be used with redis.url: a URL asks for TLS with rediss://")
		}
		if r.Username != "" {
			v.addf("redis.username", r.Username, "cannot be used with redis.url: put the user in the URL (redis://user:password@host:6379/0)")
		}
		if r.PasswordEnv != "" {
			v.addf("redis.password_env", r.PasswordEnv, "cannot be used with redis.url: put the password in the URL (redis://user:password@host:6379/0), for example through HISTORYPROXY_REDIS_URL")
		}
	} else if !r.Enabled() {
		for _, s := range []struct {
			key string
			set bool
		}{{"redis.tls", r.TLS}, {"redis.username", r.Username != ""}, {"redis.password_env", r.PasswordEnv != ""}} {
			if s.set {
				v.errs = append(v.errs, &FieldError{Field: s.key, Msg: "is set but no Redis is configured (redis.url, redis.cluster_addrs or redis.sentinel_addrs)"})
			}
		}
		if c.Store.RequireAtStart {
			v.errs = append(v.errs, &FieldError{Field: "store.require_at_start", Msg: "is true but no Redis is configured: the in-memory store is always there"})
		}
	}
	if r.SentinelMaster != "" && len(r.SentinelAddrs) == 0 {
		v.addf("redis.sentinel_master", r.SentinelMaster, "needs redis.sentinel_addrs")
	}
	if r.SentinelMaster == "" && len(r.SentinelAddrs) > 0 {
		v.addf("redis.sentinel_addrs", strings.Join(r.SentinelAddrs, ","), "needs redis.sentinel_master")
	}
	if len(r.ClusterAddrs) > 0 && (len(r.SentinelAddrs) > 0 || r.SentinelMaster != "") {
		v.addf("redis.cluster_addrs", strings.Join(r.ClusterAddrs, ","), "cannot be used with redis.sentinel_addrs/sentinel_master; choose one")
	}
	for i, a := range r.ClusterAddrs {
		v.hostPort(fmt.Sprintf("redis.cluster_addrs[%d]", i), a)
	}
	if strings.ContainsAny(r.Prefix, "{}") {
		// Every key of a session carries the hash tag {session}; a brace in
		// the prefix would become the tag instead, and put a session's keys
		// on different Cluster slots.
		v.addf("redis.prefix", r.Prefix, "must not contain { or }: the session's hash tag must be the first braces of every key")
	}
	for i, a := range r.SentinelAddrs {
		v.hostPort(fmt.Sprintf("redis.sentinel_addrs[%d]", i), a)
	}

	v.oneOf("store.on_error", c.Store.OnError, onErrorPolicies)
	if c.Store.RetryQueue < 0 {
		v.addf("store.retry_queue", c.Store.RetryQueue, "is negative")
	}
	if c.Store.RetryQueueBytes < 0 {
		v.addf("store.retry_queue_bytes", c.Store.RetryQueueBytes, "is negative")
	}
	if c.Store.MemoryMaxBytes < 0 {
		v.addf("store.memory_max_bytes", c.Store.MemoryMaxBytes, "is negative")
	}
	if c.Store.WindowCacheBytes < 0 {
		v.addf("store.window_cache_bytes", c.Store.WindowCacheBytes, "is negative")
	}
	v.positive("store.timeout", c.Store.Timeout)
	v.positive("store.lease_ttl", c.Store.LeaseTTL)
	if c.Store.LeaseTTL > 0 && c.Store.LeaseTTL < time.Second {
		v.addf("store.lease_ttl", c.Store.LeaseTTL, "is under 1s: a lease must outlast a few renewals and a slow store")
	}

	v.positive("client.read_timeout", c.Client.ReadTimeout)
	v.positive("client.write_timeout", c.Client.WriteTimeout)
	v.positive("client.idle_timeout", c.Client.IdleTimeout)

	v.sessionPart("session.default_channel", c.Session.DefaultChannel)
	v.sessionPart("session.default_agent", c.Session.DefaultAgent)

	v.oneOf("defaults.mode", c.Defaults.Mode, agentModes)
	v.oneOf("defaults.ordering", c.Defaults.Ordering, orderings)
	v.positive("defaults.ordering_timeout", c.Defaults.OrderingTimeout)
	v.oneOf("defaults.on_client_disconnect", c.Defaults.OnClientDisconnect, disconnects)
	v.agent("defaults", c.Defaults)
	for _, name := range slices.Sorted(maps.Keys(c.Agents)) {
		a := c.Agents[name]
		field := "agents." + name
		if !validSessionPart(name) {
			v.addf("agents", name, "is not a valid agent name (1 to %d bytes of letters, digits and ._@+-=)", maxPartLen)
		}
		if a.Mode != "" { // empty inherits defaults.mode
			v.oneOf(field+".mode", a.Mode, agentModes)
		}
		if a.Ordering != "" {
			v.oneOf(field+".ordering", a.Ordering, orderings)
		}
		if a.OnClientDisconnect != "" {
			v.oneOf(field+".on_client_disconnect", a.OnClientDisconnect, disconnects)
		}
		v.agent(field, a)
	}

	v.oneOf("tokens.default_encoding", c.Tokens.DefaultEncoding, encodings)

	for _, name := range slices.Sorted(maps.Keys(c.Models)) {
		m := c.Models[name]
		field := "models." + name
		if name == "" {
			v.addf("models", name, "is not a model name")
		}
		if m.ContextWindow < 0 {
			v.addf(field+".context_window", m.ContextWindow, "is negative")
		}
		for _, p := range []struct {
			key   string
			price float64
		}{{"input", m.Input}, {"cached_input", m.CachedInput}, {"output", m.Output}} {
			switch {
			case math.IsNaN(p.price): // passes every comparison below
				v.addf(field+"."+p.key, p.price, "is not a number")
			case p.price < 0:
				v.addf(field+"."+p.key, p.price, "is negative")
			case p.price > maxPrice:
				v.addf(field+"."+p.key, p.price, "is above %d USD per 1M tokens", maxPrice)
			case decimals(p.price) > priceDecimals:
				v.addf(field+"."+p.key, p.price, "has more than %d decimals: costs are counted in whole nano-USD per token (USD per 1M × 1000), so it cannot be held exactly", priceDecimals)
			}
		}
	}

	if c.Metrics.SessionSeriesLimit <= 0 {
		v.addf("metrics.session_series_limit", c.Metrics.SessionSeriesLimit, "must be positive")
	}
	v.oneOf("metrics.session_label", c.Metrics.SessionLabel, sessionLabels)
	if c.Metrics.SessionLabel == "hash" && c.Metrics.SessionLabelKeyEnv == "" {
		v.addf("metrics.session_label", c.Metrics.SessionLabel, "needs metrics.session_label_key_env, naming an environment variable that holds the hash's secret key (at least %d bytes)", minSessionLabelKey)
	}
	v.oneOf("log.format", c.Log.Format, logFormats)
	v.oneOf("log.level", c.Log.Level, logLevels)
	v.positive("drain_timeout", c.DrainTimeout)
	if c.MaxBodyBytes <= 0 {
		v.addf("max_body_bytes", c.MaxBodyBytes, "must be positive")
	}
	if c.MaxInflightBytes < c.MaxBodyBytes {
		v.addf("max_inflight_bytes", c.MaxInflightBytes, "is less than max_body_bytes (%d): a request of the largest size would never be served", c.MaxBodyBytes)
	}
	for _, n := range []struct {
		key   string
		value int
	}{{"max_request_messages", c.MaxRequestMessages}, {"max_request_content_parts", c.MaxRequestContentParts}, {"max_request_tools", c.MaxRequestTools}, {"max_turn_messages", c.MaxTurnMessages}} {
		if n.value <= 0 {
			v.addf(n.key, n.value, "must be positive")
		}
	}

	return errors.Join(v.errs...)
}

// FieldError is one problem with one setting. Field is the setting's YAML
// path (store.timeout); Load replaces it with the environment variable or
// flag that set the value, so the message names what the user wrote.
type FieldError struct {
	Field string
	Msg   string // what is wrong and what would be valid
	// Where, when set, is the file and line the value came from.
	Where string
}

func (e *FieldError) Error() string {
	if e.Where != "" {
		return e.Where + ": " + e.Field + ": " + e.Msg
	}
	return e.Field + ": " + e.Msg
}

// validator collects problems so that all of them are reported together.
type validator struct{ errs []error }

// addf records `field: value what`; strings are quoted so that an empty or
// blank value is visible.
func (v *validator) addf(field string, value any, format string, args ...any) {
	shown := fmt.Sprint(value)
	if s, ok := value.(string); ok {
		shown = fmt.Sprintf("%q", s)
	}
	v.errs = append(v.errs, &FieldError{Field: field, Msg: shown + " " + fmt.Sprintf(format, args...)})
}

func (v *validator) oneOf(field, value string, allowed []string) {
	if !slices.Contains(allowed, value) {
		v.addf(field, value, "is not one of %s", strings.Join(allowed, ", "))
	}
}

func (v *validator) positive(field string, d time.Duration) {
	if d <= 0 {
		v.addf(field, d, "must be positive")
	}
}

// hostPort accepts what net.Listen and net.Dial accept for TCP: a host
// (possibly empty, meaning every interface) and a non-empty port.
func (v *validator) hostPort(field, value string) {
	_, port, err := net.SplitHostPort(value)
	switch {
	case err != nil:
		v.addf(field, value, "is not host:port")
	case port == "":
		v.addf(field, value, "has no port")
	}
}

func (v *validator) sessionPart(field, value string) {
	if !validSessionPart(value) {
		v.addf(field, value, "is not a valid session part (1 to %d bytes of letters, digits and ._@+-=)", maxPartLen)
	}
}

// agent checks the numbers of an agent entry. Zero is allowed everywhere:
// in an entry it means "inherit from defaults".
func (v *validator) agent(field string, a Agent) {
	for _, n := range []struct {
		key   string
		value int
	}{{"max_tokens", a.MaxTokens}, {"max_messages", a.MaxMessages}, {"output_reserve", a.OutputReserve}} {
		if n.value < 0 {
			v.addf(field+"."+n.key, n.value, "is negative")
		}
	}
	if a.IdleTimeout < 0 {
		v.addf(field+".idle_timeout", a.IdleTimeout, "is negative")
	}
	if a.Retention < 0 {
		v.addf(field+".retention", a.Retention, "is negative")
	}
	if a.OrderingTimeout < 0 {
		v.addf(field+".ordering_timeout", a.OrderingTimeout, "is negative")
	}
	c := a.Compaction
	for _, n := range []struct {
		key   string
		value int
	}{{"trigger_messages", c.TriggerMessages}, {"target_messages", c.TargetMessages},
		{"keep_recent_turns", c.KeepRecentTurns}, {"max_summary_tokens", c.MaxSummaryTokens}} {
		if n.value < 0 {
			v.addf(field+".compaction."+n.key, n.value, "is negative")
		}
	}
	if c.TriggerMessages > 0 && c.TargetMessages > 0 && c.TargetMessages >= c.TriggerMessages {
		v.addf(field+".compaction.target_messages", c.TargetMessages,
			"must be below compaction.trigger_messages (%d): a compaction brings a conversation down from the trigger to the target", c.TriggerMessages)
	}
	if c.MaxSummaryTokens > maxSummaryTokens {
		v.addf(field+".compaction.max_summary_tokens", c.MaxSummaryTokens, "is above %d: a summary is injected into every request", maxSummaryTokens)
	}
}

// maxSummaryTokens bounds compaction.max_summary_tokens.
const maxSummaryTokens = 32768

// passthrough checks upstream.passthrough: each entry is "*" or a
// net/http ServeMux pattern on a path under /v1 (the path the client
// sends). They are registered in a scratch mux, so a malformed, repeated or
// conflicting pattern is reported here rather than by a panic in the proxy.
func (v *validator) passthrough(entries []string) {
	mux := http.NewServeMux()
	for i, e := range entries {
		field := fmt.Sprintf("upstream.passthrough[%d]", i)
		if e == "*" {
			continue
		}
		path := e
		if i := strings.IndexAny(e, " \t"); i >= 0 {
			path = strings.TrimLeft(e[i:], " \t")
		}
		if path != "/v1" && !strings.HasPrefix(path, "/v1/") {
			v.addf(field, e, "must be [METHOD ]/v1/path, a pattern on the client's path, or *")
			continue
		}
		if err := register(mux, e); err != nil {
			v.addf(field, e, "is not a valid pattern: %v", err)
		}
	}
}

var registeredAt = regexp.MustCompile(` \(registered at [^)]*\)`)

// register adds pattern to mux, turning ServeMux's panic on a bad pattern
// into an error.
func register(mux *http.ServeMux, pattern string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			// Drop the source position ServeMux names, which is this file's.
			msg := registeredAt.ReplaceAllString(fmt.Sprint(r), "")
			err = errors.New(strings.Join(strings.Fields(msg), " "))
		}
	}()
	mux.Handle(pattern, http.NotFoundHandler())
	return nil
}

// validSessionPart reports whether s can be one part of a session id, by
// the rule the proxy applies to the parts a client sends (history.CheckPart:
// 1 to 128 bytes of letters and digits, non-ASCII ones included, and
// ._@+-=). Agent names and the default channel and agent end up in the same
// session ids and Redis keys, so what a client may send is allowed here too,
// and what the proxy would reject is rejected at start-up.
func validSessionPart(s string) bool { return history.CheckPart(s) == nil }

package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// env returns a getenv that sees only m, so no test depends on the
// process environment.
func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// writeConfig writes a YAML file into a fresh directory and returns its path.
func writeConfig(t *testing.T, yaml string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "historyproxy.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// load calls Load and fails the test on error.
func load(t *testing.T, args []string, vars map[string]string) Config {
	t.Helper()
	var out bytes.Buffer
	cfg, err := Load(args, env(vars), &out)
	if err != nil {
		t.Fatalf("Load(%q): %v\noutput: %s", args, err, out.String())
	}
	return cfg
}

// loadErr calls Load and returns its error, failing the test when there is
// none.
func loadErr(t *testing.T, args []string, vars map[string]string) error {
	t.Helper()
	var out bytes.Buffer
	_, err := Load(args, env(vars), &out)
	if err == nil {
		t.Fatalf("Load(%q): got no error, want one", args)
	}
	return err
}

func TestLoadNothingGivesDefault(t *testing.T) {
	got := load(t, nil, nil)
	if want := Default(); !reflect.DeepEqual(got, want) {
		t.Errorf("Load with no sources:\ngot  %+v\nwant %+v", got, want)
	}
}

func TestDefaultValues(t *testing.T) {
	d := Default()
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"listen", d.Listen, ":8080"},
		{"admin_listen", d.AdminListen, "127.0.0.1:9090"},
		{"upstream.url", d.Upstream.URL, "https://api.openai.com/v1"},
		{"upstream.api_key_env", d.Upstream.APIKeyEnv, ""},
		{"upstream.timeout", d.Upstream.Timeout, 10 * time.Minute},
		{"redis.url", d.Redis.URL, ""},
		{"redis.prefix", d.Redis.Prefix, "hp"},
		{"redis enabled", d.Redis.Enabled(), false},
		{"store.on_error", d.Store.OnError, "fail_open"},
		{"store.retry_queue", d.Store.RetryQueue, 10000},
		{"store.timeout", d.Store.Timeout, 2 * time.Second},
		{"store.memory_max_bytes", d.Store.MemoryMaxBytes, int64(256 << 20)},
		{"session.require", d.Session.Require, false},
		{"session.default_channel", d.Session.DefaultChannel, "api"},
		{"session.default_agent", d.Session.DefaultAgent, "default"},
		{"client.read_timeout", d.Client.ReadTimeout, time.Minute},
		{"upstream.stream_idle_timeout", d.Upstream.StreamIdleTimeout, 5 * time.Minute},
		{"client.write_timeout", d.Client.WriteTimeout, 30 * time.Second},
		{"client.idle_timeout", d.Client.IdleTimeout, 2 * time.Minute},
		{"defaults", d.Defaults, Agent{Mode: ModePerUser, MaxTokens: 4000, MaxMessages: 20, OutputReserve: 1024, Ordering: OrderingWait, OrderingTimeout: time.Minute,
			OnClientDisconnect: DisconnectCancel,
			Compaction:         Compaction{Enabled: ptr(false), TriggerMessages: 50, TargetMessages: 30, KeepRecentTurns: 10, MaxSummaryTokens: 512, Titles: ptr(false)}}},
		{"store.retry_queue_bytes", d.Store.RetryQueueBytes, int64(64 << 20)},
		{"store.window_cache_bytes", d.Store.WindowCacheBytes, int64(16 << 20)},
		{"store.lease_ttl", d.Store.LeaseTTL, 10 * time.Second},
		{"tokens.default_encoding", d.Tokens.DefaultEncoding, "o200k_base"},
		{"metrics.session_series_limit", d.Metrics.SessionSeriesLimit, 10000},
		{"metrics.session_label", d.Metrics.SessionLabel, "id"},
		{"log.format", d.Log.Format, "text"},
		{"log.level", d.Log.Level, "info"},
		{"drain_timeout", d.DrainTimeout, 30 * time.Second},
		{"max_body_bytes", d.MaxBodyBytes, int64(20 << 20)},
		{"max_request_messages", d.MaxRequestMessages, 4096},
		{"max_request_content_parts", d.MaxRequestContentParts, 4096},
		{"max_request_tools", d.MaxRequestTools, 4096},
		{"max_turn_messages", d.MaxTurnMessages, 256},
		{"upstream.passthrough", d.Upstream.Passthrough, []string(nil)},
		{"max_inflight_bytes", d.MaxInflightBytes, int64(256 << 20)},
	} {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}
	if err := d.Validate(); err != nil {
		t.Errorf("Default().Validate(): %v", err)
	}
}

// TestPrecedence checks, for every flag, that the file overrides the
// default, the environment overrides the file, and the flag overrides the
// environment, and that a source that does not mention the field leaves it.
func TestPrecedence(t *testing.T) {
	cases := []struct {
		flag string // also names the variable: HISTORYPROXY_ + upper snake
		yaml string // a YAML document setting the field to the file value
		// Values at each layer; each differs from the one before.
		def, file, env, flagV string
		get                   func(Config) string
	}{
		{"listen", "listen: ':1001'", ":8080", ":1001", ":1002", ":1003", func(c Config) string { return c.Listen }},
		{"admin-listen", "admin_listen: 'localhost:1001'", "127.0.0.1:9090", "localhost:1001", "localhost:1002", "localhost:1003", func(c Config) string { return c.AdminListen }},
		{"upstream", "upstream: {url: 'http://file/v1'}", "https://api.openai.com/v1", "http://file/v1", "http://env/v1", "http://flag/v1", func(c Config) string { return c.Upstream.URL }},
		{"upstream-key-env", "upstream: {api_key_env: KEY_FILE}", "", "KEY_FILE", "KEY_ENV", "KEY_FLAG", func(c Config) string { return c.Upstream.APIKeyEnv }},
		{"admin-token-env", "admin: {token_env: TOKEN_FILE}", "", "TOKEN_FILE", "TOKEN_ENV", "TOKEN_FLAG", func(c Config) string { return c.Admin.TokenEnv }},
		{"admin-pprof", "admin: {pprof: true}", "false", "true", "false", "true", func(c Config) string { return fmt.Sprint(c.Admin.Pprof) }},
		{"upstream-timeout", "upstream: {timeout: 1m}", "10m0s", "1m0s", "2m0s", "3m0s", func(c Config) string { return c.Upstream.Timeout.String() }},
		{"redis-url", "redis: {url: 'redis://file:6379'}", "", "redis://file:6379", "redis://env:6379", "redis://flag:6379", func(c Config) string { return c.Redis.URL }},
		{"redis-prefix", "redis: {prefix: file}", "hp", "file", "env", "flag", func(c Config) string { return c.Redis.Prefix }},
		{"session-require", "session: {require: true}", "false", "true", "false", "true", func(c Config) string { return fmt.Sprint(c.Session.Require) }},
		{"default-channel", "session: {default_channel: file}", "api", "file", "env", "flag", func(c Config) string { return c.Session.DefaultChannel }},
		{"default-agent", "session: {default_agent: file}", "default", "file", "env", "flag", func(c Config) string { return c.Session.DefaultAgent }},
		{"store-on-error", "store: {on_error: fail_closed}", "fail_open", "fail_closed", "fail_open", "fail_closed", func(c Config) string { return c.Store.OnError }},
		{"log-format", "log: {format: json}", "text", "json", "text", "json", func(c Config) string { return c.Log.Format }},
		{"log-level", "log: {level: debug}", "info", "debug", "warn", "error", func(c Config) string { return c.Log.Level }},
		{"drain-timeout", "drain_timeout: 1s", "30s", "1s", "2s", "3s", func(c Config) string { return c.DrainTimeout.String() }},
	}

	// Every flag but -config (tested on its own) must be covered.
	covered := map[string]bool{configSetting: true}
	for _, c := range cases {
		covered[c.flag] = true
	}
	for _, s := range settings {
		if !covered[s.flag] {
			t.Errorf("flag -%s has no precedence case", s.flag)
		}
	}

	// The keys named by upstream-key-env must exist, or Load fails.
	keys := map[string]string{"KEY_FILE": "k1", "KEY_ENV": "k2", "KEY_FLAG": "k3",
		"TOKEN_FILE": "token-0123456789", "TOKEN_ENV": "token-abcdefghij", "TOKEN_FLAG": "token-ABCDEFGHIJ"}
	for _, c := range cases {
		t.Run(c.flag, func(t *testing.T) {
			envName := EnvPrefix + strings.ToUpper(strings.ReplaceAll(c.flag, "-", "_"))
			path := writeConfig(t, c.yaml)
			withEnv := func(v string) map[string]string {
				m := map[string]string{envName: v}
				for k, v := range keys {
					m[k] = v
				}
				return m
			}
			layers := []struct {
				name string
				args []string
				vars map[string]string
				want string
			}{
				{"default", nil, keys, c.def},
				{"file over default", []string{"-config", path}, keys, c.file},
				{"env over default", nil, withEnv(c.env), c.env},
				{"env over file", []string{"-config", path}, withEnv(c.env), c.env},
				{"flag over default", []string{"-" + c.flag + "=" + c.flagV}, keys, c.flagV},
				{"flag over env", []string{"-" + c.flag + "=" + c.flagV}, withEnv(c.env), c.flagV},
				{"flag over env and file", []string{"-config", path, "-" + c.flag + "=" + c.flagV}, withEnv(c.env), c.flagV},
				{"empty env is unset", []string{"-config", path}, withEnv(""), c.file},
			}
			for _, l := range layers {
				got := c.get(load(t, l.args, l.vars))
				if got != l.want {
					t.Errorf("%s: got %q, want %q", l.name, got, l.want)
				}
			}
		})
	}
}

// TestFlagsOverrideOnlyWhatTheySet guards the use of flag.Visit: a flag's
// default must not wipe a value from the file or the environment.
func TestFlagsOverrideOnlyWhatTheySet(t *testing.T) {
	path := writeConfig(t, "listen: ':7001'\nlog: {level: debug}\n")
	cfg := load(t, []string{"-config", path, "-log-format", "json"}, map[string]string{"HISTORYPROXY_ADMIN_LISTEN": ":7002"})
	for _, c := range []struct{ name, got, want string }{
		{"listen", cfg.Listen, ":7001"},
		{"log.level", cfg.Log.Level, "debug"},
		{"admin_listen", cfg.AdminListen, ":7002"},
		{"log.format", cfg.Log.Format, "json"},
		{"upstream.url", cfg.Upstream.URL, "https://api.openai.com/v1"},
	} {
		if c.got != c.want {
			t.Errorf("%s: got %q, want %q", c.name, c.got, c.want)
		}
	}
}

func TestBoolFlagForms(t *testing.T) {
	path := writeConfig(t, "session: {require: true}")
	for _, c := range []struct {
		name string
		args []string
		vars map[string]string
		want bool
	}{
		{"bare flag", []string{"-session-require"}, nil, true},
		{"flag false beats file true", []string{"-config", path, "-session-require=false"}, nil, false},
		{"flag false beats env true", []string{"-session-require=false"}, map[string]string{"HISTORYPROXY_SESSION_REQUIRE": "true"}, false},
		{"env 1", nil, map[string]string{"HISTORYPROXY_SESSION_REQUIRE": "1"}, true},
		{"env false beats file true", []string{"-config", path}, map[string]string{"HISTORYPROXY_SESSION_REQUIRE": "false"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := load(t, c.args, c.vars).Session.Require; got != c.want {
				t.Errorf("session.require: got %v, want %v", got, c.want)
			}
		})
	}
}

func TestConfigPath(t *testing.T) {
	fromFlag := writeConfig(t, "listen: ':1111'")
	fromEnv := writeConfig(t, "listen: ':2222'")
	for _, c := range []struct {
		name string
		args []string
		vars map[string]string
		want string
	}{
		{"none", nil, nil, ":8080"},
		{"env", nil, map[string]string{"HISTORYPROXY_CONFIG": fromEnv}, ":2222"},
		{"flag", []string{"-config", fromFlag}, nil, ":1111"},
		{"flag over env", []string{"-config", fromFlag}, map[string]string{"HISTORYPROXY_CONFIG": fromEnv}, ":1111"},
		{"empty flag disables env", []string{"-config="}, map[string]string{"HISTORYPROXY_CONFIG": fromEnv}, ":8080"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := load(t, c.args, c.vars).Listen; got != c.want {
				t.Errorf("listen: got %q, want %q", got, c.want)
			}
		})
	}

	t.Run("missing file", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "nope.yaml")
		err := loadErr(t, []string{"-config", missing}, nil)
		if !errors.Is(err, os.ErrNotExist) {
			t.Errorf("got %v, want an error wrapping os.ErrNotExist", err)
		}
		// The message names the setting the way it was given, so that a
		// path from a forgotten variable can be traced.
		if want := `-config: cannot read "` + missing + `": no such file or directory`; err.Error() != want {
			t.Errorf("got %q, want %q", err, want)
		}
		err = loadErr(t, nil, map[string]string{"HISTORYPROXY_CONFIG": missing})
		if want := `HISTORYPROXY_CONFIG: cannot read "` + missing + `": no such file or directory`; err.Error() != want {
			t.Errorf("got %q, want %q", err, want)
		}
	})
	t.Run("empty file", func(t *testing.T) {
		got := load(t, []string{"-config", writeConfig(t, "")}, nil)
		if !reflect.DeepEqual(got, Default()) {
			t.Errorf("empty file: got %+v, want Default()", got)
		}
	})
}

func TestHelp(t *testing.T) {
	// The list is written out, not taken from settings, so that a flag
	// dropped from the table fails here.
	want := []struct{ flag, env, def string }{
		{"-listen", "HISTORYPROXY_LISTEN", `":8080"`},
		{"-admin-listen", "HISTORYPROXY_ADMIN_LISTEN", `"127.0.0.1:9090"`},
		{"-upstream", "HISTORYPROXY_UPSTREAM", `"https://api.openai.com/v1"`},
		{"-upstream-key-env", "HISTORYPROXY_UPSTREAM_KEY_ENV", ""},
		{"-admin-token-env", "HISTORYPROXY_ADMIN_TOKEN_ENV", ""},
		{"-admin-pprof", "HISTORYPROXY_ADMIN_PPROF", `"false"`},
		{"-upstream-timeout", "HISTORYPROXY_UPSTREAM_TIMEOUT", `"10m0s"`},
		{"-redis-url", "HISTORYPROXY_REDIS_URL", ""},
		{"-redis-prefix", "HISTORYPROXY_REDIS_PREFIX", `"hp"`},
		{"-config", "HISTORYPROXY_CONFIG", ""},
		{"-session-require", "HISTORYPROXY_SESSION_REQUIRE", `"false"`},
		{"-default-channel", "HISTORYPROXY_DEFAULT_CHANNEL", `"api"`},
		{"-default-agent", "HISTORYPROXY_DEFAULT_AGENT", `"default"`},
		{"-store-on-error", "HISTORYPROXY_STORE_ON_ERROR", `"fail_open"`},
		{"-log-format", "HISTORYPROXY_LOG_FORMAT", `"text"`},
		{"-log-level", "HISTORYPROXY_LOG_LEVEL", `"info"`},
		{"-drain-timeout", "HISTORYPROXY_DRAIN_TIMEOUT", `"30s"`},
	}
	for _, arg := range []string{"-h", "-help", "--help"} {
		t.Run(arg, func(t *testing.T) {
			var out bytes.Buffer
			_, err := Load([]string{arg}, env(nil), &out)
			if !errors.Is(err, flag.ErrHelp) {
				t.Fatalf("got error %v, want flag.ErrHelp", err)
			}
			text := out.String()
			for _, w := range want {
				// The flag's line is followed by its description and
				// then its variable and default.
				re := `(?m)^  ` + regexp.QuoteMeta(w.flag) + `( \S+)?\n.*\n.*\(env ` + regexp.QuoteMeta(w.env)
				if w.def != "" {
					re += `, default ` + regexp.QuoteMeta(w.def)
				}
				if !regexp.MustCompile(re).MatchString(text) {
					t.Errorf("usage lacks %s with %s and default %s; got:\n%s", w.flag, w.env, w.def, text)
				}
			}
			if n := strings.Count(text, "(env HISTORYPROXY_"); n != len(want) {
				t.Errorf("usage lists %d flags, want %d", n, len(want))
			}
		})
	}
}

func TestBadArguments(t *testing.T) {
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown flag", []string{"-nope"}, "flag provided but not defined: -nope (historyproxy -h lists the flags)"},
		{"positional argument", []string{"serve"}, `unexpected argument "serve"`},
		{"bad duration flag", []string{"-drain-timeout", "soon"}, `-drain-timeout: "soon" is not a duration`},
		{"bad bool flag", []string{"-session-require=maybe"}, `-session-require: "maybe" is not a boolean`},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := loadErr(t, c.args, nil)
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %q, want it to contain %q", err, c.want)
			}
		})
	}
}

// TestValidation checks that each problem is reported alone, naming the
// field and the value.
func TestValidation(t *testing.T) {
	long := strings.Repeat("a", 129)
	cases := []struct {
		name   string
		modify func(*Config)
		want   string // "" means valid
	}{
		{"default is valid", func(*Config) {}, ""},

		{"listen without port", func(c *Config) { c.Listen = "8080" }, `listen: "8080" is not host:port`},
		{"listen empty port", func(c *Config) { c.Listen = "localhost:" }, `listen: "localhost:" has no port`},
		{"listen ipv6", func(c *Config) { c.Listen = "[::1]:8080" }, ""},
		{"admin_listen empty", func(c *Config) { c.AdminListen = "" }, `admin_listen: "" is not host:port`},

		{"upstream relative", func(c *Config) { c.Upstream.URL = "/v1" }, `upstream.url: "/v1" is not an absolute http or https URL`},
		{"upstream ftp", func(c *Config) { c.Upstream.URL = "ftp://host/v1" }, `upstream.url: "ftp://host/v1" is not an absolute http or https URL`},
		{"upstream no host", func(c *Config) { c.Upstream.URL = "http:///v1" }, `upstream.url: "http:///v1" is not an absolute`},
		{"upstream unparsable", func(c *Config) { c.Upstream.URL = "http://a b/" }, `upstream.url: "http://a b/" is not a URL`},
		{"upstream http", func(c *Config) { c.Upstream.URL = "http://localhost:11434/v1" }, ""},
		{"upstream timeout zero", func(c *Config) { c.Upstream.Timeout = 0 }, `upstream.timeout: 0s must be positive`},

		{"redis scheme", func(c *Config) { c.Redis.URL = "http://localhost:6379" }, `redis.url: "http://localhost:6379" has scheme "http", not one of redis, rediss, unix`},
		{"redis scheme hides password", func(c *Config) { c.Redis.URL = "tcp://:hunter2@localhost:6379" }, `redis.url: "tcp://:REDACTED@localhost:6379" has scheme "tcp"`},
		{"redis rediss", func(c *Config) { c.Redis.URL = "rediss://u:p@host:6380/1" }, ""},
		{"redis unix", func(c *Config) { c.Redis.URL = "unix:///run/redis.sock" }, ""},
		{"sentinel master alone", func(c *Config) { c.Redis.SentinelMaster = "mymaster" }, `redis.sentinel_master: "mymaster" needs redis.sentinel_addrs`},
		{"sentinel addrs alone", func(c *Config) { c.Redis.SentinelAddrs = []string{"s1:26379"} }, `redis.sentinel_addrs: "s1:26379" needs redis.sentinel_master`},
		{"sentinel complete", func(c *Config) {
			c.Redis.SentinelMaster = "mymaster"
			c.Redis.SentinelAddrs = []string{"s1:26379", "s2:26379"}
		}, ""},
		{"url and cluster", func(c *Config) {
			c.Redis.URL = "redis://localhost:6379"
			c.Redis.ClusterAddrs = []string{"r1:6379"}
		}, `redis.url: "redis://localhost:6379" cannot be used with redis.cluster_addrs`},
		{"cluster and sentinel", func(c *Config) {
			c.Redis.ClusterAddrs = []string{"r1:6379"}
			c.Redis.SentinelMaster = "mymaster"
			c.Redis.SentinelAddrs = []string{"s1:26379"}
		}, `redis.cluster_addrs: "r1:6379" cannot be used with redis.sentinel_addrs/sentinel_master`},
		// A URL carries its own user, password and TLS: these would be
		// ignored (tls: true would connect in plain text).
		{"url and tls", func(c *Config) {
			c.Redis.URL = "redis://localhost:6379"
			c.Redis.TLS = true
		}, `redis.tls: true cannot be used with redis.url: a URL asks for TLS with rediss://`},
		{"url and username", func(c *Config) {
			c.Redis.URL = "redis://localhost:6379"
			c.Redis.Username = "app"
		}, `redis.username: "app" cannot be used with redis.url: put the user in the URL`},
		{"url and password_env", func(c *Config) {
			c.Redis.URL = "redis://localhost:6379"
			c.Redis.PasswordEnv = "REDIS_PW"
		}, `redis.password_env: "REDIS_PW" cannot be used with redis.url: put the password in the URL`},
		{"tls without redis", func(c *Config) { c.Redis.TLS = true }, `redis.tls: is set but no Redis is configured`},
		{"username without redis", func(c *Config) { c.Redis.Username = "app" }, `redis.username: is set but no Redis is configured`},
		{"require_at_start without redis", func(c *Config) { c.Store.RequireAtStart = true }, `store.require_at_start: is true but no Redis is configured`},
		{"require_at_start with redis", func(c *Config) {
			c.Store.RequireAtStart = true
			c.Redis.URL = "redis://localhost:6379"
		}, ""},
		{"cluster with tls and user", func(c *Config) {
			c.Redis.ClusterAddrs = []string{"r1:6379"}
			c.Redis.TLS, c.Redis.Username, c.Redis.PasswordEnv = true, "app", "PW"
		}, ""},
		{"cluster addr without port", func(c *Config) { c.Redis.ClusterAddrs = []string{"r1:6379", "r2"} }, `redis.cluster_addrs[1]: "r2" is not host:port`},

		{"on_error", func(c *Config) { c.Store.OnError = "retry" }, `store.on_error: "retry" is not one of fail_open, fail_closed`},
		{"retry_queue negative", func(c *Config) { c.Store.RetryQueue = -1 }, `store.retry_queue: -1 is negative`},
		{"retry_queue zero", func(c *Config) { c.Store.RetryQueue = 0 }, ""},
		{"memory_max_bytes negative", func(c *Config) { c.Store.MemoryMaxBytes = -1 }, `store.memory_max_bytes: -1 is negative`},
		{"memory_max_bytes zero", func(c *Config) { c.Store.MemoryMaxBytes = 0 }, ""},
		{"redis prefix with a brace", func(c *Config) { c.Redis.Prefix = "hp{x}" }, `redis.prefix: "hp{x}" must not contain { or }`},
		{"redis prefix with a closing brace", func(c *Config) { c.Redis.Prefix = "a}b" }, `redis.prefix: "a}b" must not contain { or }`},
		{"redis prefix with colons", func(c *Config) { c.Redis.Prefix = "app:hp" }, ""},
		{"store timeout negative", func(c *Config) { c.Store.Timeout = -time.Second }, `store.timeout: -1s must be positive`},
		{"lease_ttl zero", func(c *Config) { c.Store.LeaseTTL = 0 }, `store.lease_ttl: 0s must be positive`},
		{"lease_ttl too short", func(c *Config) { c.Store.LeaseTTL = 500 * time.Millisecond }, `store.lease_ttl: 500ms is under 1s`},
		{"ordering unknown", func(c *Config) { c.Defaults.Ordering = "queue" }, `defaults.ordering: "queue" is not one of wait, reject, off`},
		{"agent ordering unknown", func(c *Config) { c.Agents = map[string]Agent{"a": {Ordering: "lock"}} }, `agents.a.ordering: "lock" is not one of wait, reject, off`},
		{"agent ordering inherited", func(c *Config) { c.Agents = map[string]Agent{"a": {Ordering: ""}} }, ""},
		{"ordering_timeout zero", func(c *Config) { c.Defaults.OrderingTimeout = 0 }, `defaults.ordering_timeout: 0s must be positive`},
		{"agent ordering_timeout negative", func(c *Config) { c.Agents = map[string]Agent{"a": {OrderingTimeout: -time.Second}} }, `agents.a.ordering_timeout: -1s is negative`},
		{"on_client_disconnect unknown", func(c *Config) { c.Defaults.OnClientDisconnect = "detach" }, `defaults.on_client_disconnect: "detach" is not one of cancel, finish`},
		{"agent on_client_disconnect unknown", func(c *Config) { c.Agents = map[string]Agent{"a": {OnClientDisconnect: "keep"}} }, `agents.a.on_client_disconnect: "keep" is not one of cancel, finish`},
		{"retry_queue_bytes negative", func(c *Config) { c.Store.RetryQueueBytes = -1 }, `store.retry_queue_bytes: -1 is negative`},
		{"retry_queue_bytes zero", func(c *Config) { c.Store.RetryQueueBytes = 0 }, ""},
		{"window_cache_bytes negative", func(c *Config) { c.Store.WindowCacheBytes = -1 }, `store.window_cache_bytes: -1 is negative`},
		{"window_cache_bytes zero", func(c *Config) { c.Store.WindowCacheBytes = 0 }, ""},

		{"default_channel colon", func(c *Config) { c.Session.DefaultChannel = "a:b" }, `session.default_channel: "a:b" is not a valid session part`},
		{"default_agent empty", func(c *Config) { c.Session.DefaultAgent = "" }, `session.default_agent: "" is not a valid session part`},
		// The rule for client parts: letters of any script are allowed.
		{"default_agent non-ASCII", func(c *Config) { c.Session.DefaultAgent = "agé" }, ""},
		{"default_channel Cyrillic", func(c *Config) { c.Session.DefaultChannel = "канал" }, ""},
		{"default_channel CJK and digits", func(c *Config) { c.Session.DefaultChannel = "网页٣" }, ""},
		{"agent name Unicode", func(c *Config) { c.Agents = map[string]Agent{"помощник": {}} }, ""},
		{"default_agent emoji", func(c *Config) { c.Session.DefaultAgent = "bot😀" }, `session.default_agent: "bot😀" is not a valid session part (1 to 128 bytes of letters, digits and ._@+-=)`},
		{"default_agent invalid UTF-8", func(c *Config) { c.Session.DefaultAgent = "a\xffb" }, `session.default_agent: "a\xffb" is not a valid session part`},
		{"default_agent space", func(c *Config) { c.Session.DefaultAgent = "a b" }, `session.default_agent: "a b" is not a valid session part`},
		{"default_agent all allowed bytes", func(c *Config) { c.Session.DefaultAgent = "aZ09._@+-=" }, ""},
		{"default_agent 128 bytes", func(c *Config) { c.Session.DefaultAgent = long[:128] }, ""},
		{"default_agent 129 bytes", func(c *Config) { c.Session.DefaultAgent = long }, `session.default_agent: "` + long + `" is not a valid session part`},

		{"defaults mode", func(c *Config) { c.Defaults.Mode = "sometimes" }, `defaults.mode: "sometimes" is not one of per_user, shared, off`},
		{"defaults mode empty", func(c *Config) { c.Defaults.Mode = "" }, `defaults.mode: "" is not one of per_user, shared, off`},
		{"defaults max_tokens", func(c *Config) { c.Defaults.MaxTokens = -5 }, `defaults.max_tokens: -5 is negative`},
		{"defaults retention", func(c *Config) { c.Defaults.Retention = -time.Hour }, `defaults.retention: -1h0m0s is negative`},
		{"agent mode", func(c *Config) { c.Agents = map[string]Agent{"support": {Mode: "sometimes"}} }, `agents.support.mode: "sometimes" is not one of per_user, shared, off`},
		{"agent all zero inherits", func(c *Config) { c.Agents = map[string]Agent{"support": {}} }, ""},
		{"agent max_tokens", func(c *Config) { c.Agents = map[string]Agent{"support": {MaxTokens: -1}} }, `agents.support.max_tokens: -1 is negative`},
		{"agent max_messages", func(c *Config) { c.Agents = map[string]Agent{"support": {MaxMessages: -2}} }, `agents.support.max_messages: -2 is negative`},
		{"agent output_reserve", func(c *Config) { c.Agents = map[string]Agent{"support": {OutputReserve: -3}} }, `agents.support.output_reserve: -3 is negative`},
		{"agent idle_timeout", func(c *Config) { c.Agents = map[string]Agent{"support": {IdleTimeout: -time.Minute}} }, `agents.support.idle_timeout: -1m0s is negative`},
		{"agent retention", func(c *Config) { c.Agents = map[string]Agent{"support": {Retention: -time.Minute}} }, `agents.support.retention: -1m0s is negative`},
		{"agent name space", func(c *Config) { c.Agents = map[string]Agent{"bad name": {}} }, `agents: "bad name" is not a valid agent name`},
		{"agent name too long", func(c *Config) { c.Agents = map[string]Agent{long: {}} }, `agents: "` + long + `" is not a valid agent name`},

		{"encoding", func(c *Config) { c.Tokens.DefaultEncoding = "gpt2" }, `tokens.default_encoding: "gpt2" is not one of o200k_base, cl100k_base, p50k_base, r50k_base`},
		{"encoding cl100k", func(c *Config) { c.Tokens.DefaultEncoding = "cl100k_base" }, ""},

		{"model context_window", func(c *Config) { c.Models = map[string]Model{"m": {ContextWindow: -1}} }, `models.m.context_window: -1 is negative`},
		{"model input", func(c *Config) { c.Models = map[string]Model{"m": {Input: -0.5}} }, `models.m.input: -0.5 is negative`},
		{"model cached_input", func(c *Config) { c.Models = map[string]Model{"m": {CachedInput: -1}} }, `models.m.cached_input: -1 is negative`},
		{"model output", func(c *Config) { c.Models = map[string]Model{"m": {Output: -2}} }, `models.m.output: -2 is negative`},
		{"model price finer than a nano-USD per token", func(c *Config) { c.Models = map[string]Model{"m": {CachedInput: 0.0025}} },
			`models.m.cached_input: 0.0025 has more than 3 decimals`},
		{"model price far below a nano-USD per token", func(c *Config) { c.Models = map[string]Model{"m": {Input: 0.0004}} },
			`models.m.input: 0.0004 has more than 3 decimals`},
		{"model price too high", func(c *Config) { c.Models = map[string]Model{"m": {Output: 2e6}} }, `models.m.output: 2e+06 is above 1000000 USD per 1M tokens`},
		{"model free", func(c *Config) { c.Models = map[string]Model{"m": {}} }, ""},
		{"model prices with three decimals", func(c *Config) { c.Models = map[string]Model{"m": {Input: 0.175, CachedInput: 0.005, Output: 1.875}} }, ""},

		{"session_series_limit", func(c *Config) { c.Metrics.SessionSeriesLimit = 0 }, `metrics.session_series_limit: 0 must be positive`},
		{"session_label", func(c *Config) { c.Metrics.SessionLabel = "md5" }, `metrics.session_label: "md5" is not one of id, hash, off`},
		{"session_label hash without key", func(c *Config) { c.Metrics.SessionLabel = "hash" }, `metrics.session_label: "hash" needs metrics.session_label_key_env`},
		{"session_label hash with key", func(c *Config) {
			c.Metrics.SessionLabel = "hash"
			c.Metrics.SessionLabelKeyEnv = "HP_LABEL_KEY"
		}, ""},
		{"session_label off", func(c *Config) { c.Metrics.SessionLabel = "off" }, ""},
		{"log format", func(c *Config) { c.Log.Format = "xml" }, `log.format: "xml" is not one of text, json`},
		{"log level", func(c *Config) { c.Log.Level = "trace" }, `log.level: "trace" is not one of debug, info, warn, error`},
		{"drain_timeout", func(c *Config) { c.DrainTimeout = 0 }, `drain_timeout: 0s must be positive`},
		{"max_body_bytes", func(c *Config) { c.MaxBodyBytes = 0 }, `max_body_bytes: 0 must be positive`},
		{"max_inflight_bytes", func(c *Config) { c.MaxInflightBytes = 1 << 20 }, `max_inflight_bytes: 1048576 is less than max_body_bytes (20971520): a request of the largest size would never be served`},
		{"client read_timeout", func(c *Config) { c.Client.ReadTimeout = 0 }, `client.read_timeout: 0s must be positive`},
		{"upstream stream_idle_timeout", func(c *Config) { c.Upstream.StreamIdleTimeout = 0 }, `upstream.stream_idle_timeout: 0s must be positive`},
		{"client write_timeout", func(c *Config) { c.Client.WriteTimeout = -time.Second }, `client.write_timeout: -1s must be positive`},
		{"client idle_timeout", func(c *Config) { c.Client.IdleTimeout = 0 }, `client.idle_timeout: 0s must be positive`},
		{"max_request_messages", func(c *Config) { c.MaxRequestMessages = 0 }, `max_request_messages: 0 must be positive`},
		{"max_request_content_parts", func(c *Config) { c.MaxRequestContentParts = -1 }, `max_request_content_parts: -1 must be positive`},
		{"max_request_tools", func(c *Config) { c.MaxRequestTools = 0 }, `max_request_tools: 0 must be positive`},
		{"max_turn_messages", func(c *Config) { c.MaxTurnMessages = 0 }, `max_turn_messages: 0 must be positive`},

		{"passthrough patterns", func(c *Config) {
			c.Upstream.Passthrough = []string{"POST /v1/chat/completions", "GET /v1/models/{model...}", "/v1/files/", "DELETE /v1/files/{id}", "/v1"}
		}, ""},
		{"passthrough star", func(c *Config) { c.Upstream.Passthrough = []string{"*"} }, ""},
		{"passthrough outside /v1", func(c *Config) { c.Upstream.Passthrough = []string{"GET /internal/admin"} },
			`upstream.passthrough[0]: "GET /internal/admin" must be [METHOD ]/v1/path`},
		{"passthrough with host", func(c *Config) { c.Upstream.Passthrough = []string{"GET gw.internal/v1/models"} },
			`upstream.passthrough[0]: "GET gw.internal/v1/models" must be [METHOD ]/v1/path`},
		{"passthrough /v1x", func(c *Config) { c.Upstream.Passthrough = []string{"/v1x"} }, `upstream.passthrough[0]: "/v1x" must be`},
		{"passthrough bad wildcard", func(c *Config) { c.Upstream.Passthrough = []string{"GET /v1/models/{model"} },
			`upstream.passthrough[0]: "GET /v1/models/{model" is not a valid pattern`},
		{"passthrough repeated", func(c *Config) { c.Upstream.Passthrough = []string{"GET /v1/models", "GET /v1/models"} },
			`upstream.passthrough[1]: "GET /v1/models" is not a valid pattern`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := Default()
			c.modify(&cfg)
			err := cfg.Validate()
			if c.want == "" {
				if err != nil {
					t.Fatalf("got error %q, want none", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("got no error, want %q", c.want)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %q, want it to contain %q", err, c.want)
			}
			if n := len(joined(err)); n != 1 {
				t.Errorf("got %d errors, want 1: %q", n, err)
			}
		})
	}
}

// joined returns the errors inside an errors.Join result.
func joined(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var all []error
		for _, e := range j.Unwrap() {
			all = append(all, joined(e)...)
		}
		return all
	}
	return []error{err}
}

func TestValidationFromYAMLNamesPath(t *testing.T) {
	path := writeConfig(t, "agents:\n  support:\n    mode: sometimes\n")
	err := loadErr(t, []string{"-config", path}, nil)
	want := path + ` line 3: agents.support.mode: "sometimes" is not one of per_user, shared, off`
	if err.Error() != want {
		t.Errorf("got %q, want %q", err, want)
	}
}

// TestFileValueProblemsNameTheLine: a value of the right kind that the
// file sets but validation refuses is reported with the file's line, as
// the README says of every problem in the file; a value an environment
// variable or flag set instead is reported under that name, without a line.
func TestFileValueProblemsNameTheLine(t *testing.T) {
	for _, c := range []struct {
		name, yaml string
		vars       map[string]string
		args       []string
		want       []string // each a whole error; the file's path is put before "line"
	}{
		{"enum", "log:\n  format: text\n  level: loud\n", nil, nil,
			[]string{`line 3: log.level: "loud" is not one of debug, info, warn, error`}},
		{"negative duration", "drain_timeout: -5s\n", nil, nil,
			[]string{`line 1: drain_timeout: -5s must be positive`}},
		{"session part", "session:\n  require: true\n  default_channel: \"a b\"\n", nil, nil,
			[]string{`line 3: session.default_channel: "a b" is not a valid session part (1 to 128 bytes of letters, digits and ._@+-=)`}},
		{"list entry", "upstream:\n  passthrough:\n    - \"GET /v1/models\"\n    - \"GET /files\"\n", nil, nil,
			[]string{`line 4: upstream.passthrough[1]: "GET /files" must be [METHOD ]/v1/path, a pattern on the client's path, or *`}},
		{"combination with the environment", "redis:\n  tls: true\n", map[string]string{"HISTORYPROXY_REDIS_URL": "redis://r:6379/0"}, nil,
			[]string{`line 2: redis.tls: true cannot be used with redis.url: a URL asks for TLS with rediss://`}},
		{"variable named in the file", "upstream:\n  api_key_env: MISSING_KEY\n", nil, nil,
			[]string{`line 2: upstream.api_key_env: environment variable "MISSING_KEY" is empty or unset`}},
		{"hash label key", "metrics:\n  session_label: hash\n  session_label_key_env: SHORT\n", map[string]string{"SHORT": "abc"}, nil,
			[]string{`line 3: metrics.session_label_key_env: environment variable "SHORT" holds 3 bytes, want at least 16`}},
		{"overridden by a variable", "log:\n  level: loud\n", map[string]string{"HISTORYPROXY_LOG_LEVEL": "shouty"}, nil,
			[]string{`HISTORYPROXY_LOG_LEVEL: "shouty" is not one of debug, info, warn, error`}},
		{"overridden by a flag", "log:\n  level: loud\n", nil, []string{"-log-level", "shouty"},
			[]string{`-log-level: "shouty" is not one of debug, info, warn, error`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := writeConfig(t, c.yaml)
			err := loadErr(t, append([]string{"-config", path}, c.args...), c.vars)
			var got []string
			for _, e := range joined(err) {
				got = append(got, e.Error())
			}
			var want []string
			for _, w := range c.want {
				if strings.HasPrefix(w, "line ") {
					w = path + " " + w
				}
				want = append(want, w)
			}
			if !slices.Equal(got, want) {
				t.Errorf("got\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
			}
		})
	}
}

func TestManyErrorsAtOnce(t *testing.T) {
	path := writeConfig(t, `
listen: nope
store: {on_error: maybe, retry_queue: -1}
agents:
  support: {mode: sometimes}
log: {level: loud}
`)
	vars := map[string]string{
		"HISTORYPROXY_DRAIN_TIMEOUT":    "soon",
		"HISTORYPROXY_SESSION_REQUIRE":  "perhaps",
		"HISTORYPROXY_UPSTREAM":         "not-a-url",
		"HISTORYPROXY_UPSTREAM_KEY_ENV": "MISSING_KEY",
	}
	err := loadErr(t, []string{"-config", path, "-log-format", "xml"}, vars)
	wants := []string{
		`listen: "nope" is not host:port`,
		`store.on_error: "maybe" is not one of fail_open, fail_closed`,
		`store.retry_queue: -1 is negative`,
		`agents.support.mode: "sometimes"`,
		`log.level: "loud"`,
		`-log-format: "xml"`,
		`HISTORYPROXY_DRAIN_TIMEOUT: "soon" is not a duration`,
		`HISTORYPROXY_SESSION_REQUIRE: "perhaps" is not a boolean`,
		`HISTORYPROXY_UPSTREAM: "not-a-url"`,
		`HISTORYPROXY_UPSTREAM_KEY_ENV: environment variable "MISSING_KEY" is empty or unset`,
	}
	for _, w := range wants {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q; got:\n%v", w, err)
		}
	}
	if got := len(joined(err)); got != len(wants) {
		t.Errorf("got %d errors, want %d:\n%v", got, len(wants), err)
	}
}

// TestFileErrorsSpeakYAML: a problem in the file names the key by its YAML
// path and line, in the file's terms, never a Go type.
func TestFileErrorsSpeakYAML(t *testing.T) {
	for _, c := range []struct{ name, yaml, want string }{
		{"unknown top-level key", "listen: ':1'\nlisten_addr: ':2'\n",
			`line 2: listen_addr: unknown key (did you mean listen?); the top level takes listen, admin_listen, upstream,`},
		{"unknown nested key", "upstream:\n  url: http://x/v1\n  api_key: sk-oops\n",
			`line 3: upstream.api_key: unknown key (did you mean api_key_env?); upstream takes url, api_key_env, timeout`},
		{"unknown key in agent entry", "agents:\n  support:\n    max_token: 10\n",
			`line 3: agents.support.max_token: unknown key (did you mean max_tokens?); agents.support takes mode, max_tokens,`},
		{"unknown key in model entry", "models:\n  m:\n    price: 1\n",
			`line 3: models.m.price: unknown key; models.m takes context_window, input, cached_input, output`},
		{"secret field not settable", "redis:\n  password: hunter2\n",
			`line 2: redis.password: unknown key (did you mean password_env?)`},
		{"duration as a bare number", "store:\n  timeout: 30\n",
			`line 2: store.timeout: 30 is not a duration: write it with its unit, like "30s" for seconds`},
		{"duration without unit in a string", "drain_timeout: '30'\n",
			`line 1: drain_timeout: "30" is not a duration (like "500ms", "30s", "10m" or "720h")`},
		{"duration nonsense", "defaults: {idle_timeout: soon}\n",
			`line 1: defaults.idle_timeout: "soon" is not a duration`},
		{"integer as words", "defaults:\n  max_tokens: lots\n",
			`line 2: defaults.max_tokens: "lots" is not a whole number`},
		{"integer with a unit", "max_body_bytes: 20MiB\n",
			`line 1: max_body_bytes: "20MiB" is not a whole number`},
		// yaml.v3 would cut 4000.7 to 4000 without a word.
		{"fraction for a whole number", "defaults:\n  max_tokens: 4000.7\n",
			`line 2: defaults.max_tokens: 4000.7 is not a whole number`},
		{"fraction for a context window", "models:\n  m:\n    context_window: 1.5\n",
			`line 3: models.m.context_window: 1.5 is not a whole number`},
		{"boolean", "session:\n  require: perhaps\n",
			`line 2: session.require: "perhaps" is not true or false`},
		{"price", "models:\n  m: {input: cheap}\n",
			`line 2: models.m.input: "cheap" is not a number`},
		{"list expected", "redis:\n  cluster_addrs: r1:6379\n",
			`line 2: redis.cluster_addrs: must be a list, like ["host:6379"]`},
		{"section not a mapping", "store: fail_open\n",
			`line 1: store: must be a mapping of keys (on_error, retry_queue, timeout,`},
		{"key set twice", "listen: ':1'\nlisten: ':2'\n",
			`line 2: listen: is set twice (first on line 1)`},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := loadErr(t, []string{"-config", writeConfig(t, c.yaml)}, nil)
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("got  %q\nwant it to contain %q", err, c.want)
			}
			for _, goTerm := range []string{"config.", "time.Duration", "!!int", "!!str", "unmarshal"} {
				if strings.Contains(err.Error(), goTerm) {
					t.Errorf("the message speaks Go (%q): %q", goTerm, err)
				}
			}
			if n := len(joined(err)); n != 1 {
				t.Errorf("got %d errors, want 1: %q", n, err)
			}
		})
	}
}

// TestFileErrorsAllAtOnce: every problem of the file is reported, and the
// values it gets right still reach validation.
func TestFileErrorsAllAtOnce(t *testing.T) {
	path := writeConfig(t, "lisen: ':1'\nstore: {timeout: 30}\nlog: {level: loud}\nagents: {support: {max_token: 1}}\n")
	err := loadErr(t, []string{"-config", path}, nil)
	for _, w := range []string{"lisen: unknown key", "store.timeout: 30 is not a duration", `log.level: "loud" is not one of`, "agents.support.max_token: unknown key"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q; got:\n%v", w, err)
		}
	}
	if n := len(joined(err)); n != 4 {
		t.Errorf("got %d errors, want 4:\n%v", n, err)
	}
}

// TestLayeredBadConfiguration: a bad flag does not hide a bad file or a bad
// environment value; all are reported at once, each under its own name.
func TestLayeredBadConfiguration(t *testing.T) {
	path := writeConfig(t, "store: {timeout: 30}\nlisen: ':1'\n")
	err := loadErr(t, []string{"-nope", ":1", "-drain-timeout", "soon", "-config", path, "-bogus=1", "-log-level", "loud"},
		map[string]string{"HISTORYPROXY_UPSTREAM_TIMEOUT": "30", "HISTORYPROXY_DEFAULT_CHANNEL": "a:b"})
	wants := []string{
		"flag provided but not defined: -nope",
		"flag provided but not defined: -bogus",
		`-drain-timeout: "soon" is not a duration`,
		`-log-level: "loud" is not one of debug, info, warn, error`,
		`store.timeout: 30 is not a duration`,
		`lisen: unknown key`,
		`HISTORYPROXY_UPSTREAM_TIMEOUT: "30" is not a duration`,
		`HISTORYPROXY_DEFAULT_CHANNEL: "a:b" is not a valid session part`,
	}
	for _, w := range wants {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q; got:\n%v", w, err)
		}
	}
	if got := len(joined(err)); got != len(wants) {
		t.Errorf("got %d errors, want %d:\n%v", got, len(wants), err)
	}
}

// TestSettingsNameTheirYAMLKey: every flag that sets a field names the
// field's YAML path, which problems with its value fall back to and which
// its usage shows.
func TestSettingsNameTheirYAMLKey(t *testing.T) {
	keys := map[string]bool{}
	for _, k := range yamlKeys(reflect.TypeFor[Config](), "") {
		keys[k] = true
	}
	for _, s := range settings {
		if s.set == nil {
			continue
		}
		if !keys[s.key] {
			t.Errorf("-%s: key %q is not a YAML key of Config", s.flag, s.key)
		}
		if !strings.Contains(s.usage, "(YAML "+s.key+")") {
			t.Errorf("-%s: usage %q does not name YAML %s", s.flag, s.usage, s.key)
		}
	}
}

func TestYAMLMergesOverDefaults(t *testing.T) {
	cfg := load(t, []string{"-config", writeConfig(t, "defaults: {max_tokens: 100}\nstore: {timeout: 5s}\n")}, nil)
	want := Default()
	want.Defaults.MaxTokens = 100
	want.Store.Timeout = 5 * time.Second
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("got %+v\nwant %+v", cfg, want)
	}
}

func TestDurations(t *testing.T) {
	t.Run("yaml", func(t *testing.T) {
		path := writeConfig(t, `
upstream: {timeout: 1m30s}
store: {timeout: 250ms}
defaults: {idle_timeout: 24h, retention: 720h}
agents: {support: {retention: 2160h}}
drain_timeout: 45s
`)
		cfg := load(t, []string{"-config", path}, nil)
		for _, c := range []struct {
			name      string
			got, want time.Duration
		}{
			{"upstream.timeout", cfg.Upstream.Timeout, 90 * time.Second},
			{"store.timeout", cfg.Store.Timeout, 250 * time.Millisecond},
			{"defaults.idle_timeout", cfg.Defaults.IdleTimeout, 24 * time.Hour},
			{"defaults.retention", cfg.Defaults.Retention, 720 * time.Hour},
			{"agents.support.retention", cfg.Agents["support"].Retention, 2160 * time.Hour},
			{"drain_timeout", cfg.DrainTimeout, 45 * time.Second},
		} {
			if c.got != c.want {
				t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
			}
		}
	})
	t.Run("yaml bare number is rejected", func(t *testing.T) {
		// Read as nanoseconds, an integer would be a mistake every time.
		err := loadErr(t, []string{"-config", writeConfig(t, "drain_timeout: 30\n")}, nil)
		if want := `drain_timeout: 30 is not a duration: write it with its unit, like "30s"`; !strings.Contains(err.Error(), want) {
			t.Errorf("got %q, want it to contain %q", err, want)
		}
	})
	t.Run("env", func(t *testing.T) {
		cfg := load(t, nil, map[string]string{
			"HISTORYPROXY_UPSTREAM_TIMEOUT": "2m",
			"HISTORYPROXY_DRAIN_TIMEOUT":    "1h15m",
		})
		if got, want := cfg.Upstream.Timeout, 2*time.Minute; got != want {
			t.Errorf("upstream.timeout: got %v, want %v", got, want)
		}
		if got, want := cfg.DrainTimeout, 75*time.Minute; got != want {
			t.Errorf("drain_timeout: got %v, want %v", got, want)
		}
	})
	t.Run("env bad value names variable", func(t *testing.T) {
		err := loadErr(t, nil, map[string]string{"HISTORYPROXY_UPSTREAM_TIMEOUT": "30"})
		want := `HISTORYPROXY_UPSTREAM_TIMEOUT: "30" is not a duration`
		if !strings.Contains(err.Error(), want) {
			t.Errorf("got %q, want it to contain %q", err, want)
		}
	})
	t.Run("env negative fails validation under the variable's name", func(t *testing.T) {
		err := loadErr(t, nil, map[string]string{"HISTORYPROXY_DRAIN_TIMEOUT": "-1s"})
		want := `HISTORYPROXY_DRAIN_TIMEOUT: -1s must be positive`
		if !strings.Contains(err.Error(), want) {
			t.Errorf("got %q, want it to contain %q", err, want)
		}
	})
}

func TestAgentMerge(t *testing.T) {
	cfg := Default()
	cfg.Defaults.IdleTimeout = time.Hour
	cfg.Agents = map[string]Agent{
		"partial": {MaxTokens: 8000, Retention: 720 * time.Hour},
		"mode":    {Mode: ModeOff},
		"full": {Mode: ModeShared, MaxTokens: 1, MaxMessages: 2, OutputReserve: 3, IdleTimeout: 4, Retention: 5, Ordering: OrderingReject, OrderingTimeout: 6,
			OnClientDisconnect: DisconnectFinish},
		"empty":    {},
		"compacts": {Compaction: Compaction{Enabled: ptr(true), TriggerMessages: 8, Model: "gpt-4.1-mini"}},
		"stops":    {Compaction: Compaction{Enabled: ptr(false), Titles: ptr(true)}},
	}
	cfg.Defaults.Compaction.Enabled = ptr(true)
	dc := cfg.Defaults.Compaction
	for _, c := range []struct {
		name string
		want Agent
	}{
		{"unlisted", cfg.Defaults},
		{"empty", cfg.Defaults},
		{"partial", Agent{Mode: ModePerUser, MaxTokens: 8000, MaxMessages: 20, OutputReserve: 1024, IdleTimeout: time.Hour, Retention: 720 * time.Hour,
			Ordering: OrderingWait, OrderingTimeout: time.Minute, OnClientDisconnect: DisconnectCancel, Compaction: dc}},
		{"mode", Agent{Mode: ModeOff, MaxTokens: 4000, MaxMessages: 20, OutputReserve: 1024, IdleTimeout: time.Hour, Ordering: OrderingWait, OrderingTimeout: time.Minute,
			OnClientDisconnect: DisconnectCancel, Compaction: dc}},
		{"full", Agent{Mode: ModeShared, MaxTokens: 1, MaxMessages: 2, OutputReserve: 3, IdleTimeout: 4, Retention: 5, Ordering: OrderingReject, OrderingTimeout: 6,
			OnClientDisconnect: DisconnectFinish, Compaction: dc}},
		{"compacts", func() Agent {
			a := cfg.Defaults
			a.Compaction.TriggerMessages, a.Compaction.Model = 8, "gpt-4.1-mini"
			return a
		}()},
		{"stops", func() Agent {
			a := cfg.Defaults
			a.Compaction.Enabled, a.Compaction.Titles = ptr(false), ptr(true)
			return a
		}()},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := cfg.Agent(c.name); !reflect.DeepEqual(got, c.want) {
				t.Errorf("got %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestSecretsFromEnv(t *testing.T) {
	t.Run("api key", func(t *testing.T) {
		cfg := load(t, []string{"-upstream-key-env", "MY_KEY"}, map[string]string{"MY_KEY": "sk-secret"})
		if got, want := cfg.Upstream.APIKey, "sk-secret"; got != want {
			t.Errorf("APIKey: got %q, want %q", got, want)
		}
	})
	t.Run("api key env from file", func(t *testing.T) {
		path := writeConfig(t, "upstream: {api_key_env: FILE_KEY}")
		cfg := load(t, []string{"-config", path}, map[string]string{"FILE_KEY": "sk-file"})
		if got, want := cfg.Upstream.APIKey, "sk-file"; got != want {
			t.Errorf("APIKey: got %q, want %q", got, want)
		}
	})
	t.Run("no api key env", func(t *testing.T) {
		cfg := load(t, nil, map[string]string{"OPENAI_API_KEY": "sk-ambient"})
		if cfg.Upstream.APIKey != "" {
			t.Errorf("APIKey: got %q, want empty when api_key_env is unset", cfg.Upstream.APIKey)
		}
	})
	t.Run("api key env empty", func(t *testing.T) {
		err := loadErr(t, []string{"-upstream-key-env", "MY_KEY"}, nil)
		want := `-upstream-key-env: environment variable "MY_KEY" is empty or unset`
		if err.Error() != want {
			t.Errorf("got %q, want %q", err, want)
		}
	})
	t.Run("redis password", func(t *testing.T) {
		path := writeConfig(t, "redis: {cluster_addrs: ['r1:6379'], username: app, password_env: REDIS_PW}")
		cfg := load(t, []string{"-config", path}, map[string]string{"REDIS_PW": "hunter2"})
		if got, want := cfg.Redis.Password, "hunter2"; got != want {
			t.Errorf("Password: got %q, want %q", got, want)
		}
	})
	t.Run("admin token", func(t *testing.T) {
		cfg := load(t, []string{"-admin-token-env", "ADMIN_TOKEN"}, map[string]string{"ADMIN_TOKEN": "0123456789abcdef0123"})
		if got, want := cfg.Admin.Token, "0123456789abcdef0123"; got != want {
			t.Errorf("Admin.Token: got %q, want %q", got, want)
		}
		if got := cfg.Redacted().Admin.Token; got != "REDACTED" {
			t.Errorf("redacted Admin.Token: got %q, want REDACTED", got)
		}
	})
	t.Run("admin token too short", func(t *testing.T) {
		err := loadErr(t, []string{"-admin-token-env", "ADMIN_TOKEN"}, map[string]string{"ADMIN_TOKEN": "short"})
		want := `-admin-token-env: environment variable "ADMIN_TOKEN" holds 5 bytes, want at least 16`
		if !strings.Contains(err.Error(), want) {
			t.Errorf("got %q, want %q", err, want)
		}
	})
	t.Run("session label key", func(t *testing.T) {
		path := writeConfig(t, "metrics: {session_label: hash, session_label_key_env: LABEL_KEY}")
		cfg := load(t, []string{"-config", path}, map[string]string{"LABEL_KEY": "0123456789abcdef"})
		if got, want := cfg.Metrics.SessionLabelKey, "0123456789abcdef"; got != want {
			t.Errorf("SessionLabelKey: got %q, want %q", got, want)
		}
		if got := cfg.Redacted().Metrics.SessionLabelKey; got != "REDACTED" {
			t.Errorf("redacted SessionLabelKey: got %q, want REDACTED", got)
		}
	})
	t.Run("session label key too short", func(t *testing.T) {
		path := writeConfig(t, "metrics: {session_label: hash, session_label_key_env: LABEL_KEY}")
		err := loadErr(t, []string{"-config", path}, map[string]string{"LABEL_KEY": "short"})
		want := path + ` line 1: metrics.session_label_key_env: environment variable "LABEL_KEY" holds 5 bytes, want at least 16`
		if err.Error() != want {
			t.Errorf("got %q, want %q", err, want)
		}
	})
	t.Run("redis password env empty", func(t *testing.T) {
		path := writeConfig(t, "redis: {sentinel_master: m, sentinel_addrs: ['s:26379'], password_env: REDIS_PW}")
		err := loadErr(t, []string{"-config", path}, nil)
		want := path + ` line 1: redis.password_env: environment variable "REDIS_PW" is empty or unset`
		if err.Error() != want {
			t.Errorf("got %q, want %q", err, want)
		}
	})
}

func TestRedacted(t *testing.T) {
	path := writeConfig(t, "redis: {cluster_addrs: ['r1:6379'], password_env: REDIS_PW}\nagents: {support: {mode: shared}}\n")
	cfg := load(t, []string{"-config", path, "-upstream-key-env", "MY_KEY"},
		map[string]string{"MY_KEY": "sk-secret", "REDIS_PW": "pwsecret"})
	// A URL's password is redacted too; set here, as a URL cannot come
	// with password_env.
	cfg.Redis.URL = "redis://app:urlsecret@redis:6379/0"

	red := cfg.Redacted()
	if got, want := red.Upstream.APIKey, "REDACTED"; got != want {
		t.Errorf("APIKey: got %q, want %q", got, want)
	}
	if got, want := red.Redis.Password, "REDACTED"; got != want {
		t.Errorf("Password: got %q, want %q", got, want)
	}
	if got, want := red.Redis.URL, "redis://app:REDACTED@redis:6379/0"; got != want {
		t.Errorf("Redis.URL: got %q, want %q", got, want)
	}
	for _, format := range []string{"%v", "%+v", "%#v"} {
		s := fmt.Sprintf(format, red)
		for _, secret := range []string{"sk-secret", "pwsecret", "urlsecret"} {
			if strings.Contains(s, secret) {
				t.Errorf("%s of Redacted() shows %q: %s", format, secret, s)
			}
		}
	}

	// The original is untouched, including its maps.
	if cfg.Upstream.APIKey != "sk-secret" || cfg.Redis.Password != "pwsecret" || cfg.Redis.URL != "redis://app:urlsecret@redis:6379/0" {
		t.Errorf("Redacted changed the original: %+v", cfg)
	}
	red.Agents["support"] = Agent{Mode: ModeOff}
	if got := cfg.Agents["support"].Mode; got != ModeShared {
		t.Errorf("changing the copy's agents changed the original: mode %q, want %q", got, ModeShared)
	}

	t.Run("nothing to hide", func(t *testing.T) {
		d := Default()
		if got := d.Redacted(); !reflect.DeepEqual(got, d) {
			t.Errorf("got %+v, want it unchanged %+v", got, d)
		}
	})
}

func TestRedactURL(t *testing.T) {
	for _, c := range []struct{ name, in, want string }{
		{"empty", "", ""},
		{"no user", "redis://localhost:6379/0", "redis://localhost:6379/0"},
		{"user only", "redis://app@localhost:6379", "redis://app@localhost:6379"},
		{"password only", "redis://:secret@localhost:6379", "redis://:REDACTED@localhost:6379"},
		{"user and password", "rediss://app:secret@localhost:6380/2", "rediss://app:REDACTED@localhost:6380/2"},
		{"unparsable", "redis://app:sec ret%zz@host", "REDACTED"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := redactURL(c.in); got != c.want {
				t.Errorf("got %q, want %q", got, c.want)
			}
		})
	}
}

// TestExampleIsTheDefaults: config/example.yaml loads unchanged and means
// exactly the defaults, so a user who copies it changes nothing until they
// edit it. Examples of other choices are comments.
func TestExampleIsTheDefaults(t *testing.T) {
	cfg := load(t, []string{"-config", "example.yaml"}, nil)
	if want := Default(); !reflect.DeepEqual(cfg, want) {
		t.Errorf("example.yaml's values differ from Default():\ngot  %+v\nwant %+v", cfg, want)
	}
}

// TestExampleCommentsLoad: the commented-out examples in example.yaml
// (agents, models, Redis forms) are valid when uncommented.
func TestExampleCommentsLoad(t *testing.T) {
	data, err := os.ReadFile("example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// "#key: value" and "#  key: value" lines are commented-out YAML;
	// "# text" lines are prose.
	text := regexp.MustCompile(`(?m)^(\s*)#(\S|  )`).ReplaceAllString(string(data), "$1$2")
	// The Redis forms are alternatives: keep the URL.
	text = regexp.MustCompile(`(?m)^  (cluster_addrs|sentinel_master|sentinel_addrs):.*\n`).ReplaceAllString(text, "")
	cfg := load(t, []string{"-config", writeConfig(t, text)}, nil)
	if got, want := cfg.Agent("team-notes").Mode, ModeShared; got != want {
		t.Errorf("agents.team-notes.mode: got %q, want %q", got, want)
	}
	if got, want := cfg.Agent("support").Retention, 720*time.Hour; got != want {
		t.Errorf("agents.support.retention: got %v, want %v", got, want)
	}
	if got, want := cfg.Models["gpt-4o"].Output, 10.0; got != want {
		t.Errorf("models.gpt-4o.output: got %v, want %v", got, want)
	}
	if !cfg.Redis.Enabled() {
		t.Errorf("the commented redis.url does not configure Redis")
	}
}

// TestExampleHasEveryKey walks Config's YAML keys and checks each appears
// in example.yaml, set or commented out.
func TestExampleHasEveryKey(t *testing.T) {
	data, err := os.ReadFile("example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	for _, key := range yamlKeys(reflect.TypeFor[Config](), "") {
		name := key[strings.LastIndex(key, ".")+1:]
		re := regexp.MustCompile(`(?m)^[ #]*` + regexp.QuoteMeta(name) + `:`)
		if !re.MatchString(text) {
			t.Errorf("example.yaml lacks key %s", key)
		}
	}
}

// yamlKeys lists the YAML paths of t's fields, descending into structs and
// into the values of maps (shown as *).
func yamlKeys(t reflect.Type, prefix string) []string {
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || name == "" {
			continue
		}
		key := prefix + name
		keys = append(keys, key)
		ft := f.Type
		if ft.Kind() == reflect.Map {
			ft = ft.Elem()
			key += ".*"
		}
		if ft.Kind() == reflect.Struct && ft != reflect.TypeFor[time.Duration]() {
			keys = append(keys, yamlKeys(ft, key+".")...)
		}
	}
	return keys
}

func ptr[T any](v T) *T { return &v }

// TestCompactionValidation: the compaction settings are checked, every
// problem named by its key.
func TestCompactionValidation(t *testing.T) {
	for _, c := range []struct {
		name string
		comp Compaction
		want string // "" valid
	}{
		{"defaults", Compaction{}, ""},
		{"target at trigger", Compaction{TriggerMessages: 30, TargetMessages: 30}, "agents.a.compaction.target_messages: 30 must be below compaction.trigger_messages (30)"},
		{"negative keep", Compaction{KeepRecentTurns: -1}, "agents.a.compaction.keep_recent_turns: -1 is negative"},
		{"huge summary", Compaction{MaxSummaryTokens: 1 << 20}, "agents.a.compaction.max_summary_tokens: 1048576 is above 32768"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := Default()
			cfg.Agents = map[string]Agent{"a": {Compaction: c.comp}}
			err := cfg.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Errorf("got %v, want valid", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Errorf("got %v, want it to contain %q", err, c.want)
			}
		})
	}
	// A YAML file: enabled is a boolean, and an entry may turn it off
	// against defaults.
	dir := t.TempDir()
	path := dir + "/c.yaml"
	if err := os.WriteFile(path, []byte("defaults:\n  compaction:\n    enabled: true\nagents:\n  quiet:\n    compaction:\n      enabled: false\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := load(t, []string{"-config", path}, nil)
	if !cfg.Agent("other").Compaction.On() || cfg.Agent("quiet").Compaction.On() {
		t.Errorf("enabled: defaults %v, quiet %v; want true, false", cfg.Agent("other").Compaction.On(), cfg.Agent("quiet").Compaction.On())
	}
	if err := os.WriteFile(path, []byte("defaults:\n  compaction:\n    enabled: sometimes\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := loadErr(t, []string{"-config", path}, nil); !strings.Contains(err.Error(), `defaults.compaction.enabled: "sometimes" is not true or false`) {
		t.Errorf("got %v", err)
	}
}

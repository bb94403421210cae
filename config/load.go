package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// EnvPrefix starts the name of every environment variable Load reads for a
// flag: the flag -redis-url is HISTORYPROXY_REDIS_URL.
const EnvPrefix = "HISTORYPROXY_"

// setting is one flag and the environment variable that goes with it. One
// table drives the flag set, the environment and the usage text, so the
// three cannot drift apart.
type setting struct {
	flag  string // flag name without the dash
	env   string // variable name after EnvPrefix
	key   string // the YAML path of the field it sets, "" for -config
	arg   string // placeholder for the value in usage, "" for a boolean
	usage string
	// set parses v into c; its error says what was wrong with v and is
	// prefixed by the caller with the variable or flag name.
	set func(c *Config, v string) error
	// get shows the default in usage; "" shows none.
	get func(c Config) string
}

// configSetting is the -config flag. It names the file instead of setting
// a field, so Load handles it before the file is read.
const configSetting = "config"

// settings lists every flag in the order usage shows them.
var settings = []setting{
	{
		flag: "listen", env: "LISTEN", key: "listen", arg: "host:port",
		usage: "client-facing address (YAML listen)",
		set:   func(c *Config, v string) error { c.Listen = v; return nil },
		get:   func(c Config) string { return c.Listen },
	},
	{
		flag: "admin-listen", env: "ADMIN_LISTEN", key: "admin_listen", arg: "host:port",
		usage: "address for health, readiness, metrics and the conversations API, kept off the client port (YAML admin_listen)",
		set:   func(c *Config, v string) error { c.AdminListen = v; return nil },
		get:   func(c Config) string { return c.AdminListen },
	},
	{
		flag: "upstream", env: "UPSTREAM", key: "upstream.url", arg: "url",
		usage: "base URL of the OpenAI-compatible upstream, including /v1 (YAML upstream.url)",
		set:   func(c *Config, v string) error { c.Upstream.URL = v; return nil },
		get:   func(c Config) string { return c.Upstream.URL },
	},
	{
		flag: "upstream-key-env", env: "UPSTREAM_KEY_ENV", key: "upstream.api_key_env", arg: "name",
		usage: "name of the environment variable holding the upstream API key; when set, the client's Authorization header is replaced (YAML upstream.api_key_env)",
		set:   func(c *Config, v string) error { c.Upstream.APIKeyEnv = v; return nil },
		get:   func(c Config) string { return c.Upstream.APIKeyEnv },
	},
	{
		flag: "admin-token-env", env: "ADMIN_TOKEN_ENV", key: "admin.token_env", arg: "name",
		usage: "name of the environment variable holding the bearer token of the admin API (/admin/v1); without one the API answers only on a loopback admin listener (YAML admin.token_env)",
		set:   func(c *Config, v string) error { c.Admin.TokenEnv = v; return nil },
		get:   func(c Config) string { return c.Admin.TokenEnv },
	},
	{
		flag: "admin-pprof", env: "ADMIN_PPROF", key: "admin.pprof",
		usage: "serve Go's profiler (net/http/pprof) under /debug/pprof/ on the admin listener (YAML admin.pprof)",
		set:   func(c *Config, v string) error { return parseBool(&c.Admin.Pprof, v) },
		get:   func(c Config) string { return strconv.FormatBool(c.Admin.Pprof) },
	},
	{
		flag: "upstream-timeout", env: "UPSTREAM_TIMEOUT", key: "upstream.timeout", arg: "duration",
		usage: "longest wait for the upstream's response headers (YAML upstream.timeout)",
		set:   func(c *Config, v string) error { return parseDuration(&c.Upstream.Timeout, v) },
		get:   func(c Config) string { return c.Upstream.Timeout.String() },
	},
	{
		flag: "redis-url", env: "REDIS_URL", key: "redis.url", arg: "url",
		usage: "Redis URL (redis://, rediss:// or unix://); empty keeps history in memory (YAML redis.url)",
		set:   func(c *Config, v string) error { c.Redis.URL = v; return nil },
		get:   func(c Config) string { return c.Redis.URL },
	},
	{
		flag: "redis-prefix", env: "REDIS_PREFIX", key: "redis.prefix", arg: "prefix",
		usage: "prefix of every Redis key (YAML redis.prefix)",
		set:   func(c *Config, v string) error { c.Redis.Prefix = v; return nil },
		get:   func(c Config) string { return c.Redis.Prefix },
	},
	{
		flag: configSetting, env: "CONFIG", arg: "file",
		usage: "YAML configuration file; none by default",
	},
	{
		flag: "session-require", env: "SESSION_REQUIRE",
		key:   "session.require",
		usage: "reject with 400 a request whose user cannot be found (YAML session.require)",
		set:   func(c *Config, v string) error { return parseBool(&c.Session.Require, v) },
		get:   func(c Config) string { return strconv.FormatBool(c.Session.Require) },
	},
	{
		flag: "default-channel", env: "DEFAULT_CHANNEL", key: "session.default_channel", arg: "name",
		usage: "channel of a session that names none (YAML session.default_channel)",
		set:   func(c *Config, v string) error { c.Session.DefaultChannel = v; return nil },
		get:   func(c Config) string { return c.Session.DefaultChannel },
	},
	{
		flag: "default-agent", env: "DEFAULT_AGENT", key: "session.default_agent", arg: "name",
		usage: "agent of a session that names none (YAML session.default_agent)",
		set:   func(c *Config, v string) error { c.Session.DefaultAgent = v; return nil },
		get:   func(c Config) string { return c.Session.DefaultAgent },
	},
	{
		flag: "store-on-error", env: "STORE_ON_ERROR", key: "store.on_error", arg: "policy",
		usage: "fail_open (serve without history) or fail_closed (503) when the store fails (YAML store.on_error)",
		set:   func(c *Config, v string) error { c.Store.OnError = v; return nil },
		get:   func(c Config) string { return c.Store.OnError },
	},
	{
		flag: "log-format", env: "LOG_FORMAT", key: "log.format", arg: "format",
		usage: "log format, text or json (YAML log.format)",
		set:   func(c *Config, v string) error { c.Log.Format = v; return nil },
		get:   func(c Config) string { return c.Log.Format },
	},
	{
		flag: "log-level", env: "LOG_LEVEL", key: "log.level", arg: "level",
		usage: "log level: debug, info, warn or error (YAML log.level)",
		set:   func(c *Config, v string) error { c.Log.Level = v; return nil },
		get:   func(c Config) string { return c.Log.Level },
	},
	{
		flag: "drain-timeout", env: "DRAIN_TIMEOUT", key: "drain_timeout", arg: "duration",
		usage: "on shutdown, longest wait for work in flight to finish (YAML drain_timeout)",
		set:   func(c *Config, v string) error { return parseDuration(&c.DrainTimeout, v) },
		get:   func(c Config) string { return c.DrainTimeout.String() },
	},
}

func parseDuration(dst *time.Duration, v string) error {
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("%q is not a duration (like 30s or 10m)", v)
	}
	*dst = d
	return nil
}

func parseBool(dst *bool, v string) error {
	b, err := strconv.ParseBool(v)
	if err != nil {
		return fmt.Errorf("%q is not a boolean (true or false)", v)
	}
	*dst = b
	return nil
}

// flagValue holds a flag's text until Load has applied the file and the
// environment, which the flag must override. Set never fails: the text is
// parsed when it is applied, so that a bad flag value is reported together
// with the file's and the environment's problems instead of hiding them.
type flagValue struct {
	s   *setting
	raw string
}

func (f *flagValue) String() string {
	if f == nil {
		return ""
	}
	return f.raw
}

func (f *flagValue) Set(v string) error {
	f.raw = v
	return nil
}

// IsBoolFlag lets a boolean flag stand alone (-session-require).
func (f *flagValue) IsBoolFlag() bool { return f.s.arg == "" }

// Load builds the configuration from Default, then the YAML file named by
// the -config flag or else HISTORYPROXY_CONFIG (neither: no file), then the
// HISTORYPROXY_* environment variables, then the flags in args (without the
// program name); each source overrides only what it sets. Environment
// variables are read only through getenv, so tests need not touch the
// process environment; an empty variable counts as unset.
//
// After merging, Upstream.APIKey, Redis.Password and Metrics.SessionLabelKey
// are read through getenv from the variables named by Upstream.APIKeyEnv,
// Admin.TokenEnv, Redis.PasswordEnv and Metrics.SessionLabelKeyEnv.
//
// With -h or -help, Load writes the usage of every flag to usage and
// returns flag.ErrHelp. Otherwise every problem found, in the flags, the
// file, the environment and the merged values, is returned at once, joined
// with errors.Join; each names the setting the way the user wrote it (the
// flag, the variable, or the YAML path with its line). Load has no side
// effects besides reading the file and writing to usage.
func Load(args []string, getenv func(string) string, usage io.Writer) (Config, error) {
	cfg, _, err := loadArgs(args, getenv, usage, nil)
	return cfg, err
}

// Command is a subcommand that reads the configuration, for LoadCommand.
type Command struct {
	Name    string // historyproxy NAME
	Args    string // its arguments in usage, "SESSION_ID"; "" takes none
	Summary string
	// Flags defines the command's own flags on fs; nil: none.
	Flags func(fs *flag.FlagSet)
}

// LoadCommand is Load for a subcommand that works on the same store as the
// proxy, configured by the same flags, environment and file: args may mix
// the command's own flags (c.Flags), the configuration's flags and the
// command's arguments, in any order; the arguments are returned. With -h it
// writes the command's usage, then the configuration's.
func LoadCommand(c Command, args []string, getenv func(string) string, usage io.Writer) (Config, []string, error) {
	return loadArgs(args, getenv, usage, &c)
}

func loadArgs(args []string, getenv func(string) string, usage io.Writer, cmd *Command) (Config, []string, error) {
	name := "historyproxy"
	if cmd != nil {
		name += " " + cmd.Name
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	// The flag package would print the usage after each bad flag; Load
	// reports them all in its error instead, and prints usage for -h.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	values := make(map[string]*flagValue, len(settings))
	for i := range settings {
		v := &flagValue{s: &settings[i]}
		values[settings[i].flag] = v
		fs.Var(v, settings[i].flag, settings[i].usage)
	}
	own := flag.NewFlagSet(name, flag.ContinueOnError)
	if cmd != nil && cmd.Flags != nil {
		cmd.Flags(own)
		own.VisitAll(func(f *flag.Flag) { fs.Var(f.Value, f.Name, f.Usage) })
	}
	var (
		errs       []error
		positional []string
	)
	for rest := args; ; {
		err := fs.Parse(rest)
		if errors.Is(err, flag.ErrHelp) {
			if cmd != nil {
				printCommandUsage(usage, *cmd, own)
			}
			printUsage(usage)
			return Config{}, nil, err
		}
		if err == nil {
			if fs.NArg() > 0 && cmd != nil && cmd.Args != "" {
				// An argument; flags may follow it.
				positional = append(positional, fs.Arg(0))
				if rest = fs.Args()[1:]; len(rest) > 0 {
					continue
				}
			} else if fs.NArg() > 0 {
				errs = append(errs, fmt.Errorf("unexpected argument %q: %s takes only flags (%s -h lists them)", fs.Arg(0), name, name))
			}
			break
		}
		// Parse stops at the first bad flag; go on after it, so that every
		// bad flag is reported and the flags after it (-config among them)
		// still count. An unknown flag written "-name value" is taken to
		// have that value, or the value would stop the parse.
		errs = append(errs, fmt.Errorf("%w (%s -h lists the flags)", err, name))
		left := fs.Args()
		bad := rest[len(rest)-len(left)-1]
		if !strings.Contains(bad, "=") && len(left) > 0 && !strings.HasPrefix(left[0], "-") {
			left = left[1:]
		}
		if rest = left; len(rest) == 0 {
			break
		}
	}
	set := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	cfg := Default()
	// source maps a YAML path to the flag or variable that set it last, so
	// that a problem with its value is reported under that name.
	source := map[string]string{}

	path, given := getenv(EnvPrefix+"CONFIG"), EnvPrefix+"CONFIG"
	if set[configSetting] {
		path, given = values[configSetting].raw, "-"+configSetting
	}
	// inFile maps a YAML path the file sets to its file and line.
	var inFile map[string]string
	if path != "" {
		var fileErrs []error
		fileErrs, inFile = loadFile(&cfg, path, given)
		errs = append(errs, fileErrs...)
	}

	for _, s := range settings {
		if s.set == nil {
			continue
		}
		name := EnvPrefix + s.env
		if v := getenv(name); v != "" {
			source[s.key] = name
			if err := s.set(&cfg, v); err != nil {
				errs = append(errs, &FieldError{Field: name, Msg: err.Error()})
			}
		}
	}
	for _, s := range settings {
		if s.set != nil && set[s.flag] {
			source[s.key] = "-" + s.flag
			if err := s.set(&cfg, values[s.flag].raw); err != nil {
				errs = append(errs, &FieldError{Field: "-" + s.flag, Msg: err.Error()})
			}
		}
	}

	// Problems of the merged values are named after the source of the
	// value, the flag or variable that set it, else the file's line: the
	// file's own problems already were.
	var merged []error
	if name := cfg.Upstream.APIKeyEnv; name != "" {
		cfg.Upstream.APIKey = getenv(name)
		if cfg.Upstream.APIKey == "" {
			merged = append(merged, &FieldError{Field: "upstream.api_key_env", Msg: fmt.Sprintf("environment variable %q is empty or unset", name)})
		}
	}
	if name := cfg.Admin.TokenEnv; name != "" {
		cfg.Admin.Token = getenv(name)
		if n := len(cfg.Admin.Token); n < MinAdminToken {
			merged = append(merged, &FieldError{Field: "admin.token_env", Msg: fmt.Sprintf("environment variable %q holds %d bytes, want at least %d (a random token: openssl rand -hex 32)", name, n, MinAdminToken)})
		}
	}
	if name := cfg.Metrics.SessionLabelKeyEnv; name != "" {
		cfg.Metrics.SessionLabelKey = getenv(name)
		if n := len(cfg.Metrics.SessionLabelKey); n < minSessionLabelKey {
			merged = append(merged, &FieldError{Field: "metrics.session_label_key_env", Msg: fmt.Sprintf("environment variable %q holds %d bytes, want at least %d", name, n, minSessionLabelKey)})
		}
	}
	if name := cfg.Redis.PasswordEnv; name != "" {
		cfg.Redis.Password = getenv(name)
		if cfg.Redis.Password == "" {
			merged = append(merged, &FieldError{Field: "redis.password_env", Msg: fmt.Sprintf("environment variable %q is empty or unset", name)})
		}
	}

	if err := cfg.Validate(); err != nil {
		merged = append(merged, unjoin(err)...)
	}
	for _, err := range merged {
		var fe *FieldError
		if errors.As(err, &fe) {
			if src, ok := source[fe.Field]; ok {
				fe.Field = src
			} else if at, ok := inFile[fe.Field]; ok {
				fe.Where = at
			}
		}
	}
	errs = append(errs, merged...)
	if err := errors.Join(errs...); err != nil {
		return Config{}, nil, err
	}
	return cfg, positional, nil
}

// unjoin returns the errors inside an errors.Join result.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// printCommandUsage writes a subcommand's synopsis and own flags, before
// the configuration's.
func printCommandUsage(w io.Writer, c Command, own *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: historyproxy %s [flags]", c.Name)
	if c.Args != "" {
		fmt.Fprintf(w, " %s", c.Args)
	}
	fmt.Fprintf(w, "\n\n%s\n\n", c.Summary)
	hasOwn := false
	own.VisitAll(func(*flag.Flag) { hasOwn = true })
	if hasOwn {
		own.SetOutput(w)
		fmt.Fprintf(w, "Flags of %s:\n", c.Name)
		own.PrintDefaults()
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "It is configured as the proxy is, by the flags, variables and file below:\n\n")
}

// printUsage writes every flag with its variable and default.
func printUsage(w io.Writer) {
	def := Default()
	fmt.Fprintf(w, "Usage: historyproxy [flags]          run the proxy\n")
	fmt.Fprintf(w, "       historyproxy COMMAND [args]   a command listed after the flags\n\n")
	fmt.Fprintf(w, "Settings come from defaults, then the YAML file named by -config, then\n")
	fmt.Fprintf(w, "%s* environment variables, then flags; each overrides the ones before.\n\n", EnvPrefix)
	fmt.Fprintf(w, "Flags:\n")
	for _, s := range settings {
		fmt.Fprintf(w, "  -%s", s.flag)
		if s.arg != "" {
			fmt.Fprintf(w, " %s", s.arg)
		}
		fmt.Fprintf(w, "\n    \t%s\n    \t(env %s%s", s.usage, EnvPrefix, s.env)
		if s.get != nil {
			if d := s.get(def); d != "" {
				fmt.Fprintf(w, ", default %q", d)
			}
		}
		fmt.Fprintf(w, ")\n")
	}
}

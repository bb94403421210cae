package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestHelpListsCommands: -h shows the flags and the subcommands, so that
// healthcheck and version can be found without reading the Dockerfile.

// TestStartupStoreCheck: a Redis that cannot serve (wrong database, or
// down) is logged as an error naming the problem at start-up, and with
// store.require_at_start the program refuses to start.
func TestStartupStoreCheck(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	down := redistest.Start(t)
	down.Stop(t)
	cases := []struct {
		name, url, want string
	}{
		{"database out of range", strings.TrimSuffix(rs.URL, "/0") + "/99", "DB index is out of range"},
		// go-redis retries a refused dial until the deadline.
		{"server down", down.URL, "(connection refused|no answer within 500ms \\(store.timeout\\))"},
	}
	for _, c := range cases {
		t.Run(c.name+" is logged", func(t *testing.T) {
			path := t.TempDir() + "/c.yaml"
			require.NoError(t, writeFile(path, "store: {timeout: 500ms}\n"))
			p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": c.url}, "-drain-timeout", "1s", "-config", path)
			log := p.stderr.String()
			var line string
			for _, l := range strings.Split(log, "\n") {
				if strings.Contains(l, "level=ERROR") && strings.Contains(l, "store does not answer at start-up") {
					line = l
				}
			}
			require.NotEmpty(t, line, "no start-up error in the log:\n%s", log)
			require.Regexp(t, c.want, line)
			require.Contains(t, line, "serving without history")
		})
		t.Run(c.name+" with require_at_start refuses to start", func(t *testing.T) {
			path := t.TempDir() + "/c.yaml"
			require.NoError(t, writeFile(path, "store: {require_at_start: true, timeout: 500ms}\n"))
			var stderr syncBuffer
			err := run(context.Background(), []string{"-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0", "-config", path},
				func(k string) string {
					return map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": c.url}[k]
				}, &stderr, func(addrs) { t.Error("the program started serving") })
			require.Error(t, err)
			require.Contains(t, err.Error(), "store.require_at_start")
			require.Regexp(t, c.want, err.Error())
		})
	}
	t.Run("a good Redis logs no error", func(t *testing.T) {
		p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-drain-timeout", "1s")
		require.NotContains(t, p.stderr.String(), "level=ERROR")
	})
}

// TestJSONLogDurations: JSON logs carry durations as Go duration strings
// ("1.5ms"), as the text format does, not integer nanoseconds.
func TestJSONLogDurations(t *testing.T) {
	up := fakeai.New(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "-log-format", "json", "-log-level", "debug", "-drain-timeout", "7s")
	_, err := p.client("c:u:a").Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
	})
	require.NoError(t, err)
	p.shutdown(t)

	seen := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(p.stderr.String()), "\n") {
		var rec map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &rec), "not JSON: %s", line)
		for _, key := range []string{"duration", "timeout"} {
			v, ok := rec[key]
			if !ok {
				continue
			}
			s, isString := v.(string)
			require.True(t, isString, "%s is %v (%T), want a duration string: %s", key, v, v, line)
			_, err := time.ParseDuration(s)
			require.NoError(t, err, "%s: %s", key, line)
			seen[key] = s
		}
	}
	require.Equal(t, "7s", seen["timeout"], "the drain timeout of the shutdown line")
	require.Contains(t, seen, "duration", "the debug line of the chat completion")
}

// TestHealthcheckCommand drives the subcommand as the container does.

func writeFile(path, text string) error { return os.WriteFile(path, []byte(text), 0o600) }

// TestHelpListsCommands: -h shows the flags and the subcommands, so that
// healthcheck and version can be found without reading the Dockerfile.
func TestHelpListsCommands(t *testing.T) {
	var stdout, stderr bytes.Buffer
	err := cli(context.Background(), []string{"-h"}, func(string) string { return "" }, &stdout, &stderr)
	require.ErrorIs(t, err, flag.ErrHelp)
	out := stderr.String()
	require.Contains(t, out, "-listen")
	require.Contains(t, out, "historyproxy healthcheck [flags]")
	require.Contains(t, out, "historyproxy version")
	require.NotContains(t, out, "admin endpoints", "there is no admin API yet")
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"version", "-version", "--version"} {
		t.Run(arg, func(t *testing.T) {
			var stdout bytes.Buffer
			err := cli(context.Background(), []string{arg}, func(string) string { return "" }, &stdout, &bytes.Buffer{})
			require.NoError(t, err)
			require.Regexp(t, `^historyproxy dev \(go1\.[0-9.]+, [a-z0-9]+/[a-z0-9]+\)\n$`, stdout.String())
		})
	}
}

// TestHealthcheckCommand drives the subcommand as the container does.
func TestHealthcheckCommand(t *testing.T) {
	up := fakeai.New(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL})
	getenv := func(k string) string { return map[string]string{"HISTORYPROXY_ADMIN_LISTEN": p.addrs.Admin}[k] }
	require.NoError(t, cli(context.Background(), []string{"healthcheck"}, getenv, &bytes.Buffer{}, &bytes.Buffer{}))
	p.shutdown(t)
	err := cli(context.Background(), []string{"healthcheck"}, getenv, &bytes.Buffer{}, &bytes.Buffer{})
	require.ErrorContains(t, err, "healthcheck:")
}

// TestCommandHelp: historyproxy NAME -h shows that command's usage, as the
// README says, for every command (healthcheck's names the flags that say
// where the admin listener is).
func TestCommandHelp(t *testing.T) {
	for _, c := range commands {
		t.Run(c.name, func(t *testing.T) {
			out, err := runCommand(t, nil, c.name, "-h")
			require.ErrorIs(t, err, flag.ErrHelp)
			require.Contains(t, out, "Usage: historyproxy "+c.name)
			if c.name == "healthcheck" {
				require.Contains(t, out, "-admin-listen")
			}
		})
	}
	_, err := runCommand(t, nil, "version", "extra")
	require.ErrorContains(t, err, "extra")
}

// TestRefusalToStartIsLogged: when the program refuses to start after its
// log is set up (store.require_at_start with Redis down), the reason goes
// to the log in its format, so that a JSON log stays JSON on every line,
// and main does not print it again.
func TestRefusalToStartIsLogged(t *testing.T) {
	down := redistest.Start(t)
	down.Stop(t)
	path := t.TempDir() + "/c.yaml"
	require.NoError(t, writeFile(path, "store: {require_at_start: true, timeout: 300ms}\n"))
	var stderr syncBuffer
	err := run(context.Background(), []string{"-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0", "-config", path, "-log-format", "json"},
		func(k string) string { return map[string]string{"HISTORYPROXY_REDIS_URL": down.URL}[k] }, &stderr, nil)
	require.ErrorContains(t, err, "store.require_at_start")
	var logged loggedError
	require.ErrorAs(t, err, &logged, "main would print the reason again, in plain text")
	var found bool
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		var rec map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &rec), "not JSON: %s", line)
		if rec["level"] == "ERROR" && strings.Contains(fmt.Sprint(rec["err"]), "store.require_at_start") {
			found = true
		}
	}
	require.True(t, found, "the reason is not in the log:\n%s", stderr.String())
}

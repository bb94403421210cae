package main

import (
	"bytes"
	"context"
	"flag"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// program is the whole program started the way main starts it.
type program struct {
	addrs  addrs
	stop   context.CancelFunc
	done   chan error
	stderr *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs the program on loopback port 0 with env and extra args, and
// waits until it serves.
func start(t *testing.T, env map[string]string, args ...string) *program {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &program{stop: cancel, done: make(chan error, 1), stderr: &syncBuffer{}}
	ready := make(chan addrs, 1)
	args = append([]string{"-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0"}, args...)
	go func() {
		p.done <- run(ctx, args, func(k string) string { return env[k] }, p.stderr, func(a addrs) { ready <- a })
	}()
	select {
	case p.addrs = <-ready:
	case err := <-p.done:
		t.Fatalf("program stopped before serving: %v\n%s", err, p.stderr)
	case <-time.After(60 * time.Second):
		t.Fatal("program did not start in 60s")
	}
	t.Cleanup(func() { p.shutdown(t) })
	return p
}

func (p *program) shutdown(t *testing.T) {
	p.stop()
	select {
	case err, ok := <-p.done:
		if ok {
			require.NoError(t, err)
			close(p.done)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("program did not stop")
	}
}

func (p *program) client(session string) *openai.Client {
	c := openai.NewClient(
		option.WithBaseURL("http://"+p.addrs.Proxy+"/v1/"),
		option.WithAPIKey("sk-test"),
		option.WithHeader("X-Session-ID", session),
		option.WithMaxRetries(0),
	)
	return &c
}

func TestEndToEndWithSDK(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}
	p := start(t, env)
	ctx := context.Background()
	c := p.client("chat:john@example.com:support")

	// Non-streaming turn.
	res, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:    openai.ChatModelGPT4oMini,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("be brief"), openai.UserMessage("My name is John.")},
	})
	require.NoError(t, err)
	require.Equal(t, "echo: My name is John. [messages=2]", res.Choices[0].Message.Content)

	// Streaming turn: the SDK sees the history the proxy injected.
	stream := c.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Model:    openai.ChatModelGPT4oMini,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("be brief"), openai.UserMessage("What is my name?")},
	})
	var acc openai.ChatCompletionAccumulator
	for stream.Next() {
		acc.AddChunk(stream.Current())
	}
	require.NoError(t, stream.Err())
	require.Equal(t, "echo: What is my name? [messages=4]", acc.Choices[0].Message.Content)
	require.Zero(t, acc.Usage.TotalTokens, "the client did not ask for usage, so the stream has none")
	require.True(t, up.LastChat().Chat.IncludeUsage)

	// The conversation is in Redis, readable with plain commands.
	rc := rs.Client(t)
	n, err := rc.XLen(ctx, "hp:{chat:john@example.com:support}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 4, n)

	// Metrics on the admin port carry the session's series.
	resp, err := http.Get("http://" + p.addrs.Admin + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Contains(t, string(body), `historyproxy_session_tokens_total{session="chat:john@example.com:support",type="prompt"}`)
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + p.addrs.Admin + path)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, path)
	}

	// A restart of the proxy keeps the conversation: it lives in Redis.
	p.shutdown(t)
	p2 := start(t, env)
	res, err = p2.client("chat:john@example.com:support").Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model:    openai.ChatModelGPT4oMini,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Still there?")},
	})
	require.NoError(t, err)
	require.Equal(t, "echo: Still there? [messages=5]", res.Choices[0].Message.Content)
}

func TestSDKSurfacesProxyErrors(t *testing.T) {
	up := fakeai.New(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL})
	_, err := p.client("a:b c:d").Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("x")},
	})
	var apiErr *openai.Error
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, http.StatusBadRequest, apiErr.StatusCode)
	require.Equal(t, "invalid_session_id", apiErr.Code)
	require.Equal(t, "X-Session-ID", apiErr.Param, "the SDK shows which field was at fault")
	require.Empty(t, up.Requests())
	require.Contains(t, p.stderr.String(), "conversations are kept in memory", "the in-memory store warns")
}

// TestShutdownDrainsStreams: a stop during a slow stream lets it finish and
// be recorded; new connections are refused; run returns nil.
func TestShutdownDrainsStreams(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-drain-timeout", "10s")
	gate := make(chan struct{})
	up.Enqueue(fakeai.Reply{Content: "slow reply here", Gate: gate, GateAfter: 1})

	stream := p.client("c:slow:a").Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("take your time")},
	})
	require.True(t, stream.Next(), "first chunk arrives before the stop")

	p.stop()
	require.Eventually(t, func() bool {
		_, err := http.Get("http://" + p.addrs.Proxy + "/v1/models")
		return err != nil
	}, 5*time.Second, 10*time.Millisecond, "new connections are refused once stopping")
	select {
	case err := <-p.done:
		t.Fatalf("run returned %v while a stream was in flight", err)
	default:
	}

	close(gate)
	var text strings.Builder
	text.WriteString(stream.Current().Choices[0].Delta.Content)
	for stream.Next() {
		if len(stream.Current().Choices) > 0 {
			text.WriteString(stream.Current().Choices[0].Delta.Content)
		}
	}
	require.NoError(t, stream.Err())
	require.Equal(t, "slow reply here", text.String())
	select {
	case err := <-p.done:
		require.NoError(t, err)
		close(p.done)
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after the stream ended")
	}
	n, err := rs.Client(t).XLen(context.Background(), "hp:{c:slow:a}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 2, n, "the drained stream was recorded")
}

func TestHelpAndBadConfig(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), []string{"-h"}, func(string) string { return "" }, &out, nil)
	require.ErrorIs(t, err, flag.ErrHelp)
	for _, f := range []string{"-listen", "-admin-listen", "-upstream", "-redis-url", "-config"} {
		require.Contains(t, out.String(), f)
	}
	err = run(context.Background(), []string{"-upstream", "ftp://x"}, func(string) string { return "" }, io.Discard, nil)
	require.ErrorContains(t, err, "ftp://x")
}

func TestReadyzReportsTheStore(t *testing.T) {
	cases := []struct {
		name     string
		onError  string
		wantCode int
		want     string
	}{
		{name: "fail open stays in the load balancer", onError: "fail_open", wantCode: http.StatusOK, want: `"status":"degraded"`},
		{name: "fail closed leaves it", onError: "fail_closed", wantCode: http.StatusServiceUnavailable, want: `"status":"unavailable"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rs := redistest.Start(t)
			up := fakeai.New(t)
			p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-store-on-error", tc.onError)
			get := func() (int, string) {
				resp, err := http.Get("http://" + p.addrs.Admin + "/readyz")
				require.NoError(t, err)
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, string(b)
			}
			code, body := get()
			require.Equal(t, http.StatusOK, code, body)
			require.Contains(t, body, `"status":"ok"`)
			rs.Stop(t)
			code, body = get()
			require.Equal(t, tc.wantCode, code, body)
			require.Contains(t, body, tc.want)
		})
	}
}

func TestHealthcheckMode(t *testing.T) {
	up := fakeai.New(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL})
	require.NoError(t, healthcheck([]string{"-admin-listen", p.addrs.Admin}, func(string) string { return "" }, io.Discard))
	p.shutdown(t)
	require.Error(t, healthcheck([]string{"-admin-listen", p.addrs.Admin}, func(string) string { return "" }, io.Discard))
}

// TestPprofOnlyWhenAsked: Go's profiler is on the admin listener only with
// admin.pprof, and never on the client port; the admin routes stay.
func TestPprofOnlyWhenAsked(t *testing.T) {
	up := fakeai.New(t)
	get := func(addr, path string) int {
		resp, err := http.Get("http://" + addr + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode
	}
	for _, tc := range []struct {
		name string
		args []string
		want int
	}{
		{"off by default", nil, http.StatusNotFound},
		{"on", []string{"-admin-pprof"}, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, tc.args...)
			require.Equal(t, tc.want, get(p.addrs.Admin, "/debug/pprof/heap?debug=1"))
			require.Equal(t, tc.want, get(p.addrs.Admin, "/debug/pprof/goroutine?debug=1"))
			require.Equal(t, http.StatusNotFound, get(p.addrs.Proxy, "/debug/pprof/heap?debug=1"))
			require.Equal(t, http.StatusOK, get(p.addrs.Admin, "/healthz"))
			require.Equal(t, http.StatusOK, get(p.addrs.Admin, "/metrics"))
		})
	}
}

// TestWindowCacheMetricsOnlyWithTheCache: the program exports the window
// cache's series, the reads at 0 from start, only with Redis and the
// cache on.
func TestWindowCacheMetricsOnlyWithTheCache(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	off := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(off, []byte("store:\n  window_cache_bytes: 0\n"), 0o600))
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want bool
	}{
		{"memory", map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, nil, false},
		{"redis", map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, nil, true},
		{"redis, cache off", map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, []string{"-config", off}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := start(t, tc.env, tc.args...)
			resp, err := http.Get("http://" + p.addrs.Admin + "/metrics")
			require.NoError(t, err)
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			for _, series := range []string{
				`historyproxy_window_cache_reads_total{result="hit"} 0`,
				`historyproxy_window_cache_reads_total{result="miss"} 0`,
				`historyproxy_window_cache_reads_total{result="stale"} 0`,
				`historyproxy_window_cache_bytes 0`,
				`historyproxy_window_cache_sessions 0`,
			} {
				require.Equal(t, tc.want, strings.Contains(string(body), series+"\n"), "exports %s", series)
			}
		})
	}
}

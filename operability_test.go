package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/config"
	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// writeConfig writes a YAML configuration file for one test.
func writeConfig(t *testing.T, yaml string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "historyproxy.yaml")
	require.NoError(t, os.WriteFile(path, []byte(yaml), 0o600))
	return path
}

// timed runs f and returns how long it took.
func timed(f func()) time.Duration {
	t0 := time.Now()
	f()
	return time.Since(t0)
}

// TestPausedRedisIsBoundedByStoreTimeout: a redis-server that accepts
// connections but answers nothing (SIGSTOP) costs a request at most its
// store.timeout per operation, readiness included. go-redis ignores
// context deadlines unless told otherwise, and then waits its own 5 s
// read timeout per command.
func TestPausedRedisIsBoundedByStoreTimeout(t *testing.T) {
	const storeTimeout = 200 * time.Millisecond
	// Generous: two operations of storeTimeout plus a loaded machine's
	// slack, still well under go-redis's own 5 s read timeout per command.
	const bound = 3 * time.Second
	cases := []struct {
		name      string
		onError   string
		wantChat  int
		wantReady int
	}{
		{name: "fail open", onError: "fail_open", wantChat: http.StatusOK, wantReady: http.StatusOK},
		{name: "fail closed", onError: "fail_closed", wantChat: http.StatusServiceUnavailable, wantReady: http.StatusServiceUnavailable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rs := redistest.Start(t)
			up := fakeai.New(t)
			cfg := writeConfig(t, "store:\n  timeout: "+storeTimeout.String()+"\n  on_error: "+tc.onError+"\n")
			p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-config", cfg, "-drain-timeout", "1s")
			hc := &http.Client{Timeout: 30 * time.Second}
			chat := func() *http.Response {
				req, _ := http.NewRequest(http.MethodPost, "http://"+p.addrs.Proxy+"/v1/chat/completions",
					strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`))
				req.Header.Set("X-Session-ID", "c:paused:a")
				resp, err := hc.Do(req)
				require.NoError(t, err)
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				return resp
			}
			require.Equal(t, http.StatusOK, chat().StatusCode, "served while Redis answers")

			rs.Pause(t)
			t.Cleanup(func() { rs.Resume(t) })
			var resp *http.Response
			d := timed(func() { resp = chat() })
			require.Equal(t, tc.wantChat, resp.StatusCode)
			require.Less(t, d, bound, "a chat request with Redis paused")
			if tc.onError == "fail_open" {
				require.Equal(t, "degraded", resp.Header.Get("X-History"))
			}

			d = timed(func() {
				r, err := hc.Get("http://" + p.addrs.Admin + "/readyz")
				require.NoError(t, err)
				r.Body.Close()
				resp = r
			})
			require.Equal(t, tc.wantReady, resp.StatusCode)
			require.Less(t, d, bound, "/readyz with Redis paused")
		})
	}
}

// ctxTimeout is a context for a test's client calls.
func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestRedisClientsHonourContextDeadlines: every topology's client is built
// so that a context deadline (store.timeout) bounds a command.
func TestRedisClientsHonourContextDeadlines(t *testing.T) {
	cases := []struct {
		name string
		rc   config.Redis
	}{
		{name: "url", rc: config.Redis{URL: "redis://127.0.0.1:1/0"}},
		{name: "cluster", rc: config.Redis{ClusterAddrs: []string{"127.0.0.1:1"}}},
		{name: "sentinel", rc: config.Redis{SentinelMaster: "m", SentinelAddrs: []string{"127.0.0.1:1"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := newRedisClient(tc.rc)
			require.NoError(t, err)
			defer c.Close()
			var enabled bool
			switch c := c.(type) {
			case *redis.Client:
				enabled = c.Options().ContextTimeoutEnabled
			case *redis.ClusterClient:
				enabled = c.Options().ContextTimeoutEnabled
			default:
				t.Fatalf("got client %T", c)
			}
			require.True(t, enabled, "ContextTimeoutEnabled")
		})
	}
}

// TestWatchClientHasNoMaintNotifications: the watches' blocking client
// (a pool of 10,000) is built without go-redis's maintenance notifications,
// whose queue go-redis sizes by the pool (5.9 MB at rest); the turns'
// client keeps go-redis's default. Sentinel's client has no such setting.
func TestWatchClientHasNoMaintNotifications(t *testing.T) {
	for _, rc := range []config.Redis{{URL: "redis://127.0.0.1:1/0"}, {ClusterAddrs: []string{"127.0.0.1:1"}}} {
		for _, blocking := range []bool{false, true} {
			var opts []func(*redis.UniversalOptions)
			if blocking {
				opts = append(opts, poolOf(blockingPool), noMaintNotifications)
			}
			c, err := newRedisClient(rc, opts...)
			require.NoError(t, err)
			var mc *maintnotifications.Config
			switch c := c.(type) {
			case *redis.Client:
				mc = c.Options().MaintNotificationsConfig
			case *redis.ClusterClient:
				mc = c.Options().MaintNotificationsConfig
			}
			c.Close()
			off := mc != nil && mc.Mode == maintnotifications.ModeDisabled
			require.Equal(t, blocking, off, "%+v, blocking %v", rc, blocking)
		}
	}
}

// TestJSONLogsAreAllJSON: with -log-format json every line the built
// binary writes to stderr is a JSON object, go-redis's own complaints about
// an unreachable server included (go-redis writes to the process's stderr,
// not to the logger run is given, so only the real binary shows them).
func TestJSONLogsAreAllJSON(t *testing.T) {
	buildBinary(t)
	up := fakeai.New(t)
	// A port nothing listens on: every dial is refused, and go-redis logs.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	cfg := writeConfig(t, "store:\n  timeout: 200ms\n")
	p := startBinary(t, nil, "-upstream", up.URL, "-redis-url", "redis://"+addr+"/0",
		"-config", cfg, "-log-format", "json", "-drain-timeout", "500ms")
	for i := 0; i < 3; i++ {
		resp, err := http.Post("http://"+p.addr+"/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"gpt-4o-mini","user":"u1","messages":[{"role":"user","content":"hi"}]}`))
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("the binary did not exit")
	}
	lines := strings.Split(strings.TrimSpace(p.stderr.String()), "\n")
	require.Greater(t, len(lines), 3)
	redisLines := 0
	for _, line := range lines {
		var rec map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &rec), "not JSON: %s", line)
		if rec["component"] == "redis" {
			redisLines++
		}
	}
	require.Positive(t, redisLines, "go-redis's own lines are among them")
}

// stopErr stops the program and returns what run returned.
func (p *program) stopErr(t *testing.T) error {
	t.Helper()
	p.stop()
	select {
	case err, ok := <-p.done:
		if !ok {
			return nil
		}
		close(p.done) // the Cleanup's shutdown finds it closed
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("program did not stop")
		return nil
	}
}

// TestClientPortTimeouts: client.read_timeout and client.idle_timeout from
// the configuration file reach the client port: a trickled body gets 408,
// an idle keep-alive connection is closed.
func TestClientPortTimeouts(t *testing.T) {
	up := fakeai.New(t)
	cfg := writeConfig(t, "client:\n  read_timeout: 300ms\n  idle_timeout: 300ms\n  write_timeout: 300ms\n")
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "-config", cfg)

	t.Run("idle", func(t *testing.T) {
		conn, err := net.Dial("tcp", p.addrs.Proxy)
		require.NoError(t, err)
		defer conn.Close()
		_, err = io.WriteString(conn, "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n")
		require.NoError(t, err)
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = br.ReadByte()
		require.ErrorIs(t, err, io.EOF, "the idle connection is closed by the proxy")
	})
	t.Run("trickled body", func(t *testing.T) {
		conn, err := net.Dial("tcp", p.addrs.Proxy)
		require.NoError(t, err)
		defer conn.Close()
		_, err = io.WriteString(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
		require.NoError(t, err)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		require.NoError(t, err, "answered before the rest of the body")
		resp.Body.Close()
		require.Equal(t, http.StatusRequestTimeout, resp.StatusCode)
	})
}

// TestAdminListenerTimeouts: the admin listener takes the client port's
// bounds (client.read_timeout, client.idle_timeout, client.write_timeout
// per write): a trickled body and an idle keep-alive connection do not
// hold a connection open, while a watch, a stream that runs far longer
// than every one of them, is not cut.
func TestAdminListenerTimeouts(t *testing.T) {
	up := fakeai.New(t)
	cfg := writeConfig(t, "client:\n  read_timeout: 300ms\n  idle_timeout: 300ms\n  write_timeout: 300ms\n")
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "-config", cfg)

	t.Run("idle", func(t *testing.T) {
		conn, err := net.Dial("tcp", p.addrs.Admin)
		require.NoError(t, err)
		defer conn.Close()
		_, err = io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		require.NoError(t, err)
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		_, err = br.ReadByte()
		require.ErrorIs(t, err, io.EOF, "the idle connection is closed by the proxy")
	})
	t.Run("trickled body", func(t *testing.T) {
		conn, err := net.Dial("tcp", p.addrs.Admin)
		require.NoError(t, err)
		defer conn.Close()
		_, err = io.WriteString(conn, "POST /admin/v1/sessions/c:u:a/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
		require.NoError(t, err)
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(5*time.Second)))
		// Answered (an error) or closed, but not held open.
		_, err = io.Copy(io.Discard, conn)
		require.NoError(t, err, "the connection ends before the test's 5 s")
	})
	t.Run("watch outlives them", func(t *testing.T) {
		ctx := ctxTimeout(t, 30*time.Second)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.addrs.Admin+"/admin/v1/sessions/c:w:a/watch", nil)
		require.NoError(t, err)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		events := make(chan string, 16)
		go func() { // ends when the response body is closed
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				if ev, ok := strings.CutPrefix(sc.Text(), "event: "); ok {
					events <- ev
				}
			}
			close(events)
		}()
		require.Equal(t, "snapshot", <-events)
		time.Sleep(time.Second) // three times every bound
		post, err := http.Post("http://"+p.addrs.Admin+"/admin/v1/sessions/c:w:a/messages", "application/json",
			strings.NewReader(`{"messages":[{"role":"user","content":"still there?"}]}`))
		require.NoError(t, err)
		post.Body.Close()
		require.Less(t, post.StatusCode, 300)
		select {
		case ev, ok := <-events:
			require.True(t, ok, "the watch was cut")
			require.Equal(t, "message", ev)
		case <-ctx.Done():
			t.Fatal("no event")
		}
	})
}

// TestPausedRedisWithTurnsInFlight: Redis is paused (SIGSTOP) while a
// stream holds its session's turn lease, a second request of the session
// waits for that turn and a watch follows the session. Every request is
// answered within a few store timeouts (not ordering_timeout), served
// without history; once Redis answers again the turns held in the retry
// queue are stored, in order, and the session serves a new turn at once.
func TestPausedRedisWithTurnsInFlight(t *testing.T) {
	const bound = 5 * time.Second // a few store.timeout of 300ms, on a loaded machine
	rs := redistest.Start(t)
	up := fakeai.New(t)
	cfg := writeConfig(t, "store:\n  timeout: 300ms\n")
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-config", cfg, "-drain-timeout", "2s")
	const session = "c:pausedturns:a"
	hc := &http.Client{Timeout: 30 * time.Second}
	chat := func(content string, stream bool) *http.Response {
		body := `{"model":"gpt-4o-mini","stream":` + map[bool]string{true: "true", false: "false"}[stream] +
			`,"messages":[{"role":"user","content":"` + content + `"}]}`
		req, _ := http.NewRequest(http.MethodPost, "http://"+p.addrs.Proxy+"/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("X-Session-ID", session)
		resp, err := hc.Do(req)
		require.NoError(t, err)
		return resp
	}
	drain := func(resp *http.Response) string {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return string(b)
	}
	up.Enqueue(fakeai.Reply{Content: "first"})
	require.Equal(t, http.StatusOK, chat("one", false).StatusCode)

	// A watch of the session.
	wreq, _ := http.NewRequestWithContext(ctxTimeout(t, 60*time.Second), http.MethodGet, "http://"+p.addrs.Admin+"/admin/v1/sessions/"+session+"/watch", nil)
	watch, err := http.DefaultClient.Do(wreq)
	require.NoError(t, err)
	defer watch.Body.Close()
	require.Equal(t, http.StatusOK, watch.StatusCode)

	// A: a stream that holds the turn.
	gate := make(chan struct{})
	up.Enqueue(fakeai.Reply{Content: "second reply", Gate: gate, GateAfter: 2})
	a := chat("two", true)
	br := bufio.NewReader(a.Body)
	for {
		line, err := br.ReadString('\n')
		require.NoError(t, err)
		if strings.Contains(line, `"content":"second"`) {
			break
		}
	}
	// B: waits for A's turn.
	up.Enqueue(fakeai.Reply{Content: "third"})
	bDone := make(chan time.Duration, 1)
	var bResp *http.Response
	go func() {
		t0 := time.Now()
		bResp = chat("three", false)
		bDone <- time.Since(t0)
	}()
	time.Sleep(300 * time.Millisecond) // B is queued

	rs.Pause(t)
	paused := time.Now()
	t.Cleanup(func() { rs.Resume(t) })
	close(gate)
	var aBody string
	d := timed(func() {
		rest, _ := io.ReadAll(br)
		a.Body.Close()
		aBody = string(rest)
	})
	require.Less(t, d, bound, "A's stream with Redis paused")
	require.Contains(t, aBody, "[DONE]", "fail_open: A's turn waits in the retry queue, the reply is whole")
	select {
	case <-bDone:
		require.Less(t, time.Since(paused), 2*bound, "B, waiting for A's turn, once Redis paused")
		drain(bResp)
		require.Equal(t, http.StatusOK, bResp.StatusCode)
		require.Equal(t, "degraded", bResp.Header.Get("X-History"))
	case <-time.After(2 * bound):
		t.Fatal("B still waits for the turn with Redis paused")
	}
	up.Enqueue(fakeai.Reply{Content: "fourth"})
	var c *http.Response
	d = timed(func() { c = chat("four", false) })
	drain(c)
	require.Less(t, d, bound, "C with Redis paused")
	require.Equal(t, http.StatusOK, c.StatusCode)

	rs.Resume(t)
	store := history.NewRedis(rs.Client(t), "")
	require.Eventually(t, func() bool {
		msgs, err := store.Messages(context.Background(), session, "")
		return err == nil && len(msgs) == 8
	}, 20*time.Second, 50*time.Millisecond, "the queued turns are stored once Redis answers")
	msgs, err := store.Messages(context.Background(), session, "")
	require.NoError(t, err)
	var contents []string
	for _, m := range msgs {
		contents = append(contents, m.Content)
	}
	require.Equal(t, []string{"one", "first", "two", "second reply", "three", "third", "four", "fourth"}, contents)

	// The session serves a new turn without waiting out a stale lease.
	up.Enqueue(fakeai.Reply{Content: "fifth"})
	var e *http.Response
	d = timed(func() { e = chat("five", false) })
	drain(e)
	require.Equal(t, http.StatusOK, e.StatusCode)
	require.Empty(t, e.Header.Get("X-History"), "served with history")
	require.Less(t, d, bound, "a new turn once Redis answers")
}

// TestMemoryStoreDrainCutsStreamsAndWaiters: with the in-memory store, a
// stop whose drain runs out with a stream holding its session's turn and
// another request of the session waiting for it: the stream is cut and
// recorded incomplete, the waiter ends, and run returns nil promptly.
func TestMemoryStoreDrainCutsStreamsAndWaiters(t *testing.T) {
	up := fakeai.New(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "-drain-timeout", "500ms")
	gate := make(chan struct{})
	defer close(gate)
	up.Enqueue(fakeai.Reply{Content: "cut short here", Gate: gate, GateAfter: 2})
	stream := p.client("c:memdrain:a").Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("go")},
	})
	for stream.Next() && (len(stream.Current().Choices) == 0 || stream.Current().Choices[0].Delta.Content == "") {
	}
	waiter := make(chan error, 1)
	go func() {
		_, err := p.client("c:memdrain:a").Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
			Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("me too")},
		})
		waiter <- err
	}()
	time.Sleep(200 * time.Millisecond) // the second request waits for the turn
	var err error
	d := timed(func() { err = p.stopErr(t) })
	require.NoError(t, err, "nothing was lost:\n%s", p.stderr)
	require.Less(t, d, 10*time.Second, "a 500ms drain, then the cut")
	select {
	case <-waiter:
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting request did not end")
	}
	require.Contains(t, p.stderr.String(), "drain ended with requests in flight")
}

package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// built is the program's binary, built once per run of the test binary by
// buildBinary and removed by TestMain.
var built struct {
	once sync.Once
	dir  string
	bin  string
	err  error
	out  []byte
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		_ = os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// buildBinary builds the real binary with go build, once per run of the
// test binary, and returns its path. It skips in -short mode.
func buildBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binary")
	}
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "historyproxy-test-"); built.err != nil {
			return
		}
		built.bin = filepath.Join(built.dir, "historyproxy")
		built.out, built.err = exec.Command("go", "build", "-o", built.bin, ".").CombinedOutput()
	})
	require.NoError(t, built.err, "go build: %s", built.out)
	return built.bin
}

// binary is the real program running in its own process.
type binary struct {
	cmd    *exec.Cmd
	addr   string        // the proxy's listen address, from the log
	admin  string        // the admin listener's address, from the log
	stderr *syncBuffer   // the whole log
	exited chan struct{} // closed when the process has exited
	err    error         // the exit status, once exited is closed
}

// startBinary runs the built binary on loopback port 0 with args and the
// test's environment plus env ("K=V"), waits until its start-up log names
// the listen address, and kills it in t.Cleanup if it still runs.
func startBinary(t *testing.T, env []string, args ...string) *binary {
	t.Helper()
	bin := buildBinary(t)
	b := &binary{stderr: &syncBuffer{}, exited: make(chan struct{})}
	b.cmd = exec.Command(bin, append([]string{"-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0"}, args...)...)
	b.cmd.Env = append(os.Environ(), env...)
	b.cmd.Stderr = b.stderr
	require.NoError(t, b.cmd.Start())
	go func() {
		b.err = b.cmd.Wait()
		close(b.exited)
	}()
	t.Cleanup(func() {
		_ = b.cmd.Process.Kill()
		<-b.exited
	})

	// The start-up line, in text (listen=...) or JSON ("listen":"...").
	listen := regexp.MustCompile(`listen"?[=:]"?(127\.0\.0\.1:\d+).*admin"?[=:]"?(127\.0\.0\.1:\d+)`)
	deadline := time.After(10 * time.Second)
	for {
		if m := listen.FindStringSubmatch(b.stderr.String()); m != nil {
			b.addr, b.admin = m[1], m[2]
			return b
		}
		select {
		case <-b.exited:
			t.Fatalf("the binary exited before serving: %v\n%s", b.err, b.stderr)
		case <-deadline:
			t.Fatalf("the start-up log named no listen address in 10s:\n%s", b.stderr)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestSIGTERMDrainsSlowStream runs the real binary and sends it SIGTERM
// while a slow stream is in flight: the stream completes and is recorded,
// and the process exits 0 within the drain timeout.
func TestSIGTERMDrainsSlowStream(t *testing.T) {
	buildBinary(t) // skips in -short mode before anything starts
	up := fakeai.New(t)
	rs := redistest.Start(t)
	gate := make(chan struct{})
	up.Enqueue(fakeai.Reply{Content: "a slow reply", Gate: gate, GateAfter: 1})

	p := startBinary(t, nil, "-upstream", up.URL, "-redis-url", rs.URL, "-drain-timeout", "5s")

	c := openai.NewClient(option.WithBaseURL("http://"+p.addr+"/v1/"), option.WithAPIKey("k"),
		option.WithHeader("X-Session-ID", "c:sig:a"), option.WithMaxRetries(0))
	stream := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("slowly")},
	})
	require.True(t, stream.Next())
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))

	time.Sleep(200 * time.Millisecond) // the process must still be draining
	select {
	case <-p.exited:
		t.Fatalf("process exited (%v) while a stream was in flight", p.err)
	default:
	}
	close(gate)
	for stream.Next() {
	}
	require.NoError(t, stream.Err())
	select {
	case <-p.exited:
		require.NoError(t, p.err, "exit status 0")
	case <-time.After(10 * time.Second):
		t.Fatal("process did not exit after the stream ended")
	}
	n, err := rs.Client(t).XLen(context.Background(), "hp:{c:sig:a}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 2, n, "the drained stream was recorded")
}

// streamsInFlight opens n streams through the binary, one session each
// (c:drainN:a), and returns once each has relayed content. The fake
// upstream sends the role chunk, then content every 300 ms (so that a
// helper that returned after the role chunk would fail at once, not once
// in a while under load), and holds the stream after two words until gate
// closes.
func streamsInFlight(t *testing.T, p *binary, up *fakeai.Server, n int, gate chan struct{}) []string {
	t.Helper()
	sessions := make([]string, n)
	var started sync.WaitGroup
	for i := range n {
		up.Enqueue(fakeai.Reply{Content: "a reply that is cut short", Gate: gate, GateAfter: 3, ChunkDelay: 300 * time.Millisecond})
		sessions[i] = fmt.Sprintf("c:drain%d:a", i)
		c := openai.NewClient(option.WithBaseURL("http://"+p.addr+"/v1/"), option.WithAPIKey("k"),
			option.WithHeader("X-Session-ID", sessions[i]), option.WithMaxRetries(0))
		started.Add(1)
		go func() { // ends when the stream is cut or done
			stream := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
				Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("tell me")},
			})
			// The first chunk is the role's, with no content: a cut then
			// would leave nothing generated to store. Wait for a delta
			// with content (relayed only once the proxy assembled it).
			ok := stream.Next()
			for ok && (len(stream.Current().Choices) == 0 || stream.Current().Choices[0].Delta.Content == "") {
				ok = stream.Next()
			}
			started.Done()
			if ok {
				for stream.Next() {
				}
			}
		}()
	}
	started.Wait()
	return sessions
}

// readyz returns the binary's readiness status code.
func (b *binary) readyz(t *testing.T) int {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + b.admin + "/readyz")
	require.NoError(t, err)
	resp.Body.Close()
	return resp.StatusCode
}

// waitExit waits for the process to exit and returns its exit code.
func (b *binary) waitExit(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-b.exited:
	case <-time.After(within):
		t.Fatalf("the process did not exit within %s:\n%s", within, b.stderr)
	}
	var ee *exec.ExitError
	if errors.As(b.err, &ee) {
		return ee.ExitCode()
	}
	require.NoError(t, b.err)
	return 0
}

// requireIncomplete checks that each session holds the user's message and
// the cut reply, marked incomplete.
func requireIncomplete(t *testing.T, rs *redistest.Server, sessions []string) {
	t.Helper()
	store := history.NewRedis(rs.Client(t), "")
	for _, s := range sessions {
		msgs, err := store.Messages(context.Background(), s, "")
		require.NoError(t, err)
		require.Len(t, msgs, 2, "session %s", s)
		require.Equal(t, "tell me", msgs[0].Content)
		require.Equal(t, history.RoleAssistant, msgs[1].Role)
		require.NotEmpty(t, msgs[1].Content, "what was generated is kept")
		require.Equal(t, history.StatusIncomplete, msgs[1].Status, "session %s", s)
	}
}

// TestDrainTimeoutRecordsCutStreams: SIGTERM with streams that outlast the
// drain timeout. Readiness fails from the moment the drain starts; when
// the drain timeout passes the streams are cut, each is stored as
// incomplete, and the process exits 0 since nothing was lost.
func TestDrainTimeoutRecordsCutStreams(t *testing.T) {
	buildBinary(t)
	up := fakeai.New(t)
	rs := redistest.Start(t)
	gate := make(chan struct{}) // never opened: the streams outlast the drain
	defer close(gate)
	p := startBinary(t, nil, "-upstream", up.URL, "-redis-url", rs.URL, "-drain-timeout", "1s")
	require.Equal(t, http.StatusOK, p.readyz(t))
	sessions := streamsInFlight(t, p, up, 8, gate)

	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Eventually(t, func() bool { return p.readyz(t) == http.StatusServiceUnavailable },
		900*time.Millisecond, 10*time.Millisecond, "readiness fails while draining")
	require.Equal(t, 0, p.waitExit(t, 20*time.Second), "nothing was lost:\n%s", p.stderr)
	requireIncomplete(t, rs, sessions)
}

// TestSecondSignalEndsTheDrain: a second SIGTERM during a long drain ends
// it at once, with the same recording of what was cut.
func TestSecondSignalEndsTheDrain(t *testing.T) {
	buildBinary(t)
	up := fakeai.New(t)
	rs := redistest.Start(t)
	gate := make(chan struct{})
	defer close(gate)
	p := startBinary(t, nil, "-upstream", up.URL, "-redis-url", rs.URL, "-drain-timeout", "10m")
	sessions := streamsInFlight(t, p, up, 3, gate)

	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Eventually(t, func() bool { return p.readyz(t) == http.StatusServiceUnavailable },
		5*time.Second, 10*time.Millisecond, "the drain has started")
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, p.waitExit(t, 30*time.Second), "the second signal ends a 10m drain:\n%s", p.stderr)
	requireIncomplete(t, rs, sessions)
}

// TestShutdownThatLosesTurnsExitsNonZero: with Redis down (fail open) the
// cut streams' turns wait in the retry queue; when it cannot be written
// the process says which sessions lost a turn and exits non-zero.
func TestShutdownThatLosesTurnsExitsNonZero(t *testing.T) {
	buildBinary(t)
	up := fakeai.New(t)
	rs := redistest.Start(t)
	gate := make(chan struct{})
	defer close(gate)
	cfg := filepath.Join(t.TempDir(), "historyproxy.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("store:\n  timeout: 200ms\n"), 0o600))
	p := startBinary(t, nil, "-upstream", up.URL, "-redis-url", rs.URL, "-drain-timeout", "500ms", "-config", cfg)
	rs.Stop(t)
	sessions := streamsInFlight(t, p, up, 3, gate)

	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 1, p.waitExit(t, 30*time.Second), "turns were lost:\n%s", p.stderr)
	log := p.stderr.String()
	for _, s := range sessions {
		require.Regexp(t, `turn not written to the store is lost.*session=`+regexp.QuoteMeta(s), log)
	}
}

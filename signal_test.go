package main

import (
	"bufio"
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestSIGTERMDrainsSlowStream runs the real binary and sends it SIGTERM
// while a slow stream is in flight: the stream completes and is recorded,
// and the process exits 0 within the drain timeout.
func TestSIGTERMDrainsSlowStream(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "historyproxy")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, string(out))

	up := fakeai.New(t)
	rs := redistest.Start(t)
	gate := make(chan struct{})
	up.Enqueue(fakeai.Reply{Content: "a slow reply", Gate: gate, GateAfter: 1})

	cmd := exec.Command(bin, "-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0",
		"-upstream", up.URL, "-redis-url", rs.URL, "-drain-timeout", "5s")
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	lines := bufio.NewScanner(stderr)
	listen := regexp.MustCompile(`listen=(127\.0\.0\.1:\d+)`)
	var addr string
	for addr == "" && lines.Scan() {
		if m := listen.FindStringSubmatch(lines.Text()); m != nil {
			addr = m[1]
		}
	}
	require.NotEmpty(t, addr, "the start-up log names the listen address")
	go func() { // drain the log so the process never blocks on it
		for lines.Scan() {
		}
	}()

	c := openai.NewClient(option.WithBaseURL("http://"+addr+"/v1/"), option.WithAPIKey("k"),
		option.WithHeader("X-Session-ID", "c:sig:a"), option.WithMaxRetries(0))
	stream := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("slowly")},
	})
	require.True(t, stream.Next())
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))

	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	time.Sleep(200 * time.Millisecond) // the process must still be draining
	select {
	case err := <-exited:
		t.Fatalf("process exited (%v) while a stream was in flight", err)
	default:
	}
	close(gate)
	for stream.Next() {
	}
	require.NoError(t, stream.Err())
	select {
	case err := <-exited:
		require.NoError(t, err, "exit status 0")
	case <-time.After(10 * time.Second):
		t.Fatal("process did not exit after the stream ended")
	}
	n, err := rs.Client(t).XLen(context.Background(), "hp:{c:sig:a}:conv:c1").Result()
	require.NoError(t, err)
	require.EqualValues(t, 2, n, "the drained stream was recorded")
}

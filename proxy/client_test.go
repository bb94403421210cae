package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
)

func stallTimeout(d time.Duration) func(*Options) {
	return func(o *Options) { o.ClientWriteTimeout = d }
}

// withServer restarts the harness's server with set applied to its
// configuration.
func (h *harness) withServer(t *testing.T, set func(*http.Server)) {
	h.srv.Close()
	h.srv = httptest.NewUnstartedServer(h.px.Handler())
	set(h.srv.Config)
	h.srv.Start()
	t.Cleanup(h.srv.Close)
}

// withReadTimeout restarts the harness's server with a ReadTimeout, as
// main sets client.read_timeout.
func (h *harness) withReadTimeout(t *testing.T, d time.Duration) {
	h.withServer(t, func(s *http.Server) { s.ReadTimeout = d })
}

// TestTrickledBodyIsCut: a client that sends its body a byte at a time is
// answered 408 once the read timeout passes, and nothing is forwarded.
func TestTrickledBodyIsCut(t *testing.T) {
	h := newHarness(t, stallTimeout(time.Minute))
	h.withReadTimeout(t, 300*time.Millisecond)
	conn, err := net.Dial("tcp", h.srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	body := chatBody(user("hi"))
	_, err = fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Session-ID: c:slow:a\r\nContent-Length: %d\r\n\r\n", len(body))
	require.NoError(t, err)
	// Trickle in the background until the server gives up on us.
	go func() { // ends when a write fails (the server closed) or the body is sent
		for i := 0; i < len(body); i++ {
			if _, err := conn.Write([]byte{body[i]}); err != nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	require.NoError(t, conn.SetReadDeadline(time.Now().Add(20*time.Second)))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err, "the server answers before the trickle ends (%d bytes at 10/s)", len(body))
	require.Equal(t, http.StatusRequestTimeout, resp.StatusCode)
	assertOpenAIError(t, readAll(t, resp), "request_timeout")
	require.Empty(t, h.up.Requests(), "nothing forwarded")
}

// TestStalledReaderDoesNotHoldAStream: a client that stops reading a
// stream holds it at most ClientWriteTimeout; the handler then ends and
// records what was generated as incomplete.
//
// A write can only wait once the socket buffers between the proxy and the
// client are full. Left to the kernel, the proxy's send buffer grows to
// tcp_wmem's maximum (4 MiB here): the proxy would relay 4 MB of deltas
// (JSON encoded by the fake upstream, decoded by the proxy) before its
// first write could block, seconds of CPU under -race, past any fixed wait
// on a loaded machine. Both ends' buffers are set small, so a write blocks
// after some 100 KiB whatever the machine's load.
func TestStalledReaderDoesNotHoldAStream(t *testing.T) {
	h := newHarness(t, stallTimeout(300*time.Millisecond))
	h.withServer(t, func(s *http.Server) {
		s.ConnState = func(c net.Conn, st http.ConnState) {
			if st != http.StateNew {
				return
			}
			if err := c.(*net.TCPConn).SetWriteBuffer(4 << 10); err != nil {
				t.Errorf("set the send buffer: %v", err) // not FailNow: a server goroutine
			}
		}
	})
	// 1 MiB of deltas, ten times what the buffers hold.
	deltas := make([]string, 256)
	for i := range deltas {
		deltas[i] = strings.Repeat(" word", 4<<10/5)
	}
	h.up.Enqueue(fakeai.Reply{Deltas: deltas})
	conn, err := net.Dial("tcp", h.srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	require.NoError(t, conn.(*net.TCPConn).SetReadBuffer(4<<10))
	body := `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"a lot"}]}`
	_, err = fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Session-ID: c:stall:a\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	require.NoError(t, err)
	// Read the headers and a little, then stop reading.
	br := bufio.NewReaderSize(conn, 1024)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	_, err = io.ReadFull(resp.Body, make([]byte, 512))
	require.NoError(t, err)

	// The connection stays open and unread: only the write deadline can
	// end the handler. The wait is generous; the handler ends some 300 ms
	// after its buffers fill.
	var msgs []history.Message
	require.Eventually(t, func() bool {
		msgs = h.stored(t, "c:stall:a")
		return len(msgs) == 2
	}, time.Minute, 20*time.Millisecond, "the stalled stream ends and is recorded")
	require.Equal(t, history.StatusIncomplete, msgs[1].Status, "recorded as cut")
	full := strings.Join(deltas, "")
	require.True(t, strings.HasPrefix(full, msgs[1].Content), "what was generated before the stall")
	require.Less(t, len(msgs[1].Content), len(full)/2, "cut long before the end")
}

// TestStreamsBeingReadAreNotCut: a stream that lasts far longer than both
// client timeouts, read as it comes, runs to its end.
func TestStreamsBeingReadAreNotCut(t *testing.T) {
	h := newHarness(t, stallTimeout(200*time.Millisecond))
	h.withReadTimeout(t, 200*time.Millisecond)
	h.up.Enqueue(fakeai.Reply{Deltas: []string{"one", " two", " three", " four", " five"}, ChunkDelay: 250 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"slowly"}]}`))
	require.NoError(t, err)
	req.Header.Set("X-Session-ID", "c:read:a")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	events := sseEvents(t, resp.Body)
	require.Equal(t, "[DONE]", events[len(events)-1])
	msgs := h.stored(t, "c:read:a")
	require.Len(t, msgs, 2)
	require.Equal(t, "one two three four five", msgs[1].Content)
	require.Equal(t, history.StatusComplete, msgs[1].Status)
}

package proxy

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// readUntil reads r until what was read contains marker, and sends it; it
// is meant to run in its own goroutine while the upstream waits.
func readUntil(r io.Reader, marker string, got chan<- string) {
	var buf bytes.Buffer
	p := make([]byte, 4<<10)
	for !strings.Contains(buf.String(), marker) {
		n, err := r.Read(p)
		buf.Write(p[:n])
		if err != nil {
			break
		}
	}
	got <- buf.String()
}

// newGate returns a gate for a fake upstream reply and its opener. The gate
// is opened at cleanup too, before the servers close, so a failing test
// does not leave the upstream waiting and the servers' Close with it.
func newGate(t *testing.T) (gate chan struct{}, open func()) {
	gate = make(chan struct{})
	var once sync.Once
	open = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)
	return gate, open
}

// awaitWhileGated fails the test when got brings nothing in a generous
// time: the proxy held back what the upstream had already sent.
func awaitWhileGated(t *testing.T, got <-chan string, what string) string {
	t.Helper()
	select {
	case s := <-got:
		return s
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not reach the client while the upstream waited", what)
		return ""
	}
}

// TestLoneCRStreamRelayedAtOnce: an upstream that frames its events with
// lone CRs (as the SSE specification allows), then pauses: the client has
// the first event during the pause, not after it.
func TestLoneCRStreamRelayedAtOnce(t *testing.T) {
	h := newHarness(t)
	gate, open := newGate(t)
	defer open() // before the cleanups: a body still being read blocks its Close
	h.up.Enqueue(fakeai.Reply{Content: "one two", LineEnd: "\r", Gate: gate, GateAfter: 1})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o-mini","stream":true,"messages":[`+user("count")+`]}`,
		map[string]string{"X-Session-User": "cr"})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	got := make(chan string, 1)
	go readUntil(resp.Body, "\r\r", got)
	first := awaitWhileGated(t, got, "the first event")
	require.True(t, strings.HasPrefix(first, "data: {"), "got %q", first)
	open()
	rest := readAll(t, resp)
	require.True(t, strings.HasSuffix(first+rest, "data: [DONE]\r\r"), "got %q", first+rest)
	require.NotContains(t, first+rest, `"usage":{`, "the usage chunk the proxy asked for is still hidden")
	msgs := h.stored(t, "api:cr:default")
	require.Len(t, msgs, 2)
	require.Equal(t, "one two", msgs[1].Content)
}

// TestFailClosedWithholdsDoneWhateverTheFraming: with fail_closed, a turn
// that cannot be written aborts the stream before data: [DONE], whatever
// the line endings, and when the upstream sends [DONE] without its blank
// line. The write fails on a real redis-server: the session's hash key
// holds a string.
func TestFailClosedWithholdsDoneWhateverTheFraming(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	_, srv := redisProxy(t, rs, up, func(o *Options) { o.FailClosed = true })
	chunk := `{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}`
	cases := []struct {
		name  string
		reply fakeai.Reply
	}{
		{"lone CR", fakeai.Reply{Content: "hi", LineEnd: "\r"}},
		{"CRLF", fakeai.Reply{Content: "hi", LineEnd: "\r\n"}},
		{"DONE without a blank line", fakeai.Reply{Raw: []byte("data: " + chunk + "\n\ndata: [DONE]"),
			Header: http.Header{"Content-Type": {"text/event-stream"}}}},
		{"DONE and one LF", fakeai.Reply{Raw: []byte("data: " + chunk + "\n\ndata: [DONE]\n"),
			Header: http.Header{"Content-Type": {"text/event-stream"}}}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			userID := "fc" + string(rune('a'+i))
			require.NoError(t, rs.Client(t).Set(context.Background(), "hp:{api:"+userID+":default}:session", "not a hash", 0).Err())
			up.Enqueue(tc.reply)
			// The request carries its own history: nothing is read, so it
			// is forwarded, and only the write fails.
			body := `{"model":"gpt-4o","stream":true,"user":"` + userID + `","messages":[` + user("a") + `,{"role":"assistant","content":"b"},` + user("c") + `]}`
			resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
			require.NoError(t, err)
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body) // aborted: an unexpected EOF
			require.Contains(t, string(got), "data: {", "the reply itself is relayed")
			require.NotContains(t, string(got), "[DONE]", "the client must not believe the turn was stored")
		})
	}
}

// TestGzipStreamRelayedAsItArrivesAndRecorded: an upstream that gzips its
// stream although the proxy asked for identity. The client gets each event
// as the upstream flushes it, and the turn is still recorded.
func TestGzipStreamRelayedAsItArrivesAndRecorded(t *testing.T) {
	h := newHarness(t)
	gate, open := newGate(t)
	defer open() // before the cleanups: a body still being read blocks its Close
	h.up.Enqueue(fakeai.Reply{Content: "zipped stream", Gzip: true, Gate: gate, GateAfter: 2,
		Usage: &fakeai.Usage{PromptTokens: 7, CompletionTokens: 3}})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o-mini","stream":true,"messages":[`+user("zip it")+`]}`,
		map[string]string{"X-Session-User": "gzs"})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "identity", h.up.LastChat().Header.Get("Accept-Encoding"))
	require.True(t, resp.Uncompressed, "the client's transport decoded the gzip the upstream sent")
	got := make(chan string, 1)
	go readUntil(resp.Body, `"content":"zipped"`, got)
	first := awaitWhileGated(t, got, "the events sent before the pause")
	require.NotContains(t, first, "[DONE]")
	open()
	rest := readAll(t, resp)
	require.Contains(t, rest, "data: [DONE]")

	msgs := h.stored(t, "api:gzs:default")
	require.Len(t, msgs, 2, "the turn is recorded")
	require.Equal(t, "zipped stream", msgs[1].Content)
	require.Equal(t, history.StatusComplete, msgs[1].Status)
	s, _, err := h.store.Session(context.Background(), "api:gzs:default")
	require.NoError(t, err)
	require.EqualValues(t, 7, s.Totals.PromptTokens, "the usage chunk was read from the compressed stream")
}

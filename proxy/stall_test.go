package proxy

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
)

// stallBoundOpt: the upstream's silence mid-reply is bounded.
func stallBoundOpt(o *Options) { o.UpstreamIdleTimeout = 300 * time.Millisecond }

// TestStalledUpstreamStreamIsCut: an upstream that sends its headers and
// part of a stream, then nothing, is cut after upstream.stream_idle_timeout
// of silence; what it generated is stored as incomplete, and the client's
// stream ends (without [DONE]) instead of hanging.
func TestStalledUpstreamStreamIsCut(t *testing.T) {
	h := newHarness(t, stallBoundOpt)
	gate, _ := newGate(t) // never opened by the test: the upstream stalls
	h.up.Enqueue(fakeai.Reply{Content: "partial answer that never ends", Gate: gate, GateAfter: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o","stream":true,"messages":[`+user("go")+`]}`))
	req.Header.Set("X-Session-User", "stalled")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.Error(t, err, "the stream is cut, not ended")
	require.NoError(t, ctx.Err(), "the stream ended before the test's 10 s")
	require.NotContains(t, string(body), "[DONE]")
	require.Eventually(t, func() bool {
		return len(h.stored(t, "api:stalled:default")) == 2
	}, 5*time.Second, 10*time.Millisecond)
	msgs := h.stored(t, "api:stalled:default")
	require.Equal(t, history.StatusIncomplete, msgs[1].Status)
	require.Equal(t, "partial answer", msgs[1].Content, "what was generated is kept")
}

// TestStalledUpstreamWholeReplyIsCut: a whole (non-stream) reply whose
// body stops after its headers gets 504 after the same silence; nothing
// is stored (no reply was read).
func TestStalledUpstreamWholeReplyIsCut(t *testing.T) {
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, `{"id":"x","choices":[`)
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(up.Close)
	t.Cleanup(func() { close(release) })
	u, err := url.Parse(up.URL + "/v1")
	require.NoError(t, err)
	h := newHarness(t, stallBoundOpt, func(o *Options) { o.Upstream = u })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user("go"))))
	req.Header.Set("X-Session-User", "stalledwhole")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err, "answered before the test's 10 s")
	defer resp.Body.Close()
	require.Equal(t, http.StatusGatewayTimeout, resp.StatusCode)
	assertOpenAIError(t, readAll(t, resp), "upstream_timeout")
	_, ok, _ := h.store.Session(context.Background(), "api:stalledwhole:default")
	require.False(t, ok, "nothing stored")
}

// TestSlowUpstreamStreamIsNotCut: an upstream that pauses less than the
// bound between events, for longer than the bound in all, is not cut.
func TestSlowUpstreamStreamIsNotCut(t *testing.T) {
	h := newHarness(t, stallBoundOpt)
	h.up.Enqueue(fakeai.Reply{Content: "one two three four five six", ChunkDelay: 100 * time.Millisecond})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[`+user("go")+`]}`, map[string]string{"X-Session-User": "slow"})
	sc := bufio.NewScanner(resp.Body)
	done := false
	for sc.Scan() {
		done = done || sc.Text() == "data: [DONE]"
	}
	require.NoError(t, sc.Err())
	require.True(t, done, "the whole stream arrived")
	msgs := h.stored(t, "api:slow:default")
	require.Len(t, msgs, 2)
	require.Equal(t, history.StatusComplete, msgs[1].Status)
}

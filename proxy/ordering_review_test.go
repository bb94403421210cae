package proxy

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
)

// TestRequestsRecordingNothingGiveTheTurnBack: with the in-process store a
// lease never expires, so one not given back would hold its session for
// good. Each request that records nothing (the upstream refuses or fails,
// a reply that is not a chat completion, a read-only request, a body the
// proxy refuses) leaves the session free: a request of an agent that
// rejects busy sessions is answered at once after it.
func TestRequestsRecordingNothingGiveTheTurnBack(t *testing.T) {
	reject := func(string) Agent { a := orderedAgent(""); a.Ordering = OrderingReject; return a }
	cases := []struct {
		name  string
		reply *fakeai.Reply
		body  string
		hdr   map[string]string
	}{
		{name: "upstream 400", reply: &fakeai.Reply{Status: http.StatusBadRequest}},
		{name: "upstream 500", reply: &fakeai.Reply{Status: http.StatusInternalServerError}},
		{name: "upstream 503 streamed", reply: &fakeai.Reply{Status: http.StatusServiceUnavailable},
			body: `{"model":"gpt-4o-mini","stream":true,"messages":[` + user("hi") + `]}`},
		{name: "not a chat completion", reply: &fakeai.Reply{Raw: []byte(`{"object":"list","data":[]}`)}},
		{name: "not JSON", reply: &fakeai.Reply{Raw: []byte(`<html>gateway</html>`), Header: http.Header{"Content-Type": {"text/html"}}}},
		{name: "read-only", reply: &fakeai.Reply{Content: "ok"}, hdr: map[string]string{"X-History": "read-only"}},
		{name: "bad body", body: `{"model":"gpt-4o-mini","messages":"not a list"}`},
		{name: "no messages", body: `{"model":"gpt-4o-mini","messages":[]}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(o *Options) { o.Agent = reject })
			const session = "chat:nothing:support"
			if tc.reply != nil {
				h.up.Enqueue(*tc.reply)
			}
			body := tc.body
			if body == "" {
				body = chatBody(user("hi"))
			}
			hdr := map[string]string{"X-Session-ID": session}
			for k, v := range tc.hdr {
				hdr[k] = v
			}
			readAll(t, h.do(t, "/v1/chat/completions", body, hdr))
			resp := h.do(t, "/v1/chat/completions", chatBody(user("next")), map[string]string{"X-Session-ID": session})
			require.Equal(t, http.StatusOK, resp.StatusCode, "the session's turn was not given back: %s", readAll(t, resp))
		})
	}
}

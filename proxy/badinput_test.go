package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/tokens"
)

// badSession is where every badinput case's turns would be recorded.
const badSession = "api:bad:default"

var badHeader = map[string]string{"X-Session-User": "bad"}

type badCase struct {
	name    string
	path    string // "" = /v1/chat/completions
	body    string
	replies []fakeai.Reply // queued upstream answers
	// send replaces h.do (which sends badHeader).
	send      func(t *testing.T, h *harness, body string) *http.Response
	status    int
	forwarded bool
	// stored are the roles recorded in badSession; nil: nothing recorded,
	// not even usage.
	stored []string
	check  func(t *testing.T, h *harness, resp *http.Response, body string)
}

// badSendHugeHeader sends body with a 2 MiB header to the proxy behind a
// real http.Server limited to 1 MiB of headers, over a raw connection: the
// server answers 431 and stops reading, so the write is left to fail.
func badSendHugeHeader(t *testing.T, h *harness, body string) *http.Response {
	t.Helper()
	srv := &http.Server{Handler: h.px.Handler(), MaxHeaderBytes: 1 << 20, ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	conn, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	var req bytes.Buffer
	fmt.Fprintf(&req, "POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nX-Session-User: bad\r\n", ln.Addr())
	fmt.Fprintf(&req, "X-Filler: %s\r\n", strings.Repeat("a", 2<<20))
	fmt.Fprintf(&req, "Content-Length: %d\r\n\r\n%s", len(body), body)
	go func() { _, _ = conn.Write(req.Bytes()) }()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// badRawCompletion is a whole chat completion without usage, so the proxy
// estimates the prompt (request messages and tools) itself.
const badRawCompletion = `{"id":"chatcmpl-raw1","object":"chat.completion","created":1741569952,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok","refusal":null},"logprobs":null,"finish_reason":"stop"}]}`

// badFields decodes a forwarded body's top-level fields.
func badFields(t *testing.T, body []byte) map[string]json.RawMessage {
	t.Helper()
	var f map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(body, &f), string(body))
	return f
}

// badWrongTools is a case where tools has the wrong type: the proxy counts
// it as text, forwards it untouched and lets the upstream decide.
func badWrongTools(name, tools string) badCase {
	body := `{"model":"gpt-4o","tools":` + tools + `,"messages":[` + user("weather?") + `]}`
	return badCase{
		name: name, body: body, replies: []fakeai.Reply{{Raw: []byte(badRawCompletion)}},
		status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant", "user", "assistant"},
		check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
			if got := string(h.up.LastChat().Body); got != body {
				t.Fatalf("got forwarded body %s, want it unchanged: %s", got, body)
			}
			s, ok, err := h.store.Session(context.Background(), badSession)
			require.NoError(t, err)
			require.True(t, ok)
			require.Positive(t, s.Totals.PromptTokens, "the estimate counts the request (tools as text)")

			// With history injected the body is rewritten; tools keep their value.
			r := h.do(t, "/v1/chat/completions", body, badHeader)
			require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
			require.Equal(t, "2", r.Header.Get("X-History-Messages"))
			require.JSONEq(t, tools, string(badFields(t, h.up.LastChat().Body)["tools"]))
		},
	}
}

func TestBadInputForwardedOrRejected(t *testing.T) {
	unknownParts := `[{"type":"text","text":"what is this?"},{"type":"hologram","hologram":{"uri":"holo://x","depth":3}},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo=","detail":"low"}},{"type":"x-future","x":[1,null,{"y":"é"}]}]`
	// Spacing and HTML characters, as a hand-written client might send.
	spacedParts := `[ {"type": "text", "text": "a <b> & c"}, {"type": "hologram", "depth": 3} ]`
	cases := []badCase{
		{
			name: "oversized header", body: chatBody(user("x")), send: badSendHugeHeader,
			status: http.StatusRequestHeaderFieldsTooLarge,
		},
		{
			name: "unknown model", body: `{"model":"acme-llm-7b","messages":[` + user("hello there") + `]}`,
			status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
				require.Equal(t, "acme-llm-7b", h.up.LastChat().Chat.Model)
				msgs := h.stored(t, badSession)
				for _, m := range msgs {
					require.Equal(t, "acme-llm-7b", m.Model)
					require.Positive(t, m.Tokens)
				}
				// The request's messages are counted locally, with the
				// default encoding (o200k_base in the harness, gpt-4o's).
				if want := sharedCounter.Message("gpt-4o", tokenMessage(msgs[0])); msgs[0].Tokens != want {
					t.Fatalf("user message: got %d tokens, want %d (default encoding)", msgs[0].Tokens, want)
				}
				s, ok, err := h.store.Session(context.Background(), badSession)
				require.NoError(t, err)
				require.True(t, ok)
				require.EqualValues(t, 1, s.Totals.Requests)
				require.Positive(t, s.Totals.PromptTokens)
				if s.Totals.CostNanos != 0 {
					t.Fatalf("got cost %d nano-USD, want 0 for an unpriced model", s.Totals.CostNanos)
				}
				// The same turn on a priced model does cost something.
				h.do(t, "/v1/chat/completions", chatBody(user("hello there")), map[string]string{"X-Session-User": "priced"})
				p, _, err := h.store.Session(context.Background(), "api:priced:default")
				require.NoError(t, err)
				require.Positive(t, p.Totals.CostNanos)
			},
		},
		{
			name: "unknown model, no usage from the upstream", body: `{"model":"acme-llm-7b","messages":[` + user("hello there") + `]}`,
			replies: []fakeai.Reply{{Raw: []byte(badRawCompletion)}},
			status:  http.StatusOK, forwarded: true, stored: []string{"user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
				msgs := h.stored(t, badSession)
				for _, m := range msgs {
					if want := sharedCounter.Message("gpt-4o", tokenMessage(m)); m.Tokens != want {
						t.Fatalf("%s message: got %d tokens, want %d (default encoding)", m.Role, m.Tokens, want)
					}
				}
				s, _, err := h.store.Session(context.Background(), badSession)
				require.NoError(t, err)
				wantPrompt := sharedCounter.Messages("gpt-4o", []tokens.Message{tokenMessage(msgs[0])})
				if s.Totals.PromptTokens != int64(wantPrompt) {
					t.Fatalf("got %d prompt tokens, want the local estimate %d", s.Totals.PromptTokens, wantPrompt)
				}
				require.Zero(t, s.Totals.CostNanos)
			},
		},
		{
			name: "n above 1, whole reply", body: `{"model":"gpt-4o-mini","n":2,"messages":[` + user("pick") + `]}`,
			status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, body string) {
				require.Equal(t, 2, h.up.LastChat().Chat.N)
				require.Contains(t, body, `"[choice 1] echo: pick [messages=1]"`, "the client gets every choice")
				if got := h.stored(t, badSession)[1].Content; got != "echo: pick [messages=1]" {
					t.Fatalf("got stored reply %q, want choice 0's %q", got, "echo: pick [messages=1]")
				}
			},
		},
		{
			name: "n above 1, stream", body: `{"model":"gpt-4o-mini","n":3,"stream":true,"messages":[` + user("pick") + `]}`,
			status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, body string) {
				require.Equal(t, 3, h.up.LastChat().Chat.N)
				require.Contains(t, body, `"[choice 2] "`, "the client gets every choice")
				require.True(t, strings.HasSuffix(body, "data: [DONE]\n\n"))
				m := h.stored(t, badSession)[1]
				if m.Content != "echo: pick [messages=1]" {
					t.Fatalf("got stored reply %q, want choice 0's %q", m.Content, "echo: pick [messages=1]")
				}
				require.Equal(t, history.StatusComplete, m.Status)
			},
		},
		{
			name: "content parts of unknown types", body: chatBody(`{"role":"user","content":` + unknownParts + `}`),
			status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant", "user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
				if got := string(h.up.LastChat().Body); got != chatBody(`{"role":"user","content":`+unknownParts+`}`) {
					t.Fatalf("got forwarded body %s, want it byte for byte as sent", got)
				}
				if got := string(h.stored(t, badSession)[0].Parts); got != unknownParts {
					t.Fatalf("got stored parts %s, want them byte for byte as sent: %s", got, unknownParts)
				}
				r := h.do(t, "/v1/chat/completions", chatBody(user("and now?")), badHeader)
				require.Equal(t, "2", r.Header.Get("X-History-Messages"), readAll(t, r))
				var sent struct {
					Messages []struct{ Content json.RawMessage } `json:"messages"`
				}
				require.NoError(t, json.Unmarshal(h.up.LastChat().Body, &sent))
				if got := string(sent.Messages[0].Content); got != unknownParts {
					t.Fatalf("got injected parts %s, want them byte for byte as sent: %s", got, unknownParts)
				}
			},
		},
		{
			name: "content parts with spacing, stream (body rewritten)", body: `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":` + spacedParts + `}]}`,
			status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
				var sent struct {
					Messages []struct{ Content json.RawMessage } `json:"messages"`
				}
				require.NoError(t, json.Unmarshal(h.up.LastChat().Body, &sent))
				require.JSONEq(t, spacedParts, string(sent.Messages[0].Content), "same value upstream")
				if got := string(h.stored(t, badSession)[0].Parts); got != spacedParts {
					t.Fatalf("got stored parts %s, want them byte for byte as sent: %s", got, spacedParts)
				}
			},
		},
		badWrongTools("tools a string", `"get_weather"`),
		badWrongTools("tools an object", `{"type":"function","function":{"name":"get_weather"}}`),
		badWrongTools("tools a number", `42`),
		badWrongTools("tools an array of junk", `[1,"x",null,{"type":"function","function":"nope"},{"type":"function","function":{"name":"f","parameters":{"properties":{"a":{"type":["string","null"],"enum":[1,{}]}}}}}]`),
		{
			name:   "developer message stays first, not recorded",
			body:   chatBody(`{"role":"developer","content":"Answer in French."}`, user("hi")),
			status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant", "user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
				r := h.do(t, "/v1/chat/completions", chatBody(`{"role":"developer","content":"Answer in French."}`, user("again")), badHeader)
				require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
				got := h.up.LastChat().Chat.Messages
				require.Equal(t, []string{"developer", "user", "assistant", "user"}, roles(got), "developer first, then history")
				require.Equal(t, "Answer in French.", got[0]["content"])
				require.Equal(t, "hi", got[1]["content"])
			},
		},
		{
			name: "function message after a function call: forwarded, not recorded",
			body: chatBody(user("6*7?"), `{"role":"assistant","content":null,"function_call":{"name":"calc","arguments":"{\"x\":\"6*7\"}"}}`,
				`{"role":"function","name":"calc","content":"42"}`),
			status: http.StatusOK, forwarded: true, stored: []string{"assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
				got := h.up.LastChat().Chat.Messages
				require.Equal(t, []string{"user", "assistant", "function"}, roles(got))
				require.Equal(t, "calc", got[2]["name"])
				require.Equal(t, "echo: 6*7? [messages=3]", h.stored(t, badSession)[0].Content)
			},
		},
		{
			name:   "function message without a call: forwarded, not recorded",
			body:   chatBody(user("6*7?"), `{"role":"function","name":"calc","content":"42"}`),
			status: http.StatusOK, forwarded: true, stored: []string{"user", "assistant"},
			check: func(t *testing.T, h *harness, _ *http.Response, _ string) {
				require.Equal(t, []string{"user", "function"}, roles(h.up.LastChat().Chat.Messages))
			},
		},
		{
			name: "stream_options without stream: the upstream's 400 is relayed", body: `{"model":"gpt-4o","stream_options":{"include_usage":true},"messages":[` + user("x") + `]}`,
			status: http.StatusBadRequest, forwarded: true,
			check: func(t *testing.T, h *harness, _ *http.Response, body string) {
				require.Contains(t, body, "stream_options")
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			for _, r := range tc.replies {
				h.up.Enqueue(r)
			}
			var resp *http.Response
			if tc.send != nil {
				resp = tc.send(t, h, tc.body)
			} else {
				path := tc.path
				if path == "" {
					path = "/v1/chat/completions"
				}
				resp = h.do(t, path, tc.body, badHeader)
			}
			body := readAll(t, resp)
			if resp.StatusCode != tc.status {
				t.Fatalf("got status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			if got := len(h.up.Requests()) > 0; got != tc.forwarded {
				t.Fatalf("got forwarded %v, want %v", got, tc.forwarded)
			}
			if tc.check != nil {
				tc.check(t, h, resp, body)
			}
			_, ok, err := h.store.Session(context.Background(), badSession)
			require.NoError(t, err)
			if tc.stored == nil {
				if ok {
					t.Fatalf("got session %s recorded, want nothing recorded", badSession)
				}
				return
			}
			require.True(t, ok, "the turn is recorded")
			var got []string
			for _, m := range h.stored(t, badSession) {
				got = append(got, m.Role)
			}
			require.Equal(t, tc.stored, got, "recorded roles")
		})
	}
}

// An upstream may send an SSE stream with a Content-Length (a buffering
// gateway, a cache). Dropping the usage chunk shortens the body, so the
// length must not be relayed.
func TestStreamContentLengthWithHiddenUsage(t *testing.T) {
	cases := []struct {
		name, opts string
	}{
		{name: "usage chunk hidden", opts: ``},
		{name: "usage chunk kept", opts: `,"stream_options":{"include_usage":true}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			sse := sbEvents(sbRole, sbHello, sbStop, sbUsage, sbDone)
			// Raw is written in one piece, so the fake sends a Content-Length.
			h.up.Enqueue(fakeai.Reply{Raw: []byte(sse), Header: http.Header{"Content-Type": {"text/event-stream"}}})
			r := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o","stream":true`+tc.opts+`,"messages":[`+user("hi")+`]}`, badHeader)
			b, err := io.ReadAll(r.Body)
			if err != nil {
				t.Fatalf("got %v after %d bytes (Content-Length %q), want the whole stream", err, len(b), r.Header.Get("Content-Length"))
			}
			require.True(t, strings.HasSuffix(string(b), "data: [DONE]\n\n"))
		})
	}
}

// A base URL with a trailing slash ("/s/web/u1/agent/" + "/v1/...") or any
// other unclean path after the session prefix must keep the session, not
// be redirected to the bare /v1 path where it is silently lost.
func TestUncleanPathAfterSessionPrefix(t *testing.T) {
	cases := []string{
		"/s/web/u1/agent//v1/chat/completions",
		"/s/web/u1/agent/v1//chat/completions",
		"/s/web/u1/agent/v1/./chat/completions",
	}
	for _, path := range cases {
		t.Run(path, func(t *testing.T) {
			h := newHarness(t)
			r := h.do(t, path, chatBody(user("hi")), nil) // follows redirects
			require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
			if got := r.Header.Get("X-Session-ID"); got != "web:u1:agent" {
				t.Fatalf("got session %q, want %q", got, "web:u1:agent")
			}
			require.Len(t, h.stored(t, "web:u1:agent"), 2)
		})
	}
}

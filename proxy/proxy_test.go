package proxy

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/tokens"
)

var _ Store = (*history.MemoryStore)(nil)
var _ Store = (*history.RedisStore)(nil)

// harness is the proxy in front of the fake upstream, with a store.
type harness struct {
	up    *fakeai.Server
	store *history.MemoryStore
	px    *Proxy
	srv   *httptest.Server
}

func defaultAgent(string) Agent {
	return Agent{Mode: ModePerUser, MaxTokens: 4000, MaxMessages: 20, OutputReserve: 1024}
}

var sharedCounter = func() *tokens.Counter {
	c, err := tokens.New("o200k_base")
	if err != nil {
		panic(err)
	}
	return c
}()

func newHarness(t *testing.T, mod ...func(*Options)) *harness {
	t.Helper()
	h := &harness{up: fakeai.New(t), store: history.NewMemory()}
	u, err := url.Parse(h.up.URL)
	require.NoError(t, err)
	opt := Options{
		Upstream: u, Store: h.store, Counter: sharedCounter, Catalog: tokens.NewCatalog(nil), Agent: defaultAgent,
		DefaultChannel: "api", DefaultAgent: "default",
	}
	for _, m := range mod {
		m(&opt)
	}
	h.px, err = New(opt)
	require.NoError(t, err)
	h.srv = httptest.NewServer(h.px.Handler())
	t.Cleanup(h.srv.Close)
	return h
}

func (h *harness) do(t *testing.T, path, body string, hdr map[string]string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, h.srv.URL+path, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func readAll(t *testing.T, r *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(r.Body)
	require.NoError(t, err)
	return string(b)
}

func chatBody(msgs ...string) string {
	return `{"model":"gpt-4o-mini","messages":[` + strings.Join(msgs, ",") + `]}`
}

func user(s string) string { return `{"role":"user","content":` + jsonString(s) + `}` }

func jsonString(s string) string { b, _ := json.Marshal(s); return string(b) }

func (h *harness) stored(t *testing.T, session string) []history.Message {
	t.Helper()
	msgs, err := h.store.Messages(context.Background(), session, "")
	require.NoError(t, err)
	return msgs
}

func roles(msgs []map[string]any) []string {
	var out []string
	for _, m := range msgs {
		out = append(out, m["role"].(string))
	}
	return out
}

func TestInjectsHistoryAcrossTurns(t *testing.T) {
	h := newHarness(t)
	sid := map[string]string{"X-Session-ID": "chat:ann@example.com:support"}
	sys := `{"role":"system","content":"be brief"}`

	r1 := h.do(t, "/v1/chat/completions", chatBody(sys, user("My name is Ann")), sid)
	require.Equal(t, http.StatusOK, r1.StatusCode, readAll(t, r1))
	require.Equal(t, "chat:ann@example.com:support", r1.Header.Get("X-Session-ID"))
	require.Equal(t, "0", r1.Header.Get("X-History-Messages"))

	r2 := h.do(t, "/v1/chat/completions", chatBody(sys, user("What is my name?")), sid)
	body := readAll(t, r2)
	require.Equal(t, http.StatusOK, r2.StatusCode, body)
	require.Equal(t, "2", r2.Header.Get("X-History-Messages"))
	require.NotEqual(t, "0", r2.Header.Get("X-History-Tokens"))

	got := h.up.LastChat().Chat.Messages
	require.Equal(t, []string{"system", "user", "assistant", "user"}, roles(got), "system first, then history, then the new message")
	require.Equal(t, "My name is Ann", got[1]["content"])
	require.Equal(t, "echo: My name is Ann [messages=2]", got[2]["content"])
	require.Equal(t, "What is my name?", got[3]["content"])

	stored := h.stored(t, "chat:ann@example.com:support")
	require.Len(t, stored, 4, "two turns of user + assistant; system messages are not recorded")
	for i, want := range []string{"user", "assistant", "user", "assistant"} {
		require.Equal(t, want, stored[i].Role)
		require.Equal(t, "ann@example.com", stored[i].User)
		require.Equal(t, "gpt-4o-mini", stored[i].Model)
		require.Positive(t, stored[i].Tokens)
		require.Equal(t, history.StatusComplete, stored[i].Status)
	}
	require.Equal(t, "echo: What is my name? [messages=4]", stored[3].Content)
	require.NotEmpty(t, stored[3].RequestID, "the upstream's request id is kept")

	s, ok, err := h.store.Session(context.Background(), "chat:ann@example.com:support")
	require.NoError(t, err)
	require.True(t, ok)
	require.EqualValues(t, 2, s.Totals.Requests)
	require.Positive(t, s.Totals.PromptTokens)
	require.Positive(t, s.Totals.HistoryTokens)
}

// sseEvents reads a stream's events (their data) until EOF.
func sseEvents(t *testing.T, r io.Reader) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			out = append(out, v)
		}
	}
	require.NoError(t, sc.Err())
	return out
}

func TestStreamHidesUsageChunkItAddedAndRecords(t *testing.T) {
	cases := []struct {
		name        string
		streamOpts  string
		clientUsage bool
	}{
		{name: "client did not ask", streamOpts: ``},
		{name: "client asked", streamOpts: `,"stream_options":{"include_usage":true}`, clientUsage: true},
		{name: "client said no", streamOpts: `,"stream_options":{"include_usage":false}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.up.Enqueue(fakeai.Reply{Content: "Hello there, Ann.", Usage: &fakeai.Usage{PromptTokens: 11, CompletionTokens: 5, CachedTokens: 3}})
			body := `{"model":"gpt-4o","stream":true` + tc.streamOpts + `,"messages":[` + user("hi") + `]}`
			resp := h.do(t, "/v1/chat/completions", body, map[string]string{"X-Session-User": "ann"})
			require.Equal(t, http.StatusOK, resp.StatusCode)
			require.Contains(t, resp.Header.Get("Content-Type"), "text/event-stream")
			events := sseEvents(t, resp.Body)
			require.Equal(t, "[DONE]", events[len(events)-1])

			up := h.up.LastChat()
			require.True(t, up.Chat.IncludeUsage, "the proxy always asks the upstream for usage")

			var usageChunks int
			var text strings.Builder
			for _, e := range events[:len(events)-1] {
				var c struct {
					Choices []struct {
						Delta struct{ Content string }
					}
					Usage *struct {
						PromptTokens int `json:"prompt_tokens"`
					}
				}
				require.NoError(t, json.Unmarshal([]byte(e), &c), e)
				if len(c.Choices) == 0 && c.Usage != nil {
					usageChunks++
				}
				for _, ch := range c.Choices {
					text.WriteString(ch.Delta.Content)
				}
			}
			want := 0
			if tc.clientUsage {
				want = 1
			}
			require.Equal(t, want, usageChunks, "usage chunks seen by the client")
			require.Equal(t, "Hello there, Ann.", text.String())

			stored := h.stored(t, "api:ann:default")
			require.Len(t, stored, 2)
			require.Equal(t, "Hello there, Ann.", stored[1].Content)
			require.Equal(t, history.StatusComplete, stored[1].Status)
			s, _, err := h.store.Session(context.Background(), "api:ann:default")
			require.NoError(t, err)
			require.EqualValues(t, 11, s.Totals.PromptTokens, "usage comes from the upstream's usage chunk")
			require.EqualValues(t, 5, s.Totals.CompletionTokens)
			require.EqualValues(t, 3, s.Totals.CachedTokens)
		})
	}
}

// TestStreamIsFlushedPerEvent: the upstream sends one chunk and then waits;
// the client must see that chunk before the upstream sends the rest.
func TestStreamIsFlushedPerEvent(t *testing.T) {
	h := newHarness(t)
	gate := make(chan struct{})
	h.up.Enqueue(fakeai.Reply{Content: "one two three", Gate: gate, GateAfter: 2})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[`+user("hi")+`]}`, map[string]string{"X-Session-User": "u"})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	br := bufio.NewReader(resp.Body)
	var first []string
	for len(first) < 2 {
		line, err := br.ReadString('\n')
		require.NoError(t, err, "the first chunks must arrive while the upstream still holds the rest")
		if strings.HasPrefix(line, "data: ") {
			first = append(first, line)
		}
	}
	require.NotContains(t, first[1], "[DONE]")
	close(gate)
	rest, err := io.ReadAll(br)
	require.NoError(t, err)
	require.Contains(t, string(rest), "data: [DONE]")
}

func TestStreamToolCallsAssembledAndInjectedWithResults(t *testing.T) {
	h := newHarness(t)
	sid := map[string]string{"X-Session-ID": "app:u1:agent"}
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{
		{ID: "call_a", Name: "get_weather", Arguments: `{"city":"Paris","unit":"c"}`},
		{ID: "call_b", Name: "get_time", Arguments: `{"tz":"Europe/Paris"}`},
	}})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[`+user("weather and time in Paris?")+`]}`, sid)
	events := sseEvents(t, resp.Body)
	require.Equal(t, "[DONE]", events[len(events)-1])

	stored := h.stored(t, "app:u1:agent")
	require.Len(t, stored, 2)
	a := stored[1]
	require.Equal(t, history.KindToolCall, a.Kind)
	require.True(t, a.ContentNull)
	var calls []struct {
		ID       string
		Type     string
		Function struct{ Name, Arguments string }
	}
	require.NoError(t, json.Unmarshal(a.ToolCalls, &calls))
	require.Len(t, calls, 2)
	require.Equal(t, "call_a", calls[0].ID)
	require.Equal(t, "get_weather", calls[0].Function.Name)
	require.Equal(t, `{"city":"Paris","unit":"c"}`, calls[0].Function.Arguments, "fragments merged by index")
	require.Equal(t, `{"tz":"Europe/Paris"}`, calls[1].Function.Arguments)
	require.Equal(t, "function", calls[1].Type)

	// The app sends back only the tool results; the proxy injects the
	// user message and the assistant's tool calls before them.
	body := `{"model":"gpt-4o","messages":[` +
		`{"role":"tool","tool_call_id":"call_a","content":"18C"},` +
		`{"role":"tool","tool_call_id":"call_b","content":"14:00"}]}`
	resp2 := h.do(t, "/v1/chat/completions", body, sid)
	require.Equal(t, http.StatusOK, resp2.StatusCode, readAll(t, resp2))
	got := h.up.LastChat().Chat.Messages
	require.Equal(t, []string{"user", "assistant", "tool", "tool"}, roles(got))
	require.NotNil(t, got[1]["tool_calls"])
	require.Nil(t, got[1]["content"], "an assistant message that only calls tools is sent with null content")

	stored = h.stored(t, "app:u1:agent")
	require.Len(t, stored, 5)
	require.Equal(t, history.KindToolResult, stored[2].Kind)
	require.Equal(t, "call_b", stored[3].ToolCallID)

	// A new question: the whole tool group is injected before it.
	resp3 := h.do(t, "/v1/chat/completions", chatBody(user("thanks")), sid)
	require.Equal(t, http.StatusOK, resp3.StatusCode, readAll(t, resp3))
	require.Equal(t, []string{"user", "assistant", "tool", "tool", "assistant", "user"}, roles(h.up.LastChat().Chat.Messages))
}

// TestEmptyToolCallsReplyIsAPlainMessage: a whole reply with "tool_calls":
// [] (vLLM's answer to every request) calls no tool. It is stored as kind
// message with the array as sent, and injected as the same reply without
// it would be: OpenAI refuses an empty tool_calls in a request (400
// empty_array, as the fake does).
func TestEmptyToolCallsReplyIsAPlainMessage(t *testing.T) {
	h := newHarness(t)
	sid := map[string]string{"X-Session-ID": "app:u9:agent"}
	vllm := func(content string) fakeai.Reply {
		return fakeai.Reply{Raw: []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,` +
			`"message":{"role":"assistant","content":` + jsonString(content) + `,"tool_calls":[]},"finish_reason":"stop"}],` +
			`"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}`)}
	}
	h.up.Enqueue(vllm("Hello"))
	r1 := h.do(t, "/v1/chat/completions", chatBody(user("hi")), sid)
	require.Equal(t, http.StatusOK, r1.StatusCode, readAll(t, r1))
	h.up.Enqueue(vllm(""))
	r2 := h.do(t, "/v1/chat/completions", chatBody(user("and?")), sid)
	require.Equal(t, http.StatusOK, r2.StatusCode, readAll(t, r2))

	stored := h.stored(t, "app:u9:agent")
	require.Len(t, stored, 4)
	for _, i := range []int{1, 3} {
		require.Equal(t, history.KindMessage, stored[i].Kind, "reply %d", i)
		require.Equal(t, "[]", string(stored[i].ToolCalls), "reply %d keeps its array as sent", i)
		require.False(t, stored[i].ContentNull, "reply %d was sent with content, not null", i)
	}

	r3 := h.do(t, "/v1/chat/completions", chatBody(user("bye")), sid)
	require.Equal(t, http.StatusOK, r3.StatusCode, readAll(t, r3))
	got := h.up.LastChat().Chat.Messages
	require.Equal(t, []string{"user", "assistant", "user", "assistant", "user"}, roles(got))
	for _, i := range []int{1, 3} {
		_, has := got[i]["tool_calls"]
		require.False(t, has, "injected reply %d: %v", i, got[i])
	}
	require.Equal(t, "Hello", got[1]["content"])
	require.Equal(t, "", got[3]["content"])
}

func TestDanglingToolCallIsNotInjected(t *testing.T) {
	h := newHarness(t)
	sid := map[string]string{"X-Session-ID": "app:u2:agent"}
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_x", Name: "lookup", Arguments: `{}`}}})
	r1 := h.do(t, "/v1/chat/completions", chatBody(user("look it up")), sid)
	require.Equal(t, http.StatusOK, r1.StatusCode, readAll(t, r1))
	// The app never runs the tool and asks something else: injecting the
	// unanswered call would make the upstream answer 400.
	r2 := h.do(t, "/v1/chat/completions", chatBody(user("never mind")), sid)
	require.Equal(t, http.StatusOK, r2.StatusCode, readAll(t, r2))
	require.Equal(t, []string{"user", "user"}, roles(h.up.LastChat().Chat.Messages))
}

func TestRequestWithOwnHistoryIsNotInjected(t *testing.T) {
	h := newHarness(t)
	sid := map[string]string{"X-Session-User": "own"}
	r1 := h.do(t, "/v1/chat/completions", chatBody(user("first")), sid)
	require.Equal(t, http.StatusOK, r1.StatusCode)
	body := chatBody(user("a"), `{"role":"assistant","content":"b"}`, user("c"))
	r2 := h.do(t, "/v1/chat/completions", body, sid)
	require.Equal(t, http.StatusOK, r2.StatusCode, readAll(t, r2))
	require.Equal(t, "0", r2.Header.Get("X-History-Messages"))
	require.Len(t, h.up.LastChat().Chat.Messages, 3, "the app keeps its own history")
	stored := h.stored(t, "api:own:default")
	require.Len(t, stored, 4, "only what follows the request's last assistant message is recorded")
	require.Equal(t, "c", stored[2].Content)
}

func TestHistoryHeaderAndModes(t *testing.T) {
	agents := func(name string) Agent {
		a := defaultAgent(name)
		switch name {
		case "quiet":
			a.Mode = ModeOff
		case "room":
			a.Mode = ModeShared
		}
		return a
	}
	h := newHarness(t, func(o *Options) { o.Agent = agents })
	ctx := context.Background()

	// X-History: off records and injects nothing.
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-User": "h1", "X-History": "off"})
	require.Equal(t, http.StatusOK, r.StatusCode)
	_, ok, err := h.store.Session(ctx, "api:h1:default")
	require.NoError(t, err)
	require.False(t, ok)

	// read-only injects but does not record.
	h.do(t, "/v1/chat/completions", chatBody(user("remember me")), map[string]string{"X-Session-User": "h2"})
	r = h.do(t, "/v1/chat/completions", chatBody(user("ro")), map[string]string{"X-Session-User": "h2", "X-History": "read-only"})
	require.Equal(t, "2", r.Header.Get("X-History-Messages"))
	require.Len(t, h.stored(t, "api:h2:default"), 2)

	// An unknown X-History value is a 400.
	r = h.do(t, "/v1/chat/completions", chatBody(user("ro")), map[string]string{"X-Session-User": "h2", "X-History": "sometimes"})
	require.Equal(t, http.StatusBadRequest, r.StatusCode)

	// Agent mode off.
	h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-ID": "c:h3:quiet"})
	_, ok, err = h.store.Session(ctx, "c:h3:quiet")
	require.NoError(t, err)
	require.False(t, ok)

	// Shared: two users, one conversation.
	h.do(t, "/v1/chat/completions", chatBody(user("from alice")), map[string]string{"X-Session-ID": "c:alice:room"})
	r = h.do(t, "/v1/chat/completions", chatBody(user("from bob")), map[string]string{"X-Session-ID": "c:bob:room"})
	require.Equal(t, "c:bob:room", r.Header.Get("X-Session-ID"))
	require.Equal(t, "2", r.Header.Get("X-History-Messages"))
	stored := h.stored(t, "c:*:room")
	require.Len(t, stored, 4)
	require.Equal(t, "alice", stored[0].User)
	require.Equal(t, "bob", stored[2].User)
}

func TestStatelessWithoutUser(t *testing.T) {
	h := newHarness(t)
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), nil)
	require.Equal(t, http.StatusOK, r.StatusCode)
	require.Empty(t, r.Header.Get("X-Session-ID"))

	hr := newHarness(t, func(o *Options) { o.RequireSession = true })
	r = hr.do(t, "/v1/chat/completions", chatBody(user("x")), nil)
	require.Equal(t, http.StatusBadRequest, r.StatusCode)
	require.Contains(t, readAll(t, r), `"code":"missing_session"`)
	require.Empty(t, hr.up.Requests(), "nothing forwarded")
}

func TestBodyUserAndPathPrefix(t *testing.T) {
	h := newHarness(t)
	r := h.do(t, "/v1/chat/completions", `{"model":"m","user":"u-9","messages":[`+user("x")+`]}`, nil)
	require.Equal(t, "api:u-9:default", r.Header.Get("X-Session-ID"))
	r = h.do(t, "/s/web/p@x.io/sales/v1/chat/completions", chatBody(user("x")), nil)
	require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
	require.Equal(t, "web:p@x.io:sales", r.Header.Get("X-Session-ID"))
	require.Equal(t, "/v1/chat/completions", h.up.LastChat().Path)
	require.Len(t, h.stored(t, "web:p@x.io:sales"), 2)
}

func TestHeadersForwarding(t *testing.T) {
	h := newHarness(t)
	h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{
		"Authorization": "Bearer client-key", "X-Session-ID": "a:b:c", "X-History": "on", "X-Message-ID": "m1", "X-Custom": "kept"})
	got := h.up.LastChat().Header
	require.Equal(t, "Bearer client-key", got.Get("Authorization"), "the client's key passes by default")
	for _, name := range []string{"X-Session-ID", "X-History", "X-Message-ID"} {
		require.Empty(t, got.Get(name), name+" must not reach the upstream")
	}
	require.Equal(t, "kept", got.Get("X-Custom"))

	hk := newHarness(t, func(o *Options) { o.APIKey = "sk-proxy" })
	hk.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"Authorization": "Bearer client-key"})
	require.Equal(t, "Bearer sk-proxy", hk.up.LastChat().Header.Get("Authorization"))
}

func TestPassthrough(t *testing.T) {
	h := newHarness(t)
	req, _ := http.NewRequest(http.MethodGet, h.srv.URL+"/s/web/u1/a/v1/models", nil)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "web:u1:a", resp.Header.Get("X-Session-ID"))
	require.Contains(t, readAll(t, resp), `"object":"list"`)

	r := h.do(t, "/v1/embeddings", `{"model":"text-embedding-3-small","input":"hi"}`, nil)
	require.Equal(t, http.StatusOK, r.StatusCode)
	require.Equal(t, `{"model":"text-embedding-3-small","input":"hi"}`, string(h.up.Requests()[1].Body), "bodies pass unchanged")

	r = h.do(t, "/v1/nope", `{}`, nil)
	require.Equal(t, http.StatusNotFound, r.StatusCode, "the upstream's 404 is relayed")
}

func TestUpstreamErrorRelayedUnchangedAndNothingRecorded(t *testing.T) {
	h := newHarness(t)
	h.up.Enqueue(fakeai.Reply{Status: http.StatusTooManyRequests, ErrorMessage: "Rate limit reached", ErrorType: "requests", ErrorCode: "rate_limit_exceeded",
		Header: http.Header{"Retry-After": {"7"}}})
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-User": "e"})
	require.Equal(t, http.StatusTooManyRequests, r.StatusCode)
	require.Equal(t, "7", r.Header.Get("Retry-After"))
	body := readAll(t, r)
	require.Contains(t, body, `"code":"rate_limit_exceeded"`)
	require.Contains(t, body, "Rate limit reached")
	_, ok, err := h.store.Session(context.Background(), "api:e:default")
	require.NoError(t, err)
	require.False(t, ok, "an upstream error leaves history unchanged")
}

func TestUpstreamUnreachableAndTimeout(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL, _ := url.Parse(dead.URL + "/v1")
	dead.Close()
	h := newHarness(t, func(o *Options) { o.Upstream = deadURL })
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-User": "d"})
	require.Equal(t, http.StatusBadGateway, r.StatusCode)
	assertOpenAIError(t, readAll(t, r), "upstream_unreachable")

	ht := newHarness(t, func(o *Options) { o.UpstreamTimeout = 100 * time.Millisecond })
	ht.up.Enqueue(fakeai.Reply{HeaderDelay: 5 * time.Second})
	r = ht.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-User": "d"})
	require.Equal(t, http.StatusGatewayTimeout, r.StatusCode)
	assertOpenAIError(t, readAll(t, r), "upstream_timeout")
	_, ok, _ := ht.store.Session(context.Background(), "api:d:default")
	require.False(t, ok)
}

func assertOpenAIError(t *testing.T, body, code string) {
	t.Helper()
	var e struct {
		Error *struct {
			Message string  `json:"message"`
			Type    string  `json:"type"`
			Code    *string `json:"code"`
		} `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &e), body)
	require.NotNil(t, e.Error, body)
	// OpenAI's shape has all four keys, param null when no field is at
	// fault; SDKs read a missing one as undefined.
	var keys struct {
		Error map[string]json.RawMessage `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &keys))
	for _, k := range []string{"message", "type", "param", "code"} {
		require.Contains(t, keys.Error, k, "error body lacks %q: %s", k, body)
	}
	require.NotEmpty(t, e.Error.Message)
	require.NotEmpty(t, e.Error.Type)
	require.NotNil(t, e.Error.Code)
	require.Equal(t, code, *e.Error.Code)
}

func TestClientDisconnectCancelsUpstreamAndKeepsIncomplete(t *testing.T) {
	h := newHarness(t)
	gate := make(chan struct{})
	defer close(gate)
	h.up.Enqueue(fakeai.Reply{Content: "partial answer that never ends", Gate: gate, GateAfter: 3})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o","stream":true,"messages":[`+user("go")+`]}`))
	req.Header.Set("X-Session-User", "gone")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	br := bufio.NewReader(resp.Body)
	for n := 0; n < 3; {
		line, err := br.ReadString('\n')
		require.NoError(t, err)
		if strings.HasPrefix(line, "data: ") {
			n++
		}
	}
	cancel()
	resp.Body.Close()
	require.Eventually(t, func() bool {
		msgs, _ := h.store.Messages(context.Background(), "api:gone:default", "")
		return len(msgs) == 2
	}, 5*time.Second, 10*time.Millisecond)
	msgs := h.stored(t, "api:gone:default")
	require.Equal(t, history.StatusIncomplete, msgs[1].Status)
	require.Equal(t, "partial answer", msgs[1].Content, "what was generated is kept")
}

func TestGzipClientStillRecorded(t *testing.T) {
	h := newHarness(t)
	req, _ := http.NewRequest(http.MethodPost, h.srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user("zip"))))
	req.Header.Set("Accept-Encoding", "gzip")
	req.Header.Set("X-Session-User", "gz")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "identity", h.up.LastChat().Header.Get("Accept-Encoding"))
	msgs := h.stored(t, "api:gz:default")
	require.Len(t, msgs, 2)
	require.Equal(t, "echo: zip [messages=1]", msgs[1].Content)
}

func TestIdempotentRetry(t *testing.T) {
	h := newHarness(t)
	hdr := map[string]string{"X-Session-User": "idem", "Idempotency-Key": "k-1"}
	h.do(t, "/v1/chat/completions", chatBody(user("once")), hdr)
	h.do(t, "/v1/chat/completions", chatBody(user("once")), hdr)
	require.Len(t, h.stored(t, "api:idem:default"), 2, "a retry with the same key records nothing new")
	hdr["Idempotency-Key"] = "k-2"
	h.do(t, "/v1/chat/completions", chatBody(user("twice")), hdr)
	require.Len(t, h.stored(t, "api:idem:default"), 4)
}

func TestBadInputIsRejectedAndNothingForwarded(t *testing.T) {
	cases := []struct {
		name, path, body string
		hdr              map[string]string
		status           int
		code             string
	}{
		{name: "malformed JSON", body: `{"model":`, status: 400, code: "invalid_json"},
		{name: "not an object", body: `[1,2]`, status: 400, code: "invalid_json"},
		{name: "messages missing", body: `{"model":"m"}`, status: 400, code: "missing_required_parameter"},
		{name: "messages wrong type", body: `{"model":"m","messages":"hi"}`, status: 400, code: "invalid_type"},
		{name: "messages empty", body: `{"model":"m","messages":[]}`, status: 400, code: "empty_array"},
		{name: "message not an object", body: `{"model":"m","messages":[1]}`, status: 400, code: "invalid_type"},
		{name: "unknown role", body: `{"model":"m","messages":[{"role":"wizard","content":"x"}]}`, status: 400, code: "invalid_value"},
		{name: "missing role", body: `{"model":"m","messages":[{"content":"x"}]}`, status: 400, code: "missing_required_parameter"},
		{name: "content wrong type", body: `{"model":"m","messages":[{"role":"user","content":42}]}`, status: 400, code: "invalid_type"},
		{name: "content object", body: `{"model":"m","messages":[{"role":"user","content":{"a":1}}]}`, status: 400, code: "invalid_type"},
		{name: "user content missing", body: `{"model":"m","messages":[{"role":"user"}]}`, status: 400, code: "missing_required_parameter"},
		{name: "part without type", body: `{"model":"m","messages":[{"role":"user","content":[{"text":"x"}]}]}`, status: 400, code: "missing_required_parameter"},
		{name: "model wrong type", body: `{"model":5,"messages":[{"role":"user","content":"x"}]}`, status: 400, code: "invalid_type"},
		{name: "stream wrong type", body: `{"model":"m","stream":"yes","messages":[{"role":"user","content":"x"}]}`, status: 400, code: "invalid_type"},
		{name: "invalid UTF-8", body: "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}", status: 400, code: "invalid_request_body"},
		{name: "too large", body: `{"model":"m","messages":[{"role":"user","content":"` + strings.Repeat("a", 2<<20) + `"}]}`, status: 413, code: "request_too_large"},
		{name: "bad session id", body: chatBody(user("x")), hdr: map[string]string{"X-Session-ID": "a:b c:d"}, status: 400, code: "invalid_session_id"},
		{name: "bad body user", body: `{"model":"m","user":"a:b","messages":[{"role":"user","content":"x"}]}`, hdr: map[string]string{}, status: 400, code: "invalid_session_id"},
		{name: "bad path session", path: "/s/web/a%20b/x/v1/chat/completions", body: chatBody(user("x")), status: 400, code: "invalid_session_id"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(o *Options) { o.MaxBodyBytes = 1 << 20 })
			hdr := tc.hdr
			if hdr == nil {
				hdr = map[string]string{"X-Session-User": "bad"}
			}
			path := tc.path
			if path == "" {
				path = "/v1/chat/completions"
			}
			r := h.do(t, path, tc.body, hdr)
			require.Equal(t, tc.status, r.StatusCode)
			assertOpenAIError(t, readAll(t, r), tc.code)
			require.Empty(t, h.up.Requests(), "nothing is forwarded")
			_, ok, err := h.store.Session(context.Background(), "api:bad:default")
			require.NoError(t, err)
			require.False(t, ok, "nothing is recorded")
		})
	}
}

func TestContentPartsKeptAsSent(t *testing.T) {
	h := newHarness(t)
	parts := `[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"future_part","x":1}]`
	r := h.do(t, "/v1/chat/completions", chatBody(`{"role":"user","content":`+parts+`}`), map[string]string{"X-Session-User": "parts"})
	require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
	msgs := h.stored(t, "api:parts:default")
	require.JSONEq(t, parts, string(msgs[0].Parts))
	h.do(t, "/v1/chat/completions", chatBody(user("again")), map[string]string{"X-Session-User": "parts"})
	var sent struct {
		Messages []struct{ Content json.RawMessage } `json:"messages"`
	}
	require.NoError(t, json.Unmarshal(h.up.LastChat().Body, &sent))
	require.JSONEq(t, parts, string(sent.Messages[0].Content))
}

func TestBudgetFromContextWindow(t *testing.T) {
	// A model with a tiny context window leaves no room for history.
	h := newHarness(t, func(o *Options) {
		o.Catalog = tokens.NewCatalog(map[string]tokens.Model{"tiny-model": {ContextWindow: 60}})
	})
	hdr := map[string]string{"X-Session-User": "b"}
	body := `{"model":"tiny-model","max_tokens":45,"messages":[` + user("hello there") + `]}`
	h.do(t, "/v1/chat/completions", body, hdr)
	r := h.do(t, "/v1/chat/completions", body, hdr)
	require.Equal(t, "0", r.Header.Get("X-History-Messages"))
	// The same with room for it.
	body = `{"model":"tiny-model","max_tokens":1,"messages":[` + user("hello there") + `]}`
	r = h.do(t, "/v1/chat/completions", body, hdr)
	require.Equal(t, "4", r.Header.Get("X-History-Messages"), "both earlier turns fit")
}

func TestNonStreamNotJSONRelayedNotRecorded(t *testing.T) {
	h := newHarness(t)
	h.up.Enqueue(fakeai.Reply{Raw: []byte("<html>gateway says hi</html>")})
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-User": "nj"})
	require.Equal(t, http.StatusOK, r.StatusCode)
	require.Equal(t, "<html>gateway says hi</html>", readAll(t, r))
	_, ok, _ := h.store.Session(context.Background(), "api:nj:default")
	require.False(t, ok)
}

func TestStreamCutStoresIncomplete(t *testing.T) {
	h := newHarness(t)
	h.up.Enqueue(fakeai.Reply{Content: "alpha beta gamma delta", CutAfter: 3})
	r := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[`+user("x")+`]}`, map[string]string{"X-Session-User": "cut"})
	require.Equal(t, http.StatusOK, r.StatusCode)
	b, _ := io.ReadAll(r.Body) // ends early, with an error
	require.NotContains(t, string(b), "[DONE]")
	require.True(t, bytes.HasPrefix(b, []byte("data: ")), "the client gets what came")
	msgs := h.stored(t, "api:cut:default")
	require.Len(t, msgs, 2)
	require.Equal(t, history.StatusIncomplete, msgs[1].Status)
	require.NotEmpty(t, msgs[1].Content)
}

// TestBudgetCountsImageParts: a few bytes of image URL cost hundreds of
// tokens, so a small body with images still shrinks the history budget.
func TestBudgetCountsImageParts(t *testing.T) {
	h := newHarness(t, func(o *Options) {
		o.Catalog = tokens.NewCatalog(map[string]tokens.Model{"img-model": {ContextWindow: 5000}})
	})
	hdr := map[string]string{"X-Session-User": "img"}
	// About 1,500 tokens of history (the message and its echo): within the
	// agent's 4,000, but not within what five images leave of the window.
	h.do(t, "/v1/chat/completions", `{"model":"img-model","messages":[`+user(strings.Repeat("word ", 700))+`]}`, hdr)
	img := `{"type":"image_url","image_url":{"url":"https://x.io/a.png"}}`
	parts := `[` + strings.Repeat(img+",", 4) + img + `]` // 5 images: 3825 tokens by the counter
	r := h.do(t, "/v1/chat/completions", `{"model":"img-model","max_tokens":100,"messages":[{"role":"user","content":`+parts+`}]}`, hdr)
	require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
	require.Equal(t, "0", r.Header.Get("X-History-Messages"), "five images leave no room for the history in a 5000-token window")
	r = h.do(t, "/v1/chat/completions", `{"model":"img-model","max_tokens":100,"messages":[`+user("text only")+`]}`, hdr)
	require.NotEqual(t, "0", r.Header.Get("X-History-Messages"), "without the images the history fits")
}

// TestLongToolLoopKeepsTheCallBeforeItsResults: an agent loop of many tool
// round trips, each request sending only the tool results, outgrows the
// history window; the upstream must still get the call before its results
// (the fake upstream, like the API, answers 400 otherwise).
func TestLongToolLoopKeepsTheCallBeforeItsResults(t *testing.T) {
	h := newHarness(t, func(o *Options) {
		o.Agent = func(string) Agent {
			return Agent{Mode: ModePerUser, MaxTokens: 4000, MaxMessages: 6, OutputReserve: 1024}
		}
	})
	sid := map[string]string{"X-Session-ID": "app:loop:agent"}
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_0", Name: "step", Arguments: `{"n":0}`}}})
	r := h.do(t, "/v1/chat/completions", chatBody(user("run the job")), sid)
	require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
	for i := 0; i < 8; i++ {
		h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: fmt.Sprintf("call_%d", i+1), Name: "step", Arguments: fmt.Sprintf(`{"n":%d}`, i+1)}}})
		body := chatBody(fmt.Sprintf(`{"role":"tool","tool_call_id":"call_%d","content":"ok %d"}`, i, i))
		r := h.do(t, "/v1/chat/completions", body, sid)
		require.Equal(t, http.StatusOK, r.StatusCode, "round %d: %s", i, readAll(t, r))
		got := h.up.LastChat().Chat.Messages
		last := got[len(got)-1]
		require.Equal(t, "tool", last["role"])
		prev := got[len(got)-2]
		require.Equal(t, "assistant", prev["role"], "round %d: the call precedes its result", i)
		require.LessOrEqual(t, len(got)-1, 6, "round %d: the window bounds what is injected", i)
	}
}

func TestPassthroughKeepsEscapedPath(t *testing.T) {
	var got []string
	var mu sync.Mutex
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.URL.EscapedPath())
		mu.Unlock()
	}))
	defer up.Close()
	u, _ := url.Parse(up.URL + "/v1")
	h := newHarness(t, func(o *Options) { o.Upstream = u })
	// An id holding "?" or "#" must stay one escaped segment: decoded, it
	// would end the path. (An encoded slash is refused: see route_test.go.)
	for _, path := range []string{"/v1/files/abc%3Fdef%23x/content", "/s/web/u1/a/v1/files/abc%3Fdef%23x/content"} {
		resp, err := http.Get(h.srv.URL + path)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, path)
	}
	require.Equal(t, []string{"/v1/files/abc%3Fdef%23x/content", "/v1/files/abc%3Fdef%23x/content"}, got)
}

func TestRetryWithSameKeyStillCountsUsage(t *testing.T) {
	h := newHarness(t)
	hdr := map[string]string{"X-Session-User": "bill", "Idempotency-Key": "k-1"}
	h.up.Enqueue(fakeai.Reply{Content: "one", Usage: &fakeai.Usage{PromptTokens: 10, CompletionTokens: 2}})
	h.up.Enqueue(fakeai.Reply{Content: "one", Usage: &fakeai.Usage{PromptTokens: 10, CompletionTokens: 2}})
	h.do(t, "/v1/chat/completions", chatBody(user("q")), hdr)
	h.do(t, "/v1/chat/completions", chatBody(user("q")), hdr)
	s, _, err := h.store.Session(context.Background(), "api:bill:default")
	require.NoError(t, err)
	require.EqualValues(t, 2, s.Totals.Requests, "both upstream calls are billed")
	require.EqualValues(t, 20, s.Totals.PromptTokens)
	require.EqualValues(t, 2, s.MessageCount, "the turn is stored once")
}

func TestSessionHeaderOnEarlyErrorsAndNeverForwarded(t *testing.T) {
	h := newHarness(t)
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-User": "e1", "X-History": "maybe"})
	require.Equal(t, http.StatusBadRequest, r.StatusCode)
	require.Equal(t, "api:e1:default", r.Header.Get("X-Session-ID"), "the resolved id comes back with the error")

	h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{
		"X-Session-Channel": "c", "X-Session-User": "u", "X-Session-Agent": "a"})
	for _, name := range []string{"X-Session-Channel", "X-Session-User", "X-Session-Agent"} {
		require.Empty(t, h.up.LastChat().Header.Get(name), name+" must not reach the upstream")
	}
}

// TestClientDisconnectCancelsUpstreamRequest: on the chat path and on a
// pass-through path, a client that goes away ends the upstream request.
func TestClientDisconnectCancelsUpstreamRequest(t *testing.T) {
	for _, path := range []string{"/v1/chat/completions", "/v1/responses"} {
		t.Run(path, func(t *testing.T) {
			started, canceled := make(chan struct{}), make(chan struct{})
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				// Read the body first: only then does the server watch the
				// connection and cancel the context when it closes.
				_, _ = io.ReadAll(r.Body)
				close(started)
				select {
				case <-r.Context().Done():
					close(canceled)
				case <-time.After(10 * time.Second):
				}
			}))
			defer up.Close()
			u, _ := url.Parse(up.URL + "/v1")
			h := newHarness(t, func(o *Options) { o.Upstream = u })
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+path, strings.NewReader(chatBody(user("x"))))
			done := make(chan struct{})
			go func() {
				defer close(done)
				if resp, err := http.DefaultClient.Do(req); err == nil {
					resp.Body.Close()
				}
			}()
			<-started
			cancel()
			select {
			case <-canceled:
			case <-time.After(5 * time.Second):
				t.Fatal("the upstream request was not canceled")
			}
			<-done
		})
	}
}

func TestUpstreamErrorBodyAndHeadersRelayedByteForByte(t *testing.T) {
	h := newHarness(t)
	raw := []byte(`{"error":{"message":"You exceeded your current quota.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}` + "\n")
	h.up.Enqueue(fakeai.Reply{Status: http.StatusTooManyRequests, Raw: raw,
		Header: http.Header{"Retry-After": {"20"}, "X-Ratelimit-Remaining-Requests": {"0"}}})
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-User": "q"})
	require.Equal(t, http.StatusTooManyRequests, r.StatusCode)
	require.Equal(t, string(raw), readAll(t, r))
	require.Equal(t, "20", r.Header.Get("Retry-After"))
	require.Equal(t, "0", r.Header.Get("X-Ratelimit-Remaining-Requests"))
	require.Equal(t, "application/json", r.Header.Get("Content-Type"))
}

// TestGzipReplyDespiteIdentityIsRecorded: an upstream that compresses
// although asked for identity is relayed as it came and still recorded.
func TestGzipReplyDespiteIdentityIsRecorded(t *testing.T) {
	reply := `{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"zipped hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}`
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	_, _ = zw.Write([]byte(reply))
	require.NoError(t, zw.Close())
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Encoding", "gzip")
		_, _ = w.Write(zipped.Bytes())
	}))
	defer up.Close()
	u, _ := url.Parse(up.URL + "/v1")
	h := newHarness(t, func(o *Options) { o.Upstream = u })
	req, _ := http.NewRequest(http.MethodPost, h.srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user("zip?"))))
	req.Header.Set("X-Session-User", "gz2")
	req.Header.Set("Accept-Encoding", "gzip") // read the raw bytes, no transparent decoding
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	require.Equal(t, zipped.Bytes(), got, "the client gets the upstream's bytes")
	msgs := h.stored(t, "api:gz2:default")
	require.Len(t, msgs, 2)
	require.Equal(t, "zipped hello", msgs[1].Content)
}

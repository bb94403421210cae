package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/tokens"
)

// The tests in this file run the proxy over HTTP against each history
// store: memory, a standalone Redis and a 3-master Redis Cluster. Each
// backend is started once, in TestStoreEndToEnd/<backend>, and every
// scenario is a subtest of it with its own key prefix, so a run starts one
// redis-server and one Cluster in all.

// e2eStore is what the scenarios need of a store: the proxy's Store and the
// read side they check it with.
type e2eStore interface {
	Store
	Session(ctx context.Context, session string) (history.Session, bool, error)
	Messages(ctx context.Context, session, conversationID string) ([]history.Message, error)
	Conversations(ctx context.Context, session string) ([]history.Conversation, error)
}

// e2eBackend opens stores on one backend.
type e2eBackend struct {
	// open returns a new store, with its own client, whose keys are under
	// prefix; on a shared backend two stores opened with the same prefix
	// see the same data, as two proxy processes on one Redis do.
	open   func(t *testing.T, prefix string) e2eStore
	shared bool
}

var e2eScenarios = []struct {
	name string
	run  func(t *testing.T, b e2eBackend)
}{
	{"multi_turn", testE2EMultiTurn},
	{"tool_calls", testE2EToolCalls},
	{"concurrent_turns", testE2EConcurrentTurns},
	{"scale_out", testE2EScaleOut},
	{"idle_timeout", testE2EIdleTimeout},
	{"idle_timeout_crossed_mid_reply", testE2EIdleCrossedMidReply},
	{"shared_call_answered_after_others", testE2ESharedCallAnsweredLater},
	{"reused_tool_call_ids", testE2EReusedToolCallIDs},
	{"tool_results_after_idle_timeout", testE2EToolResultsAfterIdle},
	{"retried_request_same_context", testE2ERetriedRequestSameContext},
	{"answered_call_larger_than_budget", testE2EAnsweredCallLargerThanBudget},
}

func TestStoreEndToEnd(t *testing.T) {
	backends := []struct {
		name  string
		start func(t *testing.T) e2eBackend
	}{
		{"memory", func(*testing.T) e2eBackend {
			return e2eBackend{open: func(*testing.T, string) e2eStore { return history.NewMemory() }}
		}},
		{"redis", func(t *testing.T) e2eBackend {
			srv := redistest.Start(t)
			return e2eBackend{shared: true, open: func(t *testing.T, prefix string) e2eStore {
				return history.NewRedis(srv.Client(t), prefix)
			}}
		}},
		{"cluster", func(t *testing.T) e2eBackend {
			c := redistest.StartCluster(t)
			return e2eBackend{shared: true, open: func(t *testing.T, prefix string) e2eStore {
				return history.NewRedis(c.Client(t), prefix)
			}}
		}},
	}
	for _, bc := range backends {
		t.Run(bc.name, func(t *testing.T) {
			b := bc.start(t)
			for _, sc := range e2eScenarios {
				t.Run(sc.name, func(t *testing.T) { sc.run(t, b) })
			}
		})
	}
}

// e2eHarness is one fake upstream behind one or more proxies, each with
// its own store on the same backend; store is the first one.
type e2eHarness struct {
	up      *fakeai.Server
	store   e2eStore
	servers []*httptest.Server
	client  *http.Client
}

func newE2EHarness(t *testing.T, b e2eBackend, proxies int, mod func(*Options)) *e2eHarness {
	t.Helper()
	h := &e2eHarness{up: fakeai.New(t)}
	u, err := url.Parse(h.up.URL)
	require.NoError(t, err)
	prefix := "e2e-" + strings.ReplaceAll(t.Name(), "/", "-")
	for i := 0; i < proxies; i++ {
		st := b.open(t, prefix)
		if i == 0 {
			h.store = st
		}
		opt := Options{
			Upstream: u, Store: st, Counter: sharedCounter, Catalog: tokens.NewCatalog(nil), Agent: defaultAgent,
			DefaultChannel: "api", DefaultAgent: "default",
			// Generous: these tests are about what is stored, not about
			// latency under -race on a loaded machine.
			StoreTimeout: 10 * time.Second,
		}
		if mod != nil {
			mod(&opt)
		}
		px, err := New(opt)
		require.NoError(t, err)
		srv := httptest.NewServer(px.Handler())
		t.Cleanup(srv.Close)
		h.servers = append(h.servers, srv)
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 128}
	t.Cleanup(tr.CloseIdleConnections)
	h.client = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	return h
}

// e2eResponse is a proxy's answer, read whole.
type e2eResponse struct {
	status int
	header http.Header
	body   string
}

// post sends a chat completion to proxy i. It does not fail the test, so
// that it may be called from other goroutines.
func (h *e2eHarness) post(i int, session, body string) (e2eResponse, error) {
	return h.postWith(i, session, body, nil)
}

// postWith is post with extra request headers.
func (h *e2eHarness) postWith(i int, session, body string, hdr map[string]string) (e2eResponse, error) {
	req, err := http.NewRequest(http.MethodPost, h.servers[i].URL+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		return e2eResponse{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Session-ID", session)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return e2eResponse{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return e2eResponse{}, fmt.Errorf("read reply: %w", err)
	}
	return e2eResponse{status: resp.StatusCode, header: resp.Header, body: string(b)}, nil
}

// turn posts to proxy i and requires a 200.
func (h *e2eHarness) turn(t *testing.T, i int, session, body string) e2eResponse {
	t.Helper()
	r, err := h.post(i, session, body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.status, "got status %d, want 200: %s", r.status, r.body)
	return r
}

func (h *e2eHarness) messages(t *testing.T, session, conv string) []history.Message {
	t.Helper()
	msgs, err := h.store.Messages(context.Background(), session, conv)
	require.NoError(t, err)
	return msgs
}

func (h *e2eHarness) conversations(t *testing.T, session string) []string {
	t.Helper()
	convs, err := h.store.Conversations(context.Background(), session)
	require.NoError(t, err)
	var ids []string
	for _, c := range convs {
		ids = append(ids, c.ID)
	}
	return ids
}

// wireLines shows messages as the upstream got them, one "role: content"
// line each (content null shows as <nil>).
func wireLines(msgs []map[string]any) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = fmt.Sprintf("%v: %v", m["role"], m["content"])
	}
	return out
}

// storedLines shows stored messages in the same form as wireLines.
func storedLines(msgs []history.Message) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		c := any(m.Content)
		if m.ContentNull {
			c = nil
		}
		out[i] = fmt.Sprintf("%s: %v", m.Role, c)
	}
	return out
}

func testE2EMultiTurn(t *testing.T, b e2eBackend) {
	h := newE2EHarness(t, b, 1, nil)
	const sid = "web:ann:e2e"
	sys := `{"role":"system","content":"be brief"}`
	questions := []string{"My name is Ann", "I live in Oslo", "What do you know about me?"}
	for i, q := range questions {
		r := h.turn(t, 0, sid, chatBody(sys, user(q)))
		require.Equal(t, sid, r.header.Get("X-Session-ID"))
		require.Equal(t, strconv.Itoa(2*i), r.header.Get("X-History-Messages"), "turn %d injects every earlier message", i+1)
	}

	want := []string{
		"system: be brief",
		"user: My name is Ann",
		"assistant: echo: My name is Ann [messages=2]",
		"user: I live in Oslo",
		"assistant: echo: I live in Oslo [messages=4]",
		"user: What do you know about me?",
	}
	require.Equal(t, want, wireLines(h.up.LastChat().Chat.Messages), "the third request carries both earlier turns, in order, after the system message")

	stored := h.messages(t, sid, "")
	require.Len(t, stored, 6, "three turns of user + assistant; the system message is not recorded")
	require.Equal(t, append(want[1:], "assistant: echo: What do you know about me? [messages=6]"), storedLines(stored))
	for i, m := range stored {
		require.Equal(t, history.KindMessage, m.Kind, "message %d", i)
		require.Equal(t, history.StatusComplete, m.Status, "message %d", i)
		require.Equal(t, "ann", m.User, "message %d", i)
		require.Positive(t, m.Tokens, "message %d", i)
		require.NotEmpty(t, m.ID, "message %d has an id", i)
	}
	require.Equal(t, []string{"c1"}, h.conversations(t, sid))

	s, ok, err := h.store.Session(context.Background(), sid)
	require.NoError(t, err)
	require.True(t, ok)
	require.EqualValues(t, 3, s.Totals.Requests)
	require.EqualValues(t, 6, s.MessageCount)
}

func testE2EToolCalls(t *testing.T, b e2eBackend) {
	h := newE2EHarness(t, b, 1, nil)
	const sid = "app:u1:tools"
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{
		{ID: "call_a", Name: "get_weather", Arguments: `{"city":"Paris"}`},
		{ID: "call_b", Name: "get_time", Arguments: `{"tz":"Europe/Paris"}`},
	}})

	// 1. A streamed reply that calls two tools at once.
	r1 := h.turn(t, 0, sid, `{"model":"gpt-4o","stream":true,"messages":[`+user("weather and time in Paris?")+`]}`)
	events := sseEvents(t, strings.NewReader(r1.body))
	require.NotEmpty(t, events)
	require.Equal(t, "[DONE]", events[len(events)-1])

	// 2. The app sends back only the two results.
	h.turn(t, 0, sid, `{"model":"gpt-4o","messages":[`+
		`{"role":"tool","tool_call_id":"call_a","content":"18C"},`+
		`{"role":"tool","tool_call_id":"call_b","content":"14:00"}]}`)
	require.Equal(t, []string{"user", "assistant", "tool", "tool"}, roles(h.up.LastChat().Chat.Messages))

	// 3. A new question: the whole tool exchange comes before it.
	h.turn(t, 0, sid, chatBody(user("thanks")))
	got := h.up.LastChat().Chat.Messages
	require.Equal(t, []string{"user", "assistant", "tool", "tool", "assistant", "user"}, roles(got))
	require.Equal(t, []string{
		"user: weather and time in Paris?",
		"assistant: <nil>",
		"tool: 18C",
		"tool: 14:00",
		"assistant: echo: weather and time in Paris? [messages=4]",
		"user: thanks",
	}, wireLines(got))
	require.Contains(t, got[1], "content", "an assistant message that only calls tools is sent with content null, not without content")
	var calls []struct {
		ID       string `json:"id"`
		Type     string `json:"type"`
		Function struct {
			Name      string `json:"name"`
			Arguments string `json:"arguments"`
		} `json:"function"`
	}
	raw, err := json.Marshal(got[1]["tool_calls"])
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(raw, &calls))
	require.Len(t, calls, 2)
	require.Equal(t, "call_a", calls[0].ID)
	require.Equal(t, "function", calls[0].Type)
	require.Equal(t, "get_weather", calls[0].Function.Name)
	require.Equal(t, `{"city":"Paris"}`, calls[0].Function.Arguments, "argument fragments reassembled")
	require.Equal(t, "call_b", calls[1].ID)
	require.Equal(t, `{"tz":"Europe/Paris"}`, calls[1].Function.Arguments)
	require.Equal(t, "call_a", got[2]["tool_call_id"])
	require.Equal(t, "call_b", got[3]["tool_call_id"])

	stored := h.messages(t, sid, "")
	kinds := make([]string, len(stored))
	for i, m := range stored {
		kinds[i] = m.Role + "/" + m.Kind
	}
	require.Equal(t, []string{
		"user/" + history.KindMessage,
		"assistant/" + history.KindToolCall,
		"tool/" + history.KindToolResult,
		"tool/" + history.KindToolResult,
		"assistant/" + history.KindMessage,
		"user/" + history.KindMessage,
		"assistant/" + history.KindMessage,
	}, kinds)
	require.True(t, stored[1].ContentNull, "the tool-call message keeps content null")
	require.Equal(t, []string{"call_a", "call_b"}, history.ToolCallIDs(stored[1].ToolCalls))
	require.Equal(t, "call_a", stored[2].ToolCallID)
	require.Equal(t, "call_b", stored[3].ToolCallID)
	for i, m := range stored {
		require.Equal(t, history.StatusComplete, m.Status, "message %d", i)
	}
}

// reReply answers "re: <last user message>" whatever the history, so that
// replies do not depend on the order concurrent turns are stored in.
func reReply(req fakeai.ChatRequest) fakeai.Reply {
	for i := len(req.Messages) - 1; i >= 0; i-- {
		if req.Messages[i]["role"] == "user" {
			return fakeai.Reply{Content: fmt.Sprintf("re: %v", req.Messages[i]["content"])}
		}
	}
	return fakeai.Reply{Content: "re: ?"}
}

func testE2EConcurrentTurns(t *testing.T, b e2eBackend) {
	h := newE2EHarness(t, b, 1, nil)
	h.up.SetDefault(reReply)
	const sid = "web:crowd:e2e"
	const n = 100

	type result struct {
		status int
		body   string
		err    error
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Go(func() {
			r, err := h.post(0, sid, chatBody(user(fmt.Sprintf("m%d", i))))
			results[i] = result{r.status, r.body, err}
		})
	}
	wg.Wait()
	for i, r := range results {
		require.NoError(t, r.err, "turn m%d", i)
		require.Equal(t, http.StatusOK, r.status, "turn m%d: got status %d, want 200: %s", i, r.status, r.body)
		require.Contains(t, r.body, fmt.Sprintf(`"content":"re: m%d"`, i), "turn m%d got another turn's reply", i)
	}

	stored := h.messages(t, sid, "")
	require.Equal(t, 2*n, len(stored), "got %d messages, want %d: every turn stored once", len(stored), 2*n)
	seen := map[string]bool{}
	for i := 0; i < len(stored); i += 2 {
		u, a := stored[i], stored[i+1]
		require.Equal(t, history.RoleUser, u.Role, "message %d: got %s, want a user message starting a turn", i, u.Role)
		require.Equal(t, history.RoleAssistant, a.Role, "message %d: got %s, want the reply to %q", i+1, a.Role, u.Content)
		require.Equal(t, "re: "+u.Content, a.Content, "message %d: got %q, want the reply right after its question %q", i+1, a.Content, u.Content)
		require.False(t, seen[u.Content], "%s stored twice", u.Content)
		seen[u.Content] = true
	}
	for i := 0; i < n; i++ {
		require.True(t, seen[fmt.Sprintf("m%d", i)], "turn m%d lost", i)
	}
	require.Equal(t, []string{"c1"}, h.conversations(t, sid), "concurrent turns stay in one conversation")
	s, ok, err := h.store.Session(context.Background(), sid)
	require.NoError(t, err)
	require.True(t, ok)
	require.EqualValues(t, n, s.Totals.Requests)
	require.EqualValues(t, 2*n, s.MessageCount)

	// Every request upstream carried whole earlier turns (never a question
	// without its reply) and ended with its own question.
	reqs := h.up.Requests()
	require.Len(t, reqs, n)
	for k, r := range reqs {
		msgs := r.Chat.Messages
		require.NotEmpty(t, msgs)
		require.Equal(t, 1, len(msgs)%2, "request %d: got %d messages, want pairs plus the new question", k, len(msgs))
		for i := 0; i+1 < len(msgs); i += 2 {
			require.Equal(t, "user", msgs[i]["role"], "request %d message %d", k, i)
			require.Equal(t, "assistant", msgs[i+1]["role"], "request %d message %d", k, i+1)
			require.Equal(t, fmt.Sprintf("re: %v", msgs[i]["content"]), msgs[i+1]["content"], "request %d message %d", k, i+1)
		}
		require.Equal(t, "user", msgs[len(msgs)-1]["role"], "request %d", k)
	}
}

func testE2EScaleOut(t *testing.T, b e2eBackend) {
	if !b.shared {
		t.Skip("a memory store belongs to one process: nothing to scale out")
	}
	h := newE2EHarness(t, b, 2, nil)
	const sid = "web:bob:e2e"
	var want []string
	for k := 1; k <= 6; k++ {
		q := fmt.Sprintf("turn %d", k)
		r := h.turn(t, (k-1)%2, sid, chatBody(user(q)))
		require.Equal(t, strconv.Itoa(2*(k-1)), r.header.Get("X-History-Messages"),
			"turn %d on proxy %d: it must see what the other proxy stored", k, (k-1)%2)
		if k == 6 {
			require.Len(t, want, 10)
			require.Equal(t, append(want[:10:10], "user: "+q), wireLines(h.up.LastChat().Chat.Messages),
				"the 6th request carries all 10 earlier messages in order")
		}
		want = append(want, "user: "+q, fmt.Sprintf("assistant: echo: %s [messages=%d]", q, 2*k-1))
	}
	reqs := h.up.Requests()
	require.Len(t, reqs, 6)

	stored := h.messages(t, sid, "")
	require.Len(t, stored, 12)
	require.Equal(t, want, storedLines(stored))
	require.Equal(t, []string{"c1"}, h.conversations(t, sid))
}

// e2eClock is a clock a test moves by hand.
type e2eClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *e2eClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *e2eClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func testE2EIdleTimeout(t *testing.T, b e2eBackend) {
	const idle = 10 * time.Minute
	clock := &e2eClock{now: time.UnixMilli(1_700_000_000_000)}
	h := newE2EHarness(t, b, 1, func(o *Options) {
		o.Now = clock.Now
		o.Agent = func(name string) Agent {
			a := defaultAgent(name)
			a.Policy.IdleTimeout = idle
			return a
		}
	})
	const sid = "web:cat:e2e"

	h.turn(t, 0, sid, chatBody(user("first")))
	// Exactly the timeout is not more than it: the conversation goes on.
	clock.Advance(idle)
	r := h.turn(t, 0, sid, chatBody(user("second")))
	require.Equal(t, "2", r.header.Get("X-History-Messages"), "at exactly the idle timeout the conversation is still active")
	require.Len(t, h.up.LastChat().Chat.Messages, 3)
	require.Equal(t, []string{"c1"}, h.conversations(t, sid))

	// One millisecond more and it is idle: nothing injected, a new one.
	clock.Advance(idle + time.Millisecond)
	r = h.turn(t, 0, sid, chatBody(user("third")))
	require.Equal(t, "0", r.header.Get("X-History-Messages"), "an idle conversation is not injected")
	require.Equal(t, []string{"user: third"}, wireLines(h.up.LastChat().Chat.Messages))
	require.Equal(t, []string{"c1", "c2"}, h.conversations(t, sid), "the idle conversation is kept and a new one started")

	require.Equal(t, []string{
		"user: first", "assistant: echo: first [messages=1]",
		"user: second", "assistant: echo: second [messages=3]",
	}, storedLines(h.messages(t, sid, "c1")), "c1 is kept whole")
	require.Equal(t, []string{"user: third", "assistant: echo: third [messages=1]"}, storedLines(h.messages(t, sid, "")),
		"the active conversation is c2")

	// The next turn, within the timeout, continues c2 only.
	clock.Advance(time.Minute)
	h.turn(t, 0, sid, chatBody(user("fourth")))
	require.Equal(t, []string{"user: third", "assistant: echo: third [messages=1]", "user: fourth"},
		wireLines(h.up.LastChat().Chat.Messages))
	require.Equal(t, []string{"c1", "c2"}, h.conversations(t, sid))
	require.Len(t, h.messages(t, sid, "c2"), 4)

	s, ok, err := h.store.Session(context.Background(), sid)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, "c2", s.ConversationID)
	require.Equal(t, clock.Now().UnixMilli(), s.LastActiveMs, "last activity is the proxy's clock")
	require.EqualValues(t, 8, s.MessageCount)
}

// testE2EIdleCrossedMidReply: a request that found the conversation active
// belongs to it, even when its reply ends after the idle timeout.
func testE2EIdleCrossedMidReply(t *testing.T, b e2eBackend) {
	const idle = 2 * time.Second
	clock := &e2eClock{now: time.UnixMilli(1_700_000_000_000)}
	h := newE2EHarness(t, b, 1, func(o *Options) {
		o.Now = clock.Now
		o.Agent = func(name string) Agent {
			a := defaultAgent(name)
			a.Policy.IdleTimeout = idle
			return a
		}
	})
	const sid = "web:dan:e2e"
	h.turn(t, 0, sid, chatBody(user("first")))

	// Sent 1.2 s later; the upstream holds the reply until the clock has
	// passed the timeout.
	clock.Advance(1200 * time.Millisecond)
	gate, open := newGate(t)
	defer open() // before the cleanups: a body still being read blocks its Close
	h.up.Enqueue(fakeai.Reply{Content: "slow answer", Gate: gate})
	req, err := http.NewRequest(http.MethodPost, h.servers[0].URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o","stream":true,"messages":[`+user("second")+`]}`))
	require.NoError(t, err)
	req.Header.Set("X-Session-ID", sid)
	resp, err := h.client.Do(req) // the headers: the history was read
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, "2", resp.Header.Get("X-History-Messages"))
	clock.Advance(3 * time.Second)
	open()
	_, err = io.ReadAll(resp.Body)
	require.NoError(t, err)

	require.Equal(t, []string{"c1"}, h.conversations(t, sid), "the slow turn stays in the conversation it was answered from")
	clock.Advance(time.Second)
	h.turn(t, 0, sid, chatBody(user("third")))
	require.Equal(t, []string{
		"user: first", "assistant: echo: first [messages=1]",
		"user: second", "assistant: slow answer",
		"user: third",
	}, wireLines(h.up.LastChat().Chat.Messages), "the next request keeps the earlier context")
}

// toolResult is a tool message answering id.
func toolResult(id, content string) string {
	return `{"role":"tool","tool_call_id":` + jsonString(id) + `,"content":` + jsonString(content) + `}`
}

// testE2ESharedCallAnsweredLater: in a shared conversation, Bob speaks
// between Alice's tool call and her tool results. The call (with Alice's
// question) goes just before her results; a retry of her results with the
// same key gets the very same context; later requests see every exchange
// whole.
func testE2ESharedCallAnsweredLater(t *testing.T, b e2eBackend) {
	h := newE2EHarness(t, b, 1, func(o *Options) {
		o.Agent = func(name string) Agent {
			a := defaultAgent(name)
			a.Mode = ModeShared
			return a
		}
	})
	const alice, bob = "team:alice:helper", "team:bob:helper"
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_w", Name: "weather", Arguments: `{"city":"Oslo"}`}}})
	h.turn(t, 0, alice, chatBody(user("weather in Oslo?")))
	h.turn(t, 0, bob, chatBody(user("hello everyone")))

	results := chatBody(toolResult("call_w", "-3C"))
	key := map[string]string{"Idempotency-Key": "alice-results-1"}
	r, err := h.postWith(0, alice, results, key)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.status, "the upstream accepts the injected history: %s", r.body)
	want := []string{
		"user: hello everyone",
		"assistant: echo: hello everyone [messages=2]",
		"user: weather in Oslo?",
		"assistant: <nil>",
		"tool: -3C",
	}
	first := h.up.LastChat().Chat.Messages
	require.Equal(t, want, wireLines(first), "the answered call and its question come right before the results")

	// The same request again, after the first was recorded: the same
	// context, nothing stored twice.
	r, err = h.postWith(0, alice, results, key)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.status, r.body)
	require.Equal(t, first, h.up.LastChat().Chat.Messages, "a retried request gets the context its first attempt had")

	// Bob again: every exchange whole, each call right before its results.
	h.turn(t, 0, bob, chatBody(user("and now?")))
	require.Equal(t, []string{
		"user: hello everyone",
		"assistant: echo: hello everyone [messages=2]",
		"user: weather in Oslo?",
		"assistant: <nil>",
		"tool: -3C",
		"assistant: echo: weather in Oslo? [messages=5]",
		"user: and now?",
	}, wireLines(h.up.LastChat().Chat.Messages))

	stored := h.messages(t, "team:*:helper", "")
	require.Equal(t, []string{
		"user: weather in Oslo?", "assistant: <nil>",
		"user: hello everyone", "assistant: echo: hello everyone [messages=2]",
		"tool: -3C", "assistant: echo: weather in Oslo? [messages=5]",
		"user: and now?", "assistant: echo: and now? [messages=7]",
	}, storedLines(stored), "the store keeps the order turns were recorded in, nothing lost or doubled")
}

// testE2EReusedToolCallIDs: a server that numbers calls call_0 in every
// reply. An abandoned call must not be injected because an older result
// carries its id.
func testE2EReusedToolCallIDs(t *testing.T, b e2eBackend) {
	h := newE2EHarness(t, b, 1, nil)
	const sid = "app:reuse:agent"
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_0", Name: "lookup", Arguments: `{"q":"a"}`}}})
	h.turn(t, 0, sid, chatBody(user("look up a")))
	h.turn(t, 0, sid, chatBody(toolResult("call_0", "found a")))
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_0", Name: "lookup", Arguments: `{"q":"b"}`}}})
	h.turn(t, 0, sid, chatBody(user("look up b")))
	// The app abandons the second call and asks something else.
	r, err := h.post(0, sid, chatBody(user("never mind, thanks")))
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.status, "the abandoned call is not injected: %s", r.body)
	require.Equal(t, []string{
		"user: look up a",
		"assistant: <nil>",
		"tool: found a",
		"assistant: echo: look up a [messages=3]",
		"user: look up b",
		"user: never mind, thanks",
	}, wireLines(h.up.LastChat().Chat.Messages))
}

// testE2EToolResultsAfterIdle: a tool that runs longer than the idle
// timeout. Its results continue the call's conversation.
func testE2EToolResultsAfterIdle(t *testing.T, b e2eBackend) {
	const idle = 2 * time.Second
	clock := &e2eClock{now: time.UnixMilli(1_700_000_000_000)}
	h := newE2EHarness(t, b, 1, func(o *Options) {
		o.Now = clock.Now
		o.Agent = func(name string) Agent {
			a := defaultAgent(name)
			a.Policy.IdleTimeout = idle
			return a
		}
	})
	const sid = "app:slowtool:agent"
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_r", Name: "render", Arguments: `{}`}}})
	h.turn(t, 0, sid, chatBody(user("render the report")))

	clock.Advance(time.Minute)
	r, err := h.post(0, sid, chatBody(toolResult("call_r", "report.pdf")))
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.status, "the call is injected before its results: %s", r.body)
	require.Equal(t, []string{"user: render the report", "assistant: <nil>", "tool: report.pdf"},
		wireLines(h.up.LastChat().Chat.Messages))
	require.Equal(t, []string{"c1"}, h.conversations(t, sid), "the results continue the call's conversation")

	// An idle conversation without a pending call still ends.
	clock.Advance(time.Minute)
	r = h.turn(t, 0, sid, chatBody(user("something new")))
	require.Equal(t, "0", r.header.Get("X-History-Messages"))
	require.Equal(t, []string{"c1", "c2"}, h.conversations(t, sid))
}

// testE2ERetriedRequestSameContext: an app retries a request with the same
// Idempotency-Key after its first attempt was recorded (the answer was
// lost on the way). The retry gets the context the first attempt had.
func testE2ERetriedRequestSameContext(t *testing.T, b e2eBackend) {
	h := newE2EHarness(t, b, 1, nil)
	const sid = "app:retry:agent"
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_f", Name: "fetch", Arguments: `{}`}}})
	h.turn(t, 0, sid, chatBody(user("fetch it")))

	results := chatBody(toolResult("call_f", "fetched"))
	key := map[string]string{"Idempotency-Key": "retry-1"}
	for attempt := 1; attempt <= 2; attempt++ {
		r, err := h.postWith(0, sid, results, key)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, r.status, "attempt %d: %s", attempt, r.body)
		require.Equal(t, []string{"user: fetch it", "assistant: <nil>", "tool: fetched"},
			wireLines(h.up.LastChat().Chat.Messages), "attempt %d", attempt)
	}

	// A plain question retried: the model does not see its own first answer.
	q := chatBody(user("and the size?"))
	key = map[string]string{"Idempotency-Key": "retry-2"}
	for attempt := 1; attempt <= 2; attempt++ {
		r, err := h.postWith(0, sid, q, key)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, r.status, "attempt %d: %s", attempt, r.body)
		require.Equal(t, "4", r.header.Get("X-History-Messages"), "attempt %d", attempt)
		require.Equal(t, "user: and the size?", wireLines(h.up.LastChat().Chat.Messages)[4], "attempt %d", attempt)
	}
	require.Len(t, h.messages(t, sid, ""), 6, "each turn stored once")
}

// testE2EAnsweredCallLargerThanBudget: a tool call whose arguments alone
// pass the agent's max_tokens (a coding agent writing a file). Its results
// still get the call before them: without it the upstream refuses them.
func testE2EAnsweredCallLargerThanBudget(t *testing.T, b e2eBackend) {
	h := newE2EHarness(t, b, 1, func(o *Options) {
		o.Agent = func(name string) Agent {
			a := defaultAgent(name)
			a.MaxTokens = 100
			return a
		}
	})
	const sid = "app:bigcall:agent"
	args := `{"path":"main.go","content":` + jsonString(strings.Repeat("func f() { return 42 }\n", 80)) + `}`
	h.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_big", Name: "write_file", Arguments: args}}})
	h.turn(t, 0, sid, chatBody(user("write main.go")))

	r, err := h.post(0, sid, chatBody(toolResult("call_big", "written")))
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.status, "the answered call is injected before its results: %s", r.body)
	require.Equal(t, []string{"assistant: <nil>", "tool: written"}, wireLines(h.up.LastChat().Chat.Messages))
	require.Equal(t, "1", r.header.Get("X-History-Messages"))
}

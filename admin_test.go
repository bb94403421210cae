package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/admin"
	"github.com/historyproxy/historyproxy/console"
	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/metrics"
)

// adminBackend starts programs on one store: memory, or one real
// redis-server shared by the backend's programs, each under its own key
// prefix.
type adminBackend struct {
	name string
	rs   *redistest.Server // nil: the in-memory store
	n    atomic.Int64
}

// adminEnv is what every program of the tests runs with.
type adminEnv struct {
	p      *program
	up     *fakeai.Server
	prefix string // Redis key prefix ("" for memory)
	token  string
}

// start runs a program on the backend with a fresh upstream; extra env
// and args are added.
func (b *adminBackend) start(t *testing.T, env map[string]string, args ...string) *adminEnv {
	t.Helper()
	up := fakeai.New(t)
	e := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}
	for k, v := range env {
		e[k] = v
	}
	ae := &adminEnv{up: up}
	if b.rs != nil {
		ae.prefix = fmt.Sprintf("adm%d", b.n.Add(1))
		e["HISTORYPROXY_REDIS_URL"] = b.rs.URL
		e["HISTORYPROXY_REDIS_PREFIX"] = ae.prefix
	}
	ae.p = start(t, e, args...)
	return ae
}

// chat sends one user message through the proxy with the official SDK and
// returns the reply's text. It returns once the clock has passed the
// millisecond of the turn, so that sessions' last activities, which the
// list orders by, differ.
func (e *adminEnv) chat(t *testing.T, session, text string, opts ...option.RequestOption) string {
	t.Helper()
	res, err := e.p.client(session).Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model:    openai.ChatModelGPT4oMini,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(text)},
	}, opts...)
	require.NoError(t, err)
	for ms := time.Now().UnixMilli(); time.Now().UnixMilli() == ms; {
		runtime.Gosched()
	}
	return res.Choices[0].Message.Content
}

// call asks the admin API; body (when not nil) is sent as JSON, and the
// answer is decoded into out (when not nil). It returns the status.
func (e *adminEnv) call(t *testing.T, method, path string, body, out any, header ...string) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		require.NoError(t, err)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://"+e.p.addrs.Admin+path, rd)
	require.NoError(t, err)
	if e.token != "" {
		req.Header.Set("Authorization", "Bearer "+e.token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	if out != nil {
		require.NoError(t, json.Unmarshal(raw, out), "%s %s: %s", method, path, raw)
	}
	return resp.StatusCode
}

func (e *adminEnv) get(t *testing.T, path string, out any) {
	t.Helper()
	var raw json.RawMessage
	status := e.call(t, http.MethodGet, path, nil, &raw)
	require.Equal(t, http.StatusOK, status, "GET %s: %s", path, raw)
	require.NoError(t, json.Unmarshal(raw, out))
}

// apiError is the error shape every route answers with.
type apiError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	} `json:"error"`
}

func (e *adminEnv) fails(t *testing.T, method, path string, body any, status int, code string) {
	t.Helper()
	var ae apiError
	got := e.call(t, method, path, body, &ae)
	require.Equal(t, status, got, "%s %s", method, path)
	require.Equal(t, code, ae.Error.Code, "%s %s: %s", method, path, ae.Error.Message)
	require.NotEmpty(t, ae.Error.Message)
}

func (e *adminEnv) list(t *testing.T, query string) admin.SessionList {
	t.Helper()
	var l admin.SessionList
	e.get(t, "/admin/v1/sessions?"+query, &l)
	return l
}

func listIDs(l admin.SessionList) []string {
	var ids []string
	for _, s := range l.Items {
		ids = append(ids, s.ID)
	}
	return ids
}

func sessionPath(id string, rest ...string) string {
	return "/admin/v1/sessions/" + url.PathEscape(id) + strings.Join(rest, "")
}

// TestAdminAPI drives every route of the conversations API end to end,
// with turns made through the proxy by the official SDK, on the memory
// store and on a real redis-server.
func TestAdminAPI(t *testing.T) {
	backends := []*adminBackend{{name: "memory"}, {name: "redis", rs: redistest.Start(t)}}
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			t.Run("list, filters, search and stable pages", func(t *testing.T) { testAdminList(t, b) })
			t.Run("detail, messages, timeline and titles", func(t *testing.T) { testAdminRead(t, b) })
			t.Run("import, then a chat request sees it", func(t *testing.T) { testAdminImport(t, b) })
			t.Run("reset and X-History new", func(t *testing.T) { testAdminReset(t, b) })
			t.Run("erase a session and a user", func(t *testing.T) { testAdminErase(t, b) })
			t.Run("label lookup", func(t *testing.T) { testAdminLabel(t, b) })
			t.Run("sorted by cost, turn usage, overview and capabilities", func(t *testing.T) { testAdminCost(t, b) })
		})
	}
}

func testAdminList(t *testing.T, b *adminBackend) {
	e := b.start(t, nil)
	sessions := []struct{ id, text string }{
		{"web:ann:support", "My printer is on fire"},
		{"web:bob:support", "Where is my parcel"},
		{"api:ann:sales", "I want ten licences"},
		{"api:cat:support", "Reset my password please"},
		{"web:ann:sales", "Is there a student discount"},
	}
	for _, s := range sessions {
		e.chat(t, s.id, s.text)
	}
	require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath("api:cat:support", "/reset"), nil, nil))

	all := e.list(t, "")
	require.EqualValues(t, 5, all.Total)
	require.Nil(t, all.NextCursor)
	require.Equal(t, []string{"web:ann:sales", "api:cat:support", "api:ann:sales", "web:bob:support", "web:ann:support"}, listIDs(all))
	item := all.Items[0]
	require.Equal(t, "web", item.Channel)
	require.Equal(t, "ann", item.User)
	require.Equal(t, "sales", item.Agent)
	require.Equal(t, "Is there a student discount", *item.Title, "derived from the first user message")
	require.Equal(t, "c1", *item.Conversation)
	require.EqualValues(t, 2, item.MessageCount)
	require.EqualValues(t, 1, item.Requests)
	require.Positive(t, item.Tokens.Prompt)
	require.Positive(t, item.CostUSD, "gpt-4o-mini is priced")
	require.True(t, item.IsActive)
	require.NotNil(t, item.CreatedAt)
	require.NotNil(t, item.LastActiveAt)

	last := func(id string) string {
		for _, s := range all.Items {
			if s.ID == id {
				return *s.LastActiveAt
			}
		}
		t.Fatalf("no %s", id)
		return ""
	}
	filters := []struct {
		query string
		want  []string
	}{
		{"channel=web", []string{"web:ann:sales", "web:bob:support", "web:ann:support"}},
		{"agent=support", []string{"api:cat:support", "web:bob:support", "web:ann:support"}},
		{"user=ann", []string{"web:ann:sales", "api:ann:sales", "web:ann:support"}},
		{"channel=web&agent=support", []string{"web:bob:support", "web:ann:support"}},
		{"active=false", []string{"api:cat:support"}},
		{"active=true&user=ann", []string{"web:ann:sales", "api:ann:sales", "web:ann:support"}},
		{"q=BOB", []string{"web:bob:support"}},
		{"q=" + url.QueryEscape("on FIRE"), []string{"web:ann:support"}},
		{"q=ann%3Asales", []string{"web:ann:sales", "api:ann:sales"}},
		{"q=discount&channel=api", nil},
		{"since=" + url.QueryEscape(last("api:ann:sales")), []string{"web:ann:sales", "api:cat:support", "api:ann:sales"}},
		{"until=" + url.QueryEscape(last("web:bob:support")), []string{"web:bob:support", "web:ann:support"}},
		{"since=" + url.QueryEscape(last("web:bob:support")) + "&until=" + url.QueryEscape(last("api:ann:sales")) + "&user=ann", []string{"api:ann:sales"}},
	}
	for _, f := range filters {
		l := e.list(t, f.query)
		require.Equal(t, f.want, listIDs(l), f.query)
		require.EqualValues(t, len(f.want), l.Total, f.query)
	}

	// Pages while turns arrive: a session shown on the first page moves to
	// the top, one not shown yet too, and a new one arrives; no session is
	// listed twice.
	first := e.list(t, "limit=2")
	require.EqualValues(t, 5, first.Total)
	require.Len(t, first.Items, 2)
	require.NotNil(t, first.NextCursor)
	e.chat(t, "web:ann:sales", "One more question")
	e.chat(t, "web:bob:support", "Any news")
	e.chat(t, "sms:dan:support", "Hello")
	seen := listIDs(first)
	cursor := *first.NextCursor
	for cursor != "" {
		l := e.list(t, "limit=2&cursor="+url.QueryEscape(cursor))
		require.EqualValues(t, 6, l.Total, "the total counts what matches now")
		seen = append(seen, listIDs(l)...)
		cursor = ""
		if l.NextCursor != nil {
			cursor = *l.NextCursor
		}
	}
	require.Equal(t, []string{"web:ann:sales", "api:cat:support", "api:ann:sales", "web:ann:support"}, seen,
		"the sessions that moved up are not listed again; the one that moved from below and the new one belong to a fresh listing")
	require.Equal(t, []string{"sms:dan:support", "web:bob:support", "web:ann:sales"}, listIDs(e.list(t, "limit=3")))

	for _, bad := range []struct{ query, param string }{
		{"limit=0", "limit"}, {"limit=501", "limit"}, {"limit=x", "limit"}, {"active=yes", "active"},
		{"since=yesterday", "since"}, {"channel=a%20b", "channel"}, {"cursor=nope", "cursor"},
	} {
		var ae apiError
		require.Equal(t, http.StatusBadRequest, e.call(t, http.MethodGet, "/admin/v1/sessions?"+bad.query, nil, &ae), bad.query)
		require.Equal(t, "invalid_value", ae.Error.Code, bad.query)
		require.Equal(t, bad.param, *ae.Error.Param, bad.query)
	}
}

func testAdminRead(t *testing.T, b *adminBackend) {
	e := b.start(t, nil)
	const id = "chat:john@example.com:support"
	long := "Hello there, I would like to know how the quarterly pipeline review went for Acme"
	e.chat(t, id, long)

	// A tool call, answered by the app with only its results: the proxy
	// injects the call before them.
	ctx := context.Background()
	c := e.p.client(id)
	e.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_w", Name: "weather", Arguments: `{"city":"Paris"}`}}})
	res, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Weather in Paris?")},
	})
	require.NoError(t, err)
	require.Equal(t, "call_w", res.Choices[0].Message.ToolCalls[0].ID)
	e.up.Enqueue(fakeai.Reply{Content: "It is 21 degrees in Paris."})
	_, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.ToolMessage(`{"temp":21}`, "call_w")},
	})
	require.NoError(t, err)

	var d admin.SessionDetail
	e.get(t, sessionPath(id), &d)
	require.Equal(t, id, d.ID)
	require.Equal(t, "john@example.com", d.User)
	const derived = "Hello there, I would like to know how the quarterly pipeline…"
	require.Equal(t, derived, *d.Title)
	require.EqualValues(t, 6, d.MessageCount)
	require.EqualValues(t, 3, d.Requests)
	require.Len(t, d.Conversations, 1)
	conv := d.Conversations[0]
	require.Equal(t, "c1", conv.ID)
	require.Equal(t, "active", conv.Status)
	require.EqualValues(t, 6, conv.MessageCount)
	require.False(t, conv.TitleSet)
	require.NotNil(t, conv.FirstMessageID)

	// The flat history: user and assistant text only.
	var flat admin.Page[admin.Message]
	e.get(t, sessionPath(id, "/messages"), &flat)
	require.Equal(t, "c1", *flat.Conversation)
	require.True(t, flat.Active)
	var lines []string
	for _, m := range flat.Items {
		lines = append(lines, m.Role+": "+m.Content)
		require.Equal(t, "john@example.com", *m.User)
		require.NotNil(t, m.CreatedAt)
	}
	require.Equal(t, []string{
		"user: " + long, "assistant: echo: " + long + " [messages=1]",
		"user: Weather in Paris?", "assistant: It is 21 degrees in Paris.",
	}, lines)
	require.False(t, flat.HasMore)

	// Paged by message id, both ways.
	var p1, p2, back admin.Page[admin.Message]
	e.get(t, sessionPath(id, "/messages?limit=3"), &p1)
	require.Len(t, p1.Items, 3)
	require.True(t, p1.HasMore)
	e.get(t, sessionPath(id, "/messages?limit=3&after="+*p1.NextAfter), &p2)
	require.Len(t, p2.Items, 1)
	require.False(t, p2.HasMore)
	require.Equal(t, "It is 21 degrees in Paris.", p2.Items[0].Content)
	e.get(t, sessionPath(id, "/messages?limit=2&newest=true"), &back)
	require.Equal(t, []string{"Weather in Paris?", "It is 21 degrees in Paris."}, []string{back.Items[0].Content, back.Items[1].Content})
	require.True(t, back.HasMore)
	e.get(t, sessionPath(id, "/messages?limit=2&before="+*back.NextBefore), &back)
	require.Equal(t, "user", back.Items[0].Role)
	require.Equal(t, long, back.Items[0].Content)
	require.False(t, back.HasMore)

	// The timeline: everything as stored.
	var tl admin.Page[admin.Entry]
	e.get(t, sessionPath(id, "/timeline"), &tl)
	var kinds []string
	for _, m := range tl.Items {
		kinds = append(kinds, m.Kind+"/"+m.Role)
		require.Equal(t, "c1", m.Conversation)
		require.Positive(t, m.Tokens, m.ID)
		require.Equal(t, "complete", m.Status)
		require.Equal(t, "gpt-4o-mini", *m.Model)
	}
	require.Equal(t, []string{"message/user", "message/assistant", "message/user", "tool_call/assistant", "tool_result/tool", "message/assistant"}, kinds)
	call := tl.Items[3]
	require.Nil(t, call.Content, "an assistant message that only calls tools has content null")
	require.JSONEq(t, `[{"id":"call_w","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Paris\"}"}}]`, string(call.ToolCalls))
	require.Equal(t, "call_w", tl.Items[4].ToolCallID)

	// Titles: set, set on a named conversation, cleared back to derived.
	var title struct {
		Conversation string  `json:"conversation"`
		Title        *string `json:"title"`
		TitleSet     bool    `json:"title_set"`
	}
	require.Equal(t, http.StatusOK, e.call(t, http.MethodPut, sessionPath(id, "/title"), map[string]string{"title": "  Q3 review  "}, &title))
	require.Equal(t, "Q3 review", *title.Title)
	require.True(t, title.TitleSet)
	require.Equal(t, "Q3 review", *e.list(t, "").Items[0].Title, "the list shows the title set")
	e.fails(t, http.MethodPut, sessionPath(id, "/title"), map[string]string{"title": "x", "conversation": "c9"}, http.StatusNotFound, "conversation_not_found")
	e.fails(t, http.MethodPut, sessionPath(id, "/title"), map[string]string{"title": strings.Repeat("x", 201)}, http.StatusBadRequest, "invalid_value")
	e.fails(t, http.MethodPut, sessionPath(id, "/title"), map[string]string{"title": "a\nb"}, http.StatusBadRequest, "invalid_value")
	e.fails(t, http.MethodPut, sessionPath(id, "/title"), map[string]string{}, http.StatusBadRequest, "missing_required_parameter")
	require.Equal(t, http.StatusOK, e.call(t, http.MethodPut, sessionPath(id, "/title"), map[string]string{"title": "", "conversation": "c1"}, &title))
	require.Equal(t, derived, *title.Title)
	require.False(t, title.TitleSet)

	// Ids: malformed is 400, unknown 404, in the proxy's error shape.
	e.fails(t, http.MethodGet, "/admin/v1/sessions/no-colons", nil, http.StatusBadRequest, "invalid_session_id")
	e.fails(t, http.MethodGet, sessionPath("a:b c:d"), nil, http.StatusBadRequest, "invalid_session_id")
	e.fails(t, http.MethodGet, sessionPath("chat:nobody:support"), nil, http.StatusNotFound, "session_not_found")
	e.fails(t, http.MethodGet, sessionPath("chat:nobody:support", "/messages"), nil, http.StatusNotFound, "session_not_found")
	e.fails(t, http.MethodGet, sessionPath(id, "/timeline?conversation=c2"), nil, http.StatusNotFound, "conversation_not_found")
	e.fails(t, http.MethodGet, sessionPath(id, "/messages?after=x"), nil, http.StatusBadRequest, "invalid_value")
	e.fails(t, http.MethodGet, "/admin/v1/nothing", nil, http.StatusNotFound, "unknown_url")
}

func testAdminImport(t *testing.T, b *adminBackend) {
	e := b.start(t, nil)
	const id = "web:kim:support"
	msgs := []map[string]any{
		{"role": "user", "content": "My favourite colour is teal."},
		{"role": "assistant", "content": "Noted: teal."},
	}
	var imp admin.Imported
	require.Equal(t, http.StatusCreated, e.call(t, http.MethodPost, sessionPath(id, "/messages"),
		map[string]any{"messages": msgs, "model": "gpt-4o-mini"}, &imp, "Idempotency-Key", "import-1"))
	require.Equal(t, "c1", imp.Conversation)
	require.True(t, imp.NewConversation)
	require.Len(t, imp.IDs, 2)
	require.Positive(t, imp.Tokens)
	// The same key again stores nothing.
	require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/messages"),
		map[string]any{"messages": msgs}, &imp, "Idempotency-Key", "import-1"))
	require.True(t, imp.Duplicate)
	require.Empty(t, imp.IDs)

	// Bad input is refused and stores nothing.
	for _, bad := range []struct {
		name string
		body any
		code string
	}{
		{"no messages", map[string]any{}, "missing_required_parameter"},
		{"empty messages", map[string]any{"messages": []any{}}, "missing_required_parameter"},
		{"system message", map[string]any{"messages": []any{map[string]any{"role": "system", "content": "x"}}}, "invalid_value"},
		{"unknown role", map[string]any{"messages": []any{map[string]any{"role": "robot", "content": "x"}}}, "invalid_value"},
		{"content of the wrong type", map[string]any{"messages": []any{map[string]any{"role": "user", "content": 5}}}, "invalid_type"},
		{"tool without its call", map[string]any{"messages": []any{map[string]any{"role": "tool", "content": "x"}}}, "missing_required_parameter"},
		{"assistant saying nothing", map[string]any{"messages": []any{map[string]any{"role": "assistant", "content": nil}}}, "missing_required_parameter"},
		{"messages not an array", map[string]any{"messages": "hi"}, "invalid_type"},
		{"not an object", []any{1}, "invalid_json"},
	} {
		var ae apiError
		require.Equal(t, http.StatusBadRequest, e.call(t, http.MethodPost, sessionPath(id, "/messages"), bad.body, &ae), bad.name)
		require.Equal(t, bad.code, ae.Error.Code, "%s: %s", bad.name, ae.Error.Message)
	}
	var d admin.SessionDetail
	e.get(t, sessionPath(id), &d)
	require.EqualValues(t, 2, d.MessageCount, "only the first import is stored")
	require.EqualValues(t, 0, d.Requests, "an import is not a request")
	require.Equal(t, "My favourite colour is teal.", *d.Title)

	// The next chat request sees the imported messages.
	reply := e.chat(t, id, "What is my favourite colour?")
	require.Equal(t, "echo: What is my favourite colour? [messages=3]", reply)
	var sent []string
	for _, m := range e.up.LastChat().Chat.Messages {
		sent = append(sent, fmt.Sprint(m["role"], ": ", m["content"]))
	}
	require.Equal(t, []string{"user: My favourite colour is teal.", "assistant: Noted: teal.", "user: What is my favourite colour?"}, sent)

	// Into a new conversation, for a shared session, naming the user.
	require.Equal(t, http.StatusCreated, e.call(t, http.MethodPost, sessionPath("web:*:team", "/messages"),
		map[string]any{"messages": msgs[:1], "user": "kim", "new_conversation": true}, &imp))
	var flat admin.Page[admin.Message]
	e.get(t, sessionPath("web:*:team", "/messages"), &flat)
	require.Equal(t, "kim", *flat.Items[0].User)
}

func testAdminReset(t *testing.T, b *adminBackend) {
	e := b.start(t, nil)
	const id = "chat:lee:support"
	e.chat(t, id, "first")
	var reset struct {
		Ended *string `json:"ended_conversation"`
	}
	require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/reset"), nil, &reset))
	require.Equal(t, "c1", *reset.Ended)
	var d admin.SessionDetail
	e.get(t, sessionPath(id), &d)
	require.False(t, d.IsActive)
	require.Equal(t, "ended", d.Conversations[0].Status)
	require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/reset"), nil, &reset))
	require.Nil(t, reset.Ended, "nothing left to end")
	e.fails(t, http.MethodPost, sessionPath("chat:nobody:support", "/reset"), nil, http.StatusNotFound, "session_not_found")

	require.Equal(t, "echo: second [messages=1]", e.chat(t, id, "second"), "nothing of c1 is injected")
	e.chat(t, id, "third")
	// A "new chat" from the client side.
	require.Equal(t, "echo: fourth [messages=1]", e.chat(t, id, "fourth", option.WithHeader("X-History", "new")))
	require.Equal(t, "echo: fifth [messages=3]", e.chat(t, id, "fifth"), "the new conversation goes on")

	e.get(t, sessionPath(id), &d)
	require.Equal(t, "c3", *d.Conversation)
	var status []string
	for _, c := range d.Conversations {
		status = append(status, c.ID+" "+c.Status+" "+*c.Title)
	}
	require.Equal(t, []string{"c1 ended first", "c2 ended second", "c3 active fourth"}, status)
	for conv, want := range map[string][]string{"c1": {"first"}, "c2": {"second", "third"}, "c3": {"fourth", "fifth"}} {
		var flat admin.Page[admin.Message]
		e.get(t, sessionPath(id, "/messages?conversation="+conv), &flat)
		var users []string
		for _, m := range flat.Items {
			if m.Role == "user" {
				users = append(users, m.Content)
			}
		}
		require.Equal(t, want, users, conv)
		require.Equal(t, conv == "c3", flat.Active, conv)
	}
}

func testAdminErase(t *testing.T, b *adminBackend) {
	e := b.start(t, nil)
	for _, id := range []string{"web:dan:support", "api:dan:sales", "web:eve:support"} {
		e.chat(t, id, "hello from "+id)
		e.chat(t, id, "again")
	}
	var ae apiError
	require.Equal(t, http.StatusCreated, e.call(t, http.MethodPost, sessionPath("web:eve:support", "/messages"),
		map[string]any{"messages": []any{map[string]any{"role": "user", "content": "x"}}}, nil, "Idempotency-Key", "k"))
	require.Contains(t, e.metrics(t), `session="web:eve:support"`)

	var erased admin.Erased
	require.Equal(t, http.StatusOK, e.call(t, http.MethodDelete, sessionPath("web:eve:support"), nil, &erased))
	require.Equal(t, admin.Erased{Session: "web:eve:support", Conversations: 1, Messages: 5, MetricSeries: true}, erased)
	e.fails(t, http.MethodGet, sessionPath("web:eve:support"), nil, http.StatusNotFound, "session_not_found")
	e.fails(t, http.MethodDelete, sessionPath("web:eve:support"), nil, http.StatusNotFound, "session_not_found")
	require.NotContains(t, listIDs(e.list(t, "")), "web:eve:support")
	require.NotContains(t, e.metrics(t), `session="web:eve:support"`, "no metric series left")
	e.noKeys(t, b, "web:eve:support")
	// The session starts over, its idempotency keys forgotten.
	require.Equal(t, http.StatusCreated, e.call(t, http.MethodPost, sessionPath("web:eve:support", "/messages"),
		map[string]any{"messages": []any{map[string]any{"role": "user", "content": "x"}}}, nil, "Idempotency-Key", "k"))

	// A user's sessions across channels and agents.
	var ue admin.UserErased
	require.Equal(t, http.StatusOK, e.call(t, http.MethodDelete, "/admin/v1/users/dan", nil, &ue))
	require.Equal(t, 2, ue.Sessions)
	var ids []string
	for _, x := range ue.Erased {
		ids = append(ids, x.Session)
		require.EqualValues(t, 4, x.Messages)
	}
	slices.Sort(ids)
	require.Equal(t, []string{"api:dan:sales", "web:dan:support"}, ids)
	require.Empty(t, e.list(t, "user=dan").Items)
	require.Equal(t, []string{"web:eve:support"}, listIDs(e.list(t, "")))
	m := e.metrics(t)
	require.NotContains(t, m, "dan")
	for _, id := range ids {
		e.noKeys(t, b, id)
	}
	require.Equal(t, http.StatusNotFound, e.call(t, http.MethodDelete, "/admin/v1/users/dan", nil, &ae))
	require.Equal(t, "user_not_found", ae.Error.Code)
	e.fails(t, http.MethodDelete, "/admin/v1/users/a%20b", nil, http.StatusBadRequest, "invalid_value")
}

// noKeys checks, on Redis, that SCAN finds no key of the session and no
// index names it.
func (e *adminEnv) noKeys(t *testing.T, b *adminBackend, id string) {
	t.Helper()
	if b.rs == nil {
		return
	}
	ctx := context.Background()
	c := b.rs.Client(t)
	var keys []string
	iter := c.Scan(ctx, 0, e.prefix+":*", 1000).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		if strings.Contains(k, "{"+id+"}") {
			keys = append(keys, k)
			continue
		}
		if typ := c.Type(ctx, k).Val(); typ == "zset" {
			if _, err := c.ZScore(ctx, k, id).Result(); err == nil {
				keys = append(keys, k+" names it")
			}
		}
	}
	require.NoError(t, iter.Err())
	require.Empty(t, keys, "keys of %s left after erasure", id)
}

func (e *adminEnv) metrics(t *testing.T) string {
	t.Helper()
	resp, err := http.Get("http://" + e.p.addrs.Admin + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}

func testAdminLabel(t *testing.T, b *adminBackend) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("metrics:\n  session_label: hash\n  session_label_key_env: HP_LABEL_KEY\n"), 0o600))
	e := b.start(t, map[string]string{"HP_LABEL_KEY": "0123456789abcdef0123456789abcdef"}, "-config", cfg)
	e.chat(t, "chat:ann@example.com:support", "hi")
	e.chat(t, "chat:bob@example.com:support", "hi")
	m := e.metrics(t)
	require.NotContains(t, m, "ann@example.com", "hash mode keeps the user out of the metrics")
	var labels []string
	for _, match := range regexp.MustCompile(`historyproxy_session_tokens_total\{session="([^"]+)",type="prompt"\}`).FindAllStringSubmatch(m, -1) {
		labels = append(labels, match[1])
	}
	require.Len(t, labels, 2)
	found := map[string]bool{}
	for _, label := range labels {
		l := e.list(t, "label="+url.QueryEscape(label))
		require.Len(t, l.Items, 1, label)
		require.EqualValues(t, 1, l.Total)
		found[l.Items[0].ID] = true
	}
	require.Equal(t, map[string]bool{"chat:ann@example.com:support": true, "chat:bob@example.com:support": true}, found)
	require.Empty(t, e.list(t, "label=chat:00000000000000000000000000000000:support").Items)
	e.fails(t, http.MethodGet, "/admin/v1/sessions?label="+url.QueryEscape(labels[0])+"&channel=web", nil, http.StatusBadRequest, "invalid_value")
}

// TestAdminToken: with a token configured every /admin/v1 route needs it,
// while health, readiness and metrics stay open.
func TestAdminToken(t *testing.T) {
	up := fakeai.New(t)
	const token = "s3cret-admin-token-0123456789"
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "ADMIN_TOKEN": token}, "-admin-token-env", "ADMIN_TOKEN")
	e := &adminEnv{p: p, up: up}
	e.chat(t, "chat:ann:support", "hi")
	for _, tc := range []struct {
		name, header string
	}{{"no header", ""}, {"wrong token", "Bearer " + token + "x"}, {"not bearer", "Basic " + token}, {"prefix of the token", "Bearer " + token[:10]}} {
		for _, path := range []string{"/admin/v1/sessions", sessionPath("chat:ann:support"), "/admin/v1/nothing"} {
			var ae apiError
			status := e.call(t, http.MethodGet, path, nil, &ae, "Authorization", tc.header)
			require.Equal(t, http.StatusUnauthorized, status, "%s %s", tc.name, path)
			require.Equal(t, "invalid_admin_token", ae.Error.Code)
			require.Nil(t, ae.Error.Param)
		}
	}
	e.fails(t, http.MethodDelete, sessionPath("chat:ann:support"), nil, http.StatusUnauthorized, "invalid_admin_token")
	e.token = token
	require.Equal(t, []string{"chat:ann:support"}, listIDs(e.list(t, "")), "nothing was erased without the token")
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		resp, err := http.Get("http://" + p.addrs.Admin + path)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, path)
	}
	// The console's files hold no data: they are served without the
	// token (a browser cannot send one when it opens the page), under
	// the console's policy; what they show comes from the API, with it.
	resp, err := http.Get("http://" + p.addrs.Admin + "/console/")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, console.CSP, resp.Header.Get("Content-Security-Policy"))
	e.token = ""
	e.fails(t, http.MethodGet, "/admin/v1/capabilities", nil, http.StatusUnauthorized, "invalid_admin_token")
	e.fails(t, http.MethodGet, "/admin/v1/overview", nil, http.StatusUnauthorized, "invalid_admin_token")
	e.token = token
	var c admin.Capabilities
	e.get(t, "/admin/v1/capabilities", &c)
	require.True(t, c.TokenRequired)
}

func TestAdminRoutesOffWithoutTokenOffLoopback(t *testing.T) {
	for _, tc := range []struct {
		name  string
		token string
		ip    string
		want  bool
	}{
		{"loopback v4", "", "127.0.0.1", true},
		{"loopback v6", "", "::1", true},
		{"all interfaces", "", "0.0.0.0", false},
		{"all interfaces v6", "", "::", false},
		{"a private address", "", "10.1.2.3", false},
		{"a token, off loopback", "0123456789abcdef", "0.0.0.0", true},
	} {
		addr := &net.TCPAddr{IP: net.ParseIP(tc.ip), Port: 9090}
		require.Equal(t, tc.want, adminAllowed(tc.token, addr), tc.name)
	}
	// Off, the routes are not there at all, and health and metrics are.
	var draining atomic.Bool
	srv := httptest.NewServer(adminRoutes(history.NewMemory(), metrics.NewRegistry(), false, time.Second, &draining, nil))
	defer srv.Close()
	for path, want := range map[string]int{"/admin/v1/sessions": http.StatusNotFound, "/console/": http.StatusNotFound, "/console/js/app.js": http.StatusNotFound, "/healthz": http.StatusOK, "/metrics": http.StatusOK} {
		resp, err := http.Get(srv.URL + path)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, want, resp.StatusCode, path)
	}
}

func testAdminCost(t *testing.T, b *adminBackend) {
	e := b.start(t, nil)
	turns := []struct {
		id             string
		prompt, output int
	}{
		{"web:ann:support", 1000, 10},
		{"web:bob:support", 200000, 500},
		{"api:cat:sales", 20, 1},
		{"web:dan:sales", 30000, 40},
	}
	for _, tt := range turns {
		e.up.Enqueue(fakeai.Reply{Content: "ok", Usage: &fakeai.Usage{PromptTokens: tt.prompt, CompletionTokens: tt.output}})
		e.chat(t, tt.id, "hello from "+tt.id)
	}
	byCost := []string{"web:bob:support", "web:dan:sales", "web:ann:support", "api:cat:sales"}
	l := e.list(t, "sort=cost")
	require.Equal(t, byCost, listIDs(l))
	require.EqualValues(t, 4, l.Total)
	for i := 1; i < len(l.Items); i++ {
		require.Greater(t, l.Items[i-1].CostUSD, l.Items[i].CostUSD)
	}
	require.Equal(t, []string{"web:bob:support", "web:ann:support"}, listIDs(e.list(t, "sort=cost&channel=web&agent=support")), "two parts: one served by the index, one checked")
	require.Equal(t, []string{"web:bob:support", "web:ann:support"}, listIDs(e.list(t, "sort=cost&agent=support")))
	require.Equal(t, []string{"web:dan:sales", "api:cat:sales"}, listIDs(e.list(t, "sort=cost&q=sales")))
	// Paging by cost: the cursor goes on where the page ended.
	var paged []string
	q := "sort=cost&limit=3"
	for {
		page := e.list(t, q)
		require.EqualValues(t, 4, page.Total)
		paged = append(paged, listIDs(page)...)
		if page.NextCursor == nil {
			break
		}
		q = "sort=cost&limit=3&cursor=" + url.QueryEscape(*page.NextCursor)
	}
	require.Equal(t, byCost, paged)
	first := e.list(t, "sort=cost&limit=1")
	e.fails(t, http.MethodGet, "/admin/v1/sessions?cursor="+url.QueryEscape(*first.NextCursor), nil, http.StatusBadRequest, "invalid_value")
	e.fails(t, http.MethodGet, "/admin/v1/sessions?sort=price", nil, http.StatusBadRequest, "invalid_value")
	require.Equal(t, []string{"web:dan:sales", "api:cat:sales", "web:bob:support", "web:ann:support"}, listIDs(e.list(t, "sort=last_active")))

	// The turn's usage is on its reply, as the timeline and the watch show it.
	var tl admin.Page[admin.Entry]
	e.get(t, sessionPath("web:bob:support", "/timeline"), &tl)
	require.Len(t, tl.Items, 2)
	require.Nil(t, tl.Items[0].Usage, "the user message")
	u := tl.Items[1].Usage
	require.NotNil(t, u, "the reply")
	require.EqualValues(t, 200000, u.PromptTokens)
	require.EqualValues(t, 500, u.CompletionTokens)
	require.InDelta(t, l.Items[0].CostUSD, u.CostUSD, 1e-9, "one turn: the session's cost")

	var o admin.Overview
	e.get(t, "/admin/v1/overview", &o)
	require.Equal(t, admin.SessionCounts{ActiveLastHour: 4, ActiveLastDay: 4, All: 4}, o.Sessions)
	require.Equal(t, byCost, func() []string {
		var ids []string
		for _, s := range o.TopSessions {
			ids = append(ids, s.ID)
		}
		return ids
	}())
	require.NotNil(t, o.Instance.StartedAt)
	for _, w := range []admin.UsageWindow{o.Instance.Hour, o.Instance.Day} {
		require.Len(t, w.Rows, 2, "support and sales, one model")
		require.Equal(t, "support", w.Rows[0].Agent, "the most costly first")
		require.Equal(t, "gpt-4o-mini", w.Rows[0].Model)
		require.EqualValues(t, 2, w.Rows[0].Requests)
		require.EqualValues(t, 201000, w.Rows[0].PromptTokens)
		require.EqualValues(t, 510, w.Rows[0].CompletionTokens)
		require.EqualValues(t, 4, w.Total.Requests)
		require.EqualValues(t, 231020, w.Total.PromptTokens)
		var sum float64
		for _, s := range l.Items {
			sum += s.CostUSD
		}
		require.InDelta(t, sum, w.Total.CostUSD, 1e-9, "the store's totals and the instance's counters agree")
	}

	var c admin.Capabilities
	e.get(t, "/admin/v1/capabilities", &c)
	require.True(t, c.Overview)
	require.False(t, c.TokenRequired)
	// Compact says whether the compaction route exists: unknown_url when not.
	var ae apiError
	e.call(t, http.MethodPost, sessionPath("nobody:x:y", "/compact"), nil, &ae)
	require.Equal(t, ae.Error.Code != "unknown_url", c.Compact, "capabilities say compact=%v, the route answers %q", c.Compact, ae.Error.Code)
}

package history

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// store is the method set both stores must share; the proxy declares its
// own smaller interface, this one keeps the two implementations alike.
type store interface {
	Window(ctx context.Context, session string, n int, nowMs int64, p Policy) (Window, error)
	Append(ctx context.Context, session string, t Turn, p Policy) (AppendResult, error)
	Session(ctx context.Context, session string) (Session, bool, error)
	Messages(ctx context.Context, session, conversationID string) ([]Message, error)
	ReadMessages(ctx context.Context, session string, q MessageQuery) (string, []Message, error)
	Conversations(ctx context.Context, session string) ([]Conversation, error)
	Sessions(ctx context.Context, q SessionQuery) (SessionPage, error)
	SetTitle(ctx context.Context, session, conversationID, title string) (string, error)
	Reset(ctx context.Context, session string) (string, error)
	Erase(ctx context.Context, session string) (Erased, error)
	Ping(ctx context.Context) error
}

var (
	_ store = (*MemoryStore)(nil)
	_ store = (*RedisStore)(nil)
)

// fixture is one store under test plus the checks that depend on how it
// keeps data.
type fixture struct {
	store store
	// checkRetention asserts that conversation conv of session, last
	// written with Policy.Retention d, expires d after that write, and
	// leaves it expired.
	checkRetention func(t *testing.T, session, conv string, d time.Duration)
	// keys lists the backend keys of a session (nil for memory): Erase
	// must leave none.
	keys func(t *testing.T, session string) []string
	// advance lets d pass for the expiries the store applies on its own
	// (Redis key TTLs, the memory store's sweep), without sleeping.
	advance func(t *testing.T, d time.Duration)
	// held counts the messages and idempotency keys the store holds.
	held func(t *testing.T) (messages, idemKeys int)
}

// t0 is the suite's "now"; tests move time by adding to it, never by
// sleeping.
const t0 = int64(1_700_000_000_000)

const session = "chat:john@example.com:support"

// testConformance runs the behaviour every store must have.
func testConformance(t *testing.T, newFixture func(t *testing.T) fixture) {
	ctx := context.Background()

	t.Run("round trip of every field", func(t *testing.T) {
		s := newFixture(t).store
		in := []Message{
			{Role: RoleUser, Content: "What is the weather in Paris?", Name: "john", User: "u-1", Tokens: 12, RequestID: "req-1", CreatedMs: t0 - 5},
			// Odd spacing and key order must come back byte for byte.
			{Role: RoleUser, Parts: json.RawMessage(`[ {"type":"text", "text":"and this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}} ]`), Tokens: 90},
			{Role: RoleAssistant, ContentNull: true, ToolCalls: json.RawMessage(`[{"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Paris\"}"}}]`), Model: "gpt-4o"},
			{Role: RoleTool, ToolCallID: "call_1", Content: `{"temp":21}`},
			{Role: RoleAssistant, Refusal: "I can't help with that.", Status: StatusIncomplete, Kind: KindMessage, Model: "gpt-4o", Tokens: 7},
		}
		res, err := s.Append(ctx, session, Turn{Messages: in, NowMs: t0, IdempotencyKey: "key-1"}, Policy{})
		mustNoErr(t, err)
		if !res.NewConversation || res.ConversationID != "c1" || res.Duplicate {
			t.Fatalf("got result %+v, want a new conversation c1", res)
		}
		if len(res.IDs) != len(in) {
			t.Fatalf("got %d ids, want %d", len(res.IDs), len(in))
		}
		if in[0].ID != "" || in[2].Kind != "" {
			t.Errorf("Append changed the caller's messages: %+v", in)
		}
		checkIncreasingIDs(t, res.IDs)

		want := make([]Message, len(in))
		copy(want, in)
		kinds := []string{KindMessage, KindMessage, KindToolCall, KindToolResult, KindMessage}
		for i := range want {
			want[i].ID = res.IDs[i]
			want[i].Conversation = "c1"
			want[i].Kind = kinds[i]
			want[i].IdempotencyKey = "key-1" // every message names its turn
			if want[i].Status == "" {
				want[i].Status = StatusComplete
			}
			if want[i].CreatedMs == 0 {
				want[i].CreatedMs = t0
			}
		}
		got, err := s.Messages(ctx, session, "")
		mustNoErr(t, err)
		checkMessages(t, got, want)
		got, err = s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		checkMessages(t, got, want)
		w, err := s.Window(ctx, session, 10, t0, Policy{})
		mustNoErr(t, err)
		if w.ConversationID != "c1" {
			t.Errorf("got window conversation %q, want c1", w.ConversationID)
		}
		checkMessages(t, w.Messages, want)
	})

	t.Run("an empty tool_calls array calls no tool", func(t *testing.T) {
		// vLLM answers every reply with "tool_calls": [], and some SDKs
		// send it on every assistant message: no call, so kind message,
		// with the array kept as sent.
		s := newFixture(t).store
		in := []Message{
			{Role: RoleUser, Content: "hi"},
			{Role: RoleAssistant, Content: "hello", ToolCalls: json.RawMessage(`[]`)},
			{Role: RoleUser, Content: "and?"},
			{Role: RoleAssistant, Content: "more", ToolCalls: json.RawMessage("[ \n]")},
		}
		_, err := s.Append(ctx, session, Turn{Messages: in, NowMs: t0}, Policy{})
		mustNoErr(t, err)
		check := func(what string, got []Message) {
			t.Helper()
			if len(got) != len(in) {
				t.Fatalf("%s: got %d messages, want %d", what, len(got), len(in))
			}
			for i, m := range got {
				if m.Kind != KindMessage || string(m.ToolCalls) != string(in[i].ToolCalls) {
					t.Errorf("%s: message %d: got kind %q tool_calls %q, want %q %q", what, i, m.Kind, m.ToolCalls, KindMessage, in[i].ToolCalls)
				}
			}
		}
		got, err := s.Messages(ctx, session, "")
		mustNoErr(t, err)
		check("messages", got)
		w, err := s.Window(ctx, session, 10, t0, Policy{})
		mustNoErr(t, err)
		check("window", w.Messages)
	})

	t.Run("window is the newest n oldest first", func(t *testing.T) {
		s := newFixture(t).store
		for i := 0; i < 5; i++ {
			appendQA(t, s, session, i, t0+int64(i), Policy{})
		}
		tests := []struct {
			n    int
			want []string
		}{
			{n: 3, want: []string{"a3", "q4", "a4"}},
			{n: 1, want: []string{"a4"}},
			{n: 10, want: []string{"q0", "a0", "q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"}},
			{n: 100, want: []string{"q0", "a0", "q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"}},
			{n: 0, want: nil},
		}
		for _, tt := range tests {
			w, err := s.Window(ctx, session, tt.n, t0+10, Policy{})
			mustNoErr(t, err)
			if got := contents(w.Messages); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("n=%d: got %q, want %q", tt.n, got, tt.want)
			}
			if w.ConversationID != "c1" {
				t.Errorf("n=%d: got conversation %q, want c1", tt.n, w.ConversationID)
			}
		}
		w, err := s.Window(ctx, "unknown", 10, t0, Policy{})
		mustNoErr(t, err)
		if w.ConversationID != "" || len(w.Messages) != 0 {
			t.Errorf("unknown session: got %+v, want an empty window", w)
		}
	})

	t.Run("idle timeout starts a new conversation and keeps the old one", func(t *testing.T) {
		s := newFixture(t).store
		p := Policy{IdleTimeout: 30 * time.Minute}
		appendQA(t, s, session, 0, t0, p)

		w, err := s.Window(ctx, session, 10, t0+(30*time.Minute).Milliseconds(), p)
		mustNoErr(t, err)
		if got := contents(w.Messages); len(got) != 2 || w.ConversationID != "c1" {
			t.Errorf("at exactly the timeout: got %q in %q, want 2 messages in c1", got, w.ConversationID)
		}
		later := t0 + (30 * time.Minute).Milliseconds() + 1
		w, err = s.Window(ctx, session, 10, later, p)
		mustNoErr(t, err)
		if w.ConversationID != "" || len(w.Messages) != 0 {
			t.Errorf("after the timeout: got %+v, want an empty window", w)
		}
		// Without an idle timeout the same conversation is still there.
		w, err = s.Window(ctx, session, 10, later, Policy{})
		mustNoErr(t, err)
		if w.ConversationID != "c1" {
			t.Errorf("no timeout: got conversation %q, want c1", w.ConversationID)
		}

		res := appendQA(t, s, session, 1, later, p)
		if !res.NewConversation || res.ConversationID != "c2" {
			t.Errorf("got %+v, want new conversation c2", res)
		}
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		if want := []string{"c1", "c2"}; !reflect.DeepEqual(convIDs(convs), want) {
			t.Errorf("got conversations %q, want %q", convIDs(convs), want)
		}
		old, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if got, want := contents(old), []string{"q0", "a0"}; !reflect.DeepEqual(got, want) {
			t.Errorf("old conversation: got %q, want %q", got, want)
		}
		w, err = s.Window(ctx, session, 10, later, p)
		mustNoErr(t, err)
		if got, want := contents(w.Messages), []string{"q1", "a1"}; !reflect.DeepEqual(got, want) || w.ConversationID != "c2" {
			t.Errorf("new window: got %q in %q, want %q in c2", got, w.ConversationID, want)
		}
		sess, ok, err := s.Session(ctx, session)
		mustNoErr(t, err)
		if !ok || sess.MessageCount != 4 || sess.LastActiveMs != later || sess.CreatedMs != t0 || sess.ConversationID != "c2" || !sess.Active {
			t.Errorf("got session %+v, want 4 messages, created %d, last active %d, active c2", sess, t0, later)
		}
	})

	t.Run("the arrival time decides idleness, not the time of the write", func(t *testing.T) {
		s := newFixture(t).store
		p := Policy{IdleTimeout: 2 * time.Second}
		appendQA(t, s, session, 0, t0, p)
		// Sent 1.2 s after the last turn, answered 3 s later: the reply
		// ends after the timeout, but its request found c1 active.
		res, err := s.Append(ctx, session, Turn{Messages: qa(1), ArrivedMs: t0 + 1200, NowMs: t0 + 4200}, p)
		mustNoErr(t, err)
		if res.NewConversation || res.ConversationID != "c1" {
			t.Errorf("got %+v, want the turn in c1", res)
		}
		// The session's activity is the write: 1.5 s later c1 is not idle.
		w, err := s.Window(ctx, session, 10, t0+5700, p)
		mustNoErr(t, err)
		if got, want := contents(w.Messages), []string{"q0", "a0", "q1", "a1"}; !reflect.DeepEqual(got, want) {
			t.Errorf("got window %q, want %q", got, want)
		}
		// A request that arrives after the timeout starts a new one.
		res, err = s.Append(ctx, session, Turn{Messages: qa(2), ArrivedMs: t0 + 8000, NowMs: t0 + 8100}, p)
		mustNoErr(t, err)
		if !res.NewConversation || res.ConversationID != "c2" {
			t.Errorf("arrived after the timeout: got %+v, want a new conversation c2", res)
		}
	})

	t.Run("a turn goes to the conversation it was read from", func(t *testing.T) {
		s := newFixture(t).store
		p := Policy{IdleTimeout: 2 * time.Second}
		appendQA(t, s, session, 0, t0, p)
		// A tool that ran an hour: the conversation went idle, but the
		// results answer its call.
		late := t0 + time.Hour.Milliseconds()
		res, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: late, ConversationID: "c1"}, p)
		mustNoErr(t, err)
		if res.NewConversation || res.ConversationID != "c1" {
			t.Errorf("got %+v, want the turn in c1", res)
		}
		w, err := s.Window(ctx, session, 10, late, p)
		mustNoErr(t, err)
		if got, want := contents(w.Messages), []string{"q0", "a0", "q1", "a1"}; !reflect.DeepEqual(got, want) || w.ConversationID != "c1" {
			t.Errorf("got window %q in %q, want %q in c1", got, w.ConversationID, want)
		}
		// A name the session does not have is ignored.
		res, err = s.Append(ctx, session, Turn{Messages: qa(2), NowMs: late + 1, ConversationID: "c9"}, p)
		mustNoErr(t, err)
		if res.NewConversation || res.ConversationID != "c1" {
			t.Errorf("unknown name: got %+v, want the active c1", res)
		}
	})

	t.Run("a turn read before a reset goes to the ended conversation", func(t *testing.T) {
		s := newFixture(t).store
		appendQA(t, s, session, 0, t0, Policy{})
		_, err := s.Reset(ctx, session)
		mustNoErr(t, err)
		res, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0 + 1, ConversationID: "c1"}, Policy{})
		mustNoErr(t, err)
		if res.NewConversation || res.ConversationID != "c1" {
			t.Errorf("got %+v, want the turn in c1", res)
		}
		w, err := s.Window(ctx, session, 10, t0+1, Policy{})
		mustNoErr(t, err)
		if w.ConversationID != "" || len(w.Messages) != 0 {
			t.Errorf("got window %+v, want none: c1 stays ended", w)
		}
		res = appendQA(t, s, session, 2, t0+2, Policy{})
		if !res.NewConversation || res.ConversationID != "c2" {
			t.Errorf("next turn: got %+v, want a new conversation c2", res)
		}
		old, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if got, want := contents(old), []string{"q0", "a0", "q1", "a1"}; !reflect.DeepEqual(got, want) {
			t.Errorf("c1: got %q, want %q", got, want)
		}
	})

	t.Run("reset ends the conversation and keeps it", func(t *testing.T) {
		s := newFixture(t).store
		appendQA(t, s, session, 0, t0, Policy{})
		ended, err := s.Reset(ctx, session)
		mustNoErr(t, err)
		if ended != "c1" {
			t.Errorf("reset: got ended %q, want c1", ended)
		}
		if ended, err := s.Reset(ctx, session); err != nil || ended != "" {
			t.Errorf("second reset: got %q, %v, want nothing ended", ended, err)
		}

		w, err := s.Window(ctx, session, 10, t0, Policy{})
		mustNoErr(t, err)
		if w.ConversationID != "" || len(w.Messages) != 0 {
			t.Errorf("after reset: got window %+v, want empty", w)
		}
		sess, ok, err := s.Session(ctx, session)
		mustNoErr(t, err)
		if !ok || sess.Active {
			t.Errorf("got session %+v (known %v), want known and not active", sess, ok)
		}
		msgs, err := s.Messages(ctx, session, "")
		mustNoErr(t, err)
		if len(msgs) != 0 {
			t.Errorf("active messages after reset: got %q, want none", contents(msgs))
		}

		res := appendQA(t, s, session, 1, t0+1, Policy{})
		if !res.NewConversation || res.ConversationID != "c2" {
			t.Errorf("got %+v, want new conversation c2", res)
		}
		old, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if got, want := contents(old), []string{"q0", "a0"}; !reflect.DeepEqual(got, want) {
			t.Errorf("reset conversation: got %q, want %q", got, want)
		}

		if ended, err := s.Reset(ctx, "unknown"); err != nil || ended != "" {
			t.Errorf("reset of an unknown session: got %q, %v, want nothing ended", ended, err)
		}
		if _, ok, err := s.Session(ctx, "unknown"); err != nil || ok {
			t.Errorf("reset of an unknown session: got known=%v, %v, want unknown", ok, err)
		}
	})

	t.Run("erase deletes everything of the session", func(t *testing.T) {
		f := newFixture(t)
		s := f.store
		other := "chat:jane@example.com:support"
		appendQA(t, s, session, 0, t0, Policy{})
		_, err := s.Reset(ctx, session)
		mustNoErr(t, err)
		_, err = s.Append(ctx, session, Turn{Messages: qa(1), NowMs: t0 + 1, IdempotencyKey: "k1", Usage: Usage{Requests: 1}}, Policy{})
		mustNoErr(t, err)
		appendQA(t, s, other, 0, t0, Policy{})

		erased, err := s.Erase(ctx, session)
		mustNoErr(t, err)
		if want := (Erased{Found: true, Conversations: 2, Messages: 4}); erased != want {
			t.Errorf("erase: got %+v, want %+v", erased, want)
		}
		if erased, err := s.Erase(ctx, session); err != nil || erased != (Erased{}) {
			t.Errorf("second erase: got %+v, %v, want nothing found", erased, err)
		}

		if _, ok, err := s.Session(ctx, session); err != nil || ok {
			t.Errorf("got known=%v, %v, want unknown", ok, err)
		}
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		if len(convs) != 0 {
			t.Errorf("got conversations %q, want none", convIDs(convs))
		}
		for _, c := range []string{"c1", "c2"} {
			msgs, err := s.Messages(ctx, session, c)
			mustNoErr(t, err)
			if len(msgs) != 0 {
				t.Errorf("%s: got %q, want no messages", c, contents(msgs))
			}
		}
		ids := sessionIDs(t, s, SessionQuery{})
		if want := []string{other}; !reflect.DeepEqual(ids, want) {
			t.Errorf("got sessions %q, want %q", ids, want)
		}
		if f.keys != nil {
			if keys := f.keys(t, session); len(keys) != 0 {
				t.Errorf("got keys %q left, want none", keys)
			}
			if keys := f.keys(t, other); len(keys) == 0 {
				t.Errorf("got no keys for %s, want its keys kept", other)
			}
		}

		// The session starts over, idempotency keys included.
		res, err := s.Append(ctx, session, Turn{Messages: qa(2), NowMs: t0 + 2, IdempotencyKey: "k1"}, Policy{})
		mustNoErr(t, err)
		if res.Duplicate || res.ConversationID != "c1" || !res.NewConversation {
			t.Errorf("after erase: got %+v, want a new c1", res)
		}
	})

	t.Run("idempotency", func(t *testing.T) {
		s := newFixture(t).store
		u := Usage{PromptTokens: 10, Requests: 1}
		first, err := s.Append(ctx, session, Turn{Messages: qa(0), NowMs: t0, IdempotencyKey: "req-1", Usage: u}, Policy{})
		mustNoErr(t, err)
		if first.Duplicate {
			t.Fatalf("first append: got duplicate, want written")
		}

		tests := []struct {
			name    string
			key     string
			at      int64
			want    bool // duplicate
			wantMsg int64
		}{
			{name: "same key an hour later", key: "req-1", at: t0 + time.Hour.Milliseconds(), want: true, wantMsg: 2},
			{name: "same key at the edge of the window", key: "req-1", at: t0 + IdempotencyWindow.Milliseconds(), want: true, wantMsg: 2},
			{name: "other key", key: "req-2", at: t0 + 1, want: false, wantMsg: 4},
			{name: "same key after the window", key: "req-1", at: t0 + IdempotencyWindow.Milliseconds() + 1, want: false, wantMsg: 6},
			{name: "reused key again", key: "req-1", at: t0 + IdempotencyWindow.Milliseconds() + 2, want: true, wantMsg: 6},
		}
		for _, tt := range tests {
			res, err := s.Append(ctx, session, Turn{Messages: qa(1), NowMs: tt.at, IdempotencyKey: tt.key, Usage: u}, Policy{})
			mustNoErr(t, err)
			if res.Duplicate != tt.want {
				t.Errorf("%s: got duplicate %v, want %v", tt.name, res.Duplicate, tt.want)
			}
			if tt.want && len(res.IDs) != 0 {
				t.Errorf("%s: got ids %q for a duplicate, want none", tt.name, res.IDs)
			}
			sess, _, err := s.Session(ctx, session)
			mustNoErr(t, err)
			if sess.MessageCount != tt.wantMsg || sess.Totals.Requests != tt.wantMsg/2 {
				t.Errorf("%s: got %d messages and %d requests, want %d and %d", tt.name, sess.MessageCount, sess.Totals.Requests, tt.wantMsg, tt.wantMsg/2)
			}
			msgs, err := s.Messages(ctx, session, "")
			mustNoErr(t, err)
			if int64(len(msgs)) != tt.wantMsg {
				t.Errorf("%s: got %d stored messages, want %d", tt.name, len(msgs), tt.wantMsg)
			}
		}

		// A usage-only turn is deduplicated too.
		for i := 0; i < 2; i++ {
			_, err := s.Append(ctx, "usage-only", Turn{NowMs: t0, IdempotencyKey: "u-1", Usage: u}, Policy{})
			mustNoErr(t, err)
		}
		sess, _, err := s.Session(ctx, "usage-only")
		mustNoErr(t, err)
		if sess.Totals != u {
			t.Errorf("usage-only duplicate: got totals %+v, want %+v", sess.Totals, u)
		}
	})

	t.Run("a repeat with a write key counts its usage once", func(t *testing.T) {
		s := newFixture(t).store
		u := Usage{PromptTokens: 10, CompletionTokens: 2, Requests: 1, CostNanos: 5}
		steps := []struct {
			name, writeKey string
			wantDup        bool
			wantRequests   int64
		}{
			{name: "first write", writeKey: "w-1", wantRequests: 1},
			{name: "the first write retried: its answer was lost", writeKey: "w-1", wantDup: true, wantRequests: 1},
			{name: "the client repeats the request", writeKey: "w-2", wantDup: true, wantRequests: 2},
			{name: "the repeat's write retried", writeKey: "w-2", wantDup: true, wantRequests: 2},
			{name: "a repeat without a write key", wantDup: true, wantRequests: 2},
			{name: "another repeat", writeKey: "w-3", wantDup: true, wantRequests: 3},
		}
		for i, st := range steps {
			res, err := s.Append(ctx, session, Turn{Messages: qa(0), NowMs: t0 + int64(i), IdempotencyKey: "client-key", WriteKey: st.writeKey, Usage: u}, Policy{})
			mustNoErr(t, err)
			if res.Duplicate != st.wantDup || (st.wantDup && len(res.IDs) != 0) {
				t.Errorf("%s: got %+v, want duplicate %v", st.name, res, st.wantDup)
			}
			sess, _, err := s.Session(ctx, session)
			mustNoErr(t, err)
			want := Usage{PromptTokens: 10 * st.wantRequests, CompletionTokens: 2 * st.wantRequests, Requests: st.wantRequests, CostNanos: 5 * st.wantRequests}
			if sess.Totals != want || sess.MessageCount != 2 {
				t.Errorf("%s: got totals %+v and %d messages, want %+v and 2", st.name, sess.Totals, sess.MessageCount, want)
			}
		}
	})

	t.Run("usage-only turns add to totals only", func(t *testing.T) {
		s := newFixture(t).store
		a := Usage{PromptTokens: 100, CompletionTokens: 20, CachedTokens: 64, HistoryTokens: 80, Requests: 1, CostNanos: 1234}
		b := Usage{PromptTokens: 7, CompletionTokens: 3, CachedTokens: 0, HistoryTokens: 0, Requests: 1, CostNanos: 99}
		_, err := s.Append(ctx, session, Turn{Messages: qa(0), NowMs: t0, Usage: a}, Policy{IdleTimeout: time.Minute})
		mustNoErr(t, err)
		res, err := s.Append(ctx, session, Turn{NowMs: t0 + time.Hour.Milliseconds(), Usage: b}, Policy{IdleTimeout: time.Minute})
		mustNoErr(t, err)
		if res.NewConversation || len(res.IDs) != 0 {
			t.Errorf("got %+v, want no conversation change and no ids", res)
		}
		sess, _, err := s.Session(ctx, session)
		mustNoErr(t, err)
		want := Session{ID: session, ConversationID: "c1", Title: "q0", CreatedMs: t0, LastActiveMs: t0, Active: true, MessageCount: 2, Totals: a.Add(b)}
		if sess != want {
			t.Errorf("got %+v, want %+v", sess, want)
		}
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		if !reflect.DeepEqual(convIDs(convs), []string{"c1"}) {
			t.Errorf("got conversations %q, want [c1]", convIDs(convs))
		}

		// A new session that only ever had usage is known, with no
		// conversation.
		_, err = s.Append(ctx, "fresh", Turn{NowMs: t0, Usage: b}, Policy{})
		mustNoErr(t, err)
		sess, ok, err := s.Session(ctx, "fresh")
		mustNoErr(t, err)
		want = Session{ID: "fresh", CreatedMs: t0, Totals: b}
		if !ok || sess != want {
			t.Errorf("got %+v (known %v), want %+v", sess, ok, want)
		}
		w, err := s.Window(ctx, "fresh", 10, t0, Policy{})
		mustNoErr(t, err)
		if w.ConversationID != "" || len(w.Messages) != 0 {
			t.Errorf("got window %+v, want empty", w)
		}
	})

	t.Run("totals accumulate across turns", func(t *testing.T) {
		s := newFixture(t).store
		var want Usage
		for i := 0; i < 5; i++ {
			u := Usage{PromptTokens: int64(100 * (i + 1)), CompletionTokens: int64(i), CachedTokens: int64(i * 3), HistoryTokens: int64(50 * i), Requests: 1, CostNanos: int64(1_000_003 * i)}
			want = want.Add(u)
			_, err := s.Append(ctx, session, Turn{Messages: qa(i), NowMs: t0 + int64(i), Usage: u}, Policy{})
			mustNoErr(t, err)
		}
		sess, _, err := s.Session(ctx, session)
		mustNoErr(t, err)
		if sess.Totals != want {
			t.Errorf("got totals %+v, want %+v", sess.Totals, want)
		}
		if sess.MessageCount != 10 {
			t.Errorf("got %d messages, want 10", sess.MessageCount)
		}
	})

	t.Run("concurrent appends keep turns whole", func(t *testing.T) {
		s := newFixture(t).store
		const turns = 100
		var wg sync.WaitGroup
		errs := make(chan error, turns)
		for i := 0; i < turns; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := s.Append(ctx, session, Turn{Messages: qa(i), NowMs: t0 + int64(i), Usage: Usage{Requests: 1}}, Policy{IdleTimeout: time.Hour})
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			mustNoErr(t, err)
		}
		msgs, err := s.Messages(ctx, session, "")
		mustNoErr(t, err)
		if len(msgs) != 2*turns {
			t.Fatalf("got %d messages, want %d", len(msgs), 2*turns)
		}
		seen := map[string]bool{}
		for j := 0; j < len(msgs); j += 2 {
			q, a := msgs[j].Content, msgs[j+1].Content
			if !strings.HasPrefix(q, "q") || a != "a"+q[1:] {
				t.Fatalf("messages %d and %d: got %q, %q, want a question and its answer", j, j+1, q, a)
			}
			seen[q] = true
		}
		if len(seen) != turns {
			t.Errorf("got %d distinct turns, want %d", len(seen), turns)
		}
		ids := make([]string, len(msgs))
		for i, m := range msgs {
			ids[i] = m.ID
		}
		checkIncreasingIDs(t, ids)
		sess, _, err := s.Session(ctx, session)
		mustNoErr(t, err)
		if sess.MessageCount != 2*turns || sess.Totals.Requests != turns || sess.LastActiveMs != t0+turns-1 {
			t.Errorf("got session %+v, want %d messages, %d requests, last active %d", sess, 2*turns, turns, t0+turns-1)
		}
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		if len(convs) != 1 {
			t.Errorf("got conversations %q, want one", convIDs(convs))
		}
	})

	t.Run("sessions most recently active first", func(t *testing.T) {
		s := newFixture(t).store
		list := func() []string {
			t.Helper()
			return sessionIDs(t, s, SessionQuery{})
		}
		appendQA(t, s, "a", 0, t0+1, Policy{})
		appendQA(t, s, "b", 0, t0+3, Policy{})
		appendQA(t, s, "c", 0, t0+2, Policy{})
		steps := []struct {
			name string
			do   func()
			want []string
		}{
			{name: "by last activity", do: func() {}, want: []string{"b", "c", "a"}},
			{name: "activity moves a session up", do: func() { appendQA(t, s, "a", 1, t0+4, Policy{}) }, want: []string{"a", "b", "c"}},
			{name: "an older turn does not move it down", do: func() { appendQA(t, s, "a", 2, t0, Policy{}) }, want: []string{"a", "b", "c"}},
			{name: "usage-only turn is not activity", do: func() {
				_, err := s.Append(ctx, "c", Turn{NowMs: t0 + 10, Usage: Usage{Requests: 1}}, Policy{})
				mustNoErr(t, err)
			}, want: []string{"a", "b", "c"}},
			{name: "usage-only new session is listed", do: func() {
				_, err := s.Append(ctx, "d", Turn{NowMs: t0, Usage: Usage{Requests: 1}}, Policy{})
				mustNoErr(t, err)
			}, want: []string{"a", "b", "c", "d"}},
			{name: "erase removes it", do: func() {
				_, err := s.Erase(ctx, "b")
				mustNoErr(t, err)
			}, want: []string{"a", "c", "d"}},
		}
		for _, st := range steps {
			st.do()
			if got := list(); !reflect.DeepEqual(got, st.want) {
				t.Errorf("%s: got %q, want %q", st.name, got, st.want)
			}
		}
		pages := []struct {
			limit int
			want  [][]string
		}{
			{limit: 2, want: [][]string{{"a", "c"}, {"d"}}},
			{limit: 1, want: [][]string{{"a"}, {"c"}, {"d"}}},
			{limit: 3, want: [][]string{{"a", "c", "d"}}},
			{limit: 0, want: [][]string{{"a", "c", "d"}}},
			// offset+limit once overflowed on Redis and listed nothing.
			{limit: math.MaxInt, want: [][]string{{"a", "c", "d"}}},
		}
		for _, pg := range pages {
			got := pageIDs(t, s, SessionQuery{Limit: pg.limit})
			if !reflect.DeepEqual(got, pg.want) {
				t.Errorf("limit %d: got pages %q, want %q", pg.limit, got, pg.want)
			}
		}
	})

	t.Run("retention", func(t *testing.T) {
		f := newFixture(t)
		p := Policy{Retention: time.Hour}
		res := appendQA(t, f.store, session, 0, t0, p)
		f.checkRetention(t, session, res.ConversationID, time.Hour)
		// The expired conversation is not refilled: the next turn starts
		// c2, so an audit never sees a c1 that lost its beginning.
		res = appendQA(t, f.store, session, 1, t0+time.Hour.Milliseconds(), p)
		if !res.NewConversation || res.ConversationID != "c2" {
			t.Errorf("after expiry: got %+v, want a new conversation c2", res)
		}
		// Nor when a turn names it: it was read before it expired.
		f.checkRetention(t, session, res.ConversationID, time.Hour)
		res, err := f.store.Append(ctx, session, Turn{Messages: qa(2), NowMs: t0 + 2*time.Hour.Milliseconds(), ConversationID: "c2"}, p)
		mustNoErr(t, err)
		if !res.NewConversation || res.ConversationID != "c3" {
			t.Errorf("named after expiry: got %+v, want a new conversation c3", res)
		}
	})

	t.Run("empty session id", func(t *testing.T) {
		s := newFixture(t).store
		_, err := s.Append(ctx, "", Turn{Messages: qa(0), NowMs: t0}, Policy{})
		if !errors.Is(err, ErrEmptySession) {
			t.Errorf("append: got %v, want ErrEmptySession", err)
		}
		_, err = s.Window(ctx, "", 10, t0, Policy{})
		if !errors.Is(err, ErrEmptySession) {
			t.Errorf("window: got %v, want ErrEmptySession", err)
		}
	})

	t.Run("ping", func(t *testing.T) {
		mustNoErr(t, newFixture(t).store.Ping(ctx))
	})

	testAdminConformance(t, newFixture)
	testSummaryConformance(t, newFixture)
}

func TestMemoryStore(t *testing.T) {
	testConformance(t, func(t *testing.T) fixture {
		clock := &fakeClock{t: time.UnixMilli(t0)}
		s := NewMemory()
		s.now = clock.Now
		return fixture{
			store: s,
			advance: func(t *testing.T, d time.Duration) {
				clock.Add(d)
				s.Sweep()
			},
			held: func(t *testing.T) (int, int) {
				st := s.Stats()
				return st.Messages, st.IdempotencyKeys
			},
			checkRetention: func(t *testing.T, session, conv string, d time.Duration) {
				ctx := context.Background()
				clock.Add(d - time.Millisecond)
				msgs, err := s.Messages(ctx, session, conv)
				mustNoErr(t, err)
				if len(msgs) == 0 {
					t.Fatalf("just before retention: got no messages, want them kept")
				}
				clock.Add(time.Millisecond)
				msgs, err = s.Messages(ctx, session, conv)
				mustNoErr(t, err)
				if len(msgs) != 0 {
					t.Errorf("after retention: got %q, want none", contents(msgs))
				}
				w, err := s.Window(ctx, session, 10, t0, Policy{})
				mustNoErr(t, err)
				if len(w.Messages) != 0 {
					t.Errorf("window after retention: got %q, want none", contents(w.Messages))
				}
			},
		}
	})
}

// fakeClock is a wall clock that moves only when told.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// qa is turn i: a question and its answer.
func qa(i int) []Message {
	return []Message{
		{Role: RoleUser, Content: fmt.Sprintf("q%d", i), Tokens: 5},
		{Role: RoleAssistant, Content: fmt.Sprintf("a%d", i), Tokens: 7},
	}
}

func appendQA(t *testing.T, s store, session string, i int, nowMs int64, p Policy) AppendResult {
	t.Helper()
	res, err := s.Append(context.Background(), session, Turn{Messages: qa(i), NowMs: nowMs}, p)
	mustNoErr(t, err)
	if res.Duplicate || len(res.IDs) != 2 {
		t.Fatalf("append turn %d: got %+v, want two new ids", i, res)
	}
	return res
}

// sessionIDs lists the ids of every session q selects, in one page.
func sessionIDs(t *testing.T, s store, q SessionQuery) []string {
	t.Helper()
	q.Limit = 0
	page, err := s.Sessions(context.Background(), q)
	mustNoErr(t, err)
	var ids []string
	for _, ss := range page.Sessions {
		ids = append(ids, ss.ID)
	}
	if page.NextCursor != "" {
		t.Errorf("one page of everything: got next cursor %q, want none", page.NextCursor)
	}
	if page.Total != int64(len(ids)) {
		t.Errorf("got total %d, want %d (the sessions listed)", page.Total, len(ids))
	}
	return ids
}

// pageIDs follows the cursor through every page of q and gives each
// page's ids; every page must report the same total.
func pageIDs(t *testing.T, s store, q SessionQuery) [][]string {
	t.Helper()
	var (
		pages [][]string
		n     int
		total int64 = -1
	)
	for {
		page, err := s.Sessions(context.Background(), q)
		mustNoErr(t, err)
		var ids []string
		for _, ss := range page.Sessions {
			ids = append(ids, ss.ID)
		}
		pages = append(pages, ids)
		n += len(ids)
		if total >= 0 && page.Total != total {
			t.Errorf("page %d: got total %d, want %d as on the first page", len(pages), page.Total, total)
		}
		total = page.Total
		if page.NextCursor == "" {
			break
		}
		if len(pages) > 100 {
			t.Fatalf("more than 100 pages")
		}
		q.Cursor = page.NextCursor
	}
	return pages
}

func strconvI(i int) string { return strconv.Itoa(i) }

func convIDs(cs []Conversation) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.ID)
	}
	return out
}

func contents(ms []Message) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.Content)
	}
	return out
}

func mustNoErr(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func checkMessages(t *testing.T, got, want []Message) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d messages, want %d", len(got), len(want))
	}
	for i := range want {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Errorf("message %d:\ngot  %s\nwant %s", i, showMessage(got[i]), showMessage(want[i]))
		}
	}
}

func showMessage(m Message) string {
	parts, calls := m.Parts, m.ToolCalls
	m.Parts, m.ToolCalls = nil, nil
	return fmt.Sprintf("%+v Parts=%q ToolCalls=%q", m, parts, calls)
}

// checkIncreasingIDs checks that ids are in stream order, "ms-seq".
func checkIncreasingIDs(t *testing.T, ids []string) {
	t.Helper()
	parse := func(id string) (int64, int64) {
		ms, seq, ok := strings.Cut(id, "-")
		a, err1 := strconv.ParseInt(ms, 10, 64)
		b, err2 := strconv.ParseInt(seq, 10, 64)
		if !ok || err1 != nil || err2 != nil {
			t.Fatalf("got id %q, want ms-seq", id)
		}
		return a, b
	}
	for i := 1; i < len(ids); i++ {
		ams, aseq := parse(ids[i-1])
		bms, bseq := parse(ids[i])
		if bms < ams || (bms == ams && bseq <= aseq) {
			t.Fatalf("ids %d and %d: got %q after %q, want increasing", i-1, i, ids[i], ids[i-1])
		}
	}
}

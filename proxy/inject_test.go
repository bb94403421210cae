package proxy

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
)

// at builds stored messages for arrange from a compact notation, one word
// per message: "u:text" (user), "a:text" (assistant), "c:id1,id2" (an
// assistant message calling tools), "ct:id:text" (a call with text),
// "ci:id" (an incomplete call), "t:id" (a tool result). A suffix "@user"
// sets the message's user and "#key" its idempotency key.
func at(spec string) []history.Message {
	var out []history.Message
	for _, w := range strings.Fields(spec) {
		var m history.Message
		if k := strings.LastIndex(w, "#"); k >= 0 {
			w, m.IdempotencyKey = w[:k], w[k+1:]
		}
		if k := strings.LastIndex(w, "@"); k >= 0 {
			w, m.User = w[:k], w[k+1:]
		}
		kind, rest, _ := strings.Cut(w, ":")
		calls := func(ids string) json.RawMessage {
			var cs []map[string]any
			for id := range strings.SplitSeq(ids, ",") {
				cs = append(cs, map[string]any{"id": id, "type": "function", "function": map[string]any{"name": "f", "arguments": "{}"}})
			}
			b, _ := json.Marshal(cs)
			return b
		}
		switch kind {
		case "u":
			m.Role, m.Content = history.RoleUser, rest
		case "a":
			m.Role, m.Content = history.RoleAssistant, rest
		case "c", "ci":
			m.Role, m.ContentNull, m.ToolCalls = history.RoleAssistant, true, calls(rest)
			if kind == "ci" {
				m.Status = history.StatusIncomplete
			}
		case "ct":
			id, text, _ := strings.Cut(rest, ":")
			m.Role, m.Content, m.ToolCalls = history.RoleAssistant, text, calls(id)
		case "t":
			m.Role, m.ToolCallID, m.Content = history.RoleTool, rest, "r"
		default:
			panic("bad spec " + w)
		}
		out = append(out, m)
	}
	return out
}

// show writes messages back in the notation of at (without users and keys).
func show(ms []history.Message) string {
	var out []string
	for _, m := range ms {
		switch {
		case m.Role == history.RoleTool:
			out = append(out, "t:"+m.ToolCallID)
		case m.ToolCalls != nil:
			w := "c:" + strings.Join(history.ToolCallIDs(m.ToolCalls), ",")
			if m.Content != "" {
				w = "ct:" + strings.Join(history.ToolCallIDs(m.ToolCalls), ",") + ":" + m.Content
			}
			out = append(out, w)
		case m.Role == history.RoleUser:
			out = append(out, "u:"+m.Content)
		default:
			out = append(out, "a:"+m.Content)
		}
	}
	return strings.Join(out, " ")
}

func TestArrange(t *testing.T) {
	tests := []struct {
		name     string
		window   string
		answer   answer
		want     string
		answered bool
		dropped  bool
	}{
		{name: "plain turns", window: "u:1 a:1 u:2 a:2", want: "u:1 a:1 u:2 a:2"},
		{name: "a whole step", window: "u:1 c:x,y t:y t:x a:1", want: "u:1 c:x,y t:y t:x a:1"},
		{name: "an unanswered call is left out", window: "u:1 c:x u:2 a:2", want: "u:1 u:2 a:2", dropped: true},
		{name: "an unanswered call keeps its text", window: "u:1 ct:x:hm u:2", want: "u:1 a:hm u:2"},
		{name: "an incomplete call is left out with its results", window: "u:1 ci:x t:x a:1", want: "u:1 a:1", dropped: true},
		{name: "a call half answered is left out", window: "u:1 c:x,y t:x a:1", want: "u:1 a:1", dropped: true},
		{name: "results whose call is out of the window", window: "t:x t:y a:1 u:2 a:2", want: "a:1 u:2 a:2", dropped: true},
		{name: "a result given twice is injected once", window: "u:1 c:x t:x t:x a:1", want: "u:1 c:x t:x a:1", dropped: true},
		{
			name:   "reused ids: an older result does not answer an abandoned call",
			window: "u:1 c:call_0 t:call_0 a:1 u:2 c:call_0 u:3 a:3",
			want:   "u:1 c:call_0 t:call_0 a:1 u:2 u:3 a:3", dropped: true,
		},
		{
			name:   "reused ids: each step answered in place",
			window: "u:1 c:call_0 t:call_0 c:call_0 t:call_0 a:1",
			want:   "u:1 c:call_0 t:call_0 c:call_0 t:call_0 a:1",
		},
		{
			name:   "the answered call is last: nothing moves",
			window: "u:1 a:1 u:2 c:x", answer: answer{results: []string{"x"}},
			want: "u:1 a:1 u:2 c:x", answered: true,
		},
		{
			name:   "the answered call and its question move just before the results",
			window: "u:q@alice c:w@alice u:hi@bob a:hi@bob", answer: answer{results: []string{"w"}, user: "alice"},
			want: "u:hi a:hi u:q c:w", answered: true,
		},
		{
			name:   "a turn of several steps moves whole",
			window: "u:q@alice c:s@alice t:s@alice c:w@alice u:hi@bob a:hi@bob", answer: answer{results: []string{"w"}, user: "alice"},
			want: "u:hi a:hi u:q c:s t:s c:w", answered: true,
		},
		{
			name:   "stored results recorded after other turns pair with their call",
			window: "u:b@bob c:B@bob u:a@alice c:A@alice t:B@bob a:b@bob t:A@alice a:a@alice u:next@bob a:next@bob",
			want:   "u:b c:B t:B a:b u:a c:A t:A a:a u:next a:next",
		},
		{
			name:   "reused ids in a shared conversation: the request's user's call",
			window: "u:qa@alice c:call_0@alice u:qb@bob c:call_0@bob", answer: answer{results: []string{"call_0"}, user: "alice"},
			want: "u:qb u:qa c:call_0", answered: true, dropped: true,
		},
		{
			name:   "a retry gets the context of its first attempt",
			window: "u:1 c:x t:x#k a:1#k u:2 a:2", answer: answer{results: []string{"x"}, key: "k"},
			want: "u:1 c:x", answered: true,
		},
		{
			name:   "a retried question does not see its own first answer",
			window: "u:1 a:1 u:2#k a:2#k", answer: answer{key: "k"},
			want: "u:1 a:1",
		},
		{
			name:   "results sent again without a key: the history up to their call",
			window: "u:1 c:x t:x a:1 u:2 a:2", answer: answer{results: []string{"x"}},
			want: "u:1 c:x", answered: true, dropped: true,
		},
		{
			name:   "results sent again without a key, reused ids: a newer call that shares an id is not theirs",
			window: "u:1 c:call_0 t:call_0 c:call_0,call_1", answer: answer{results: []string{"call_0"}},
			want: "u:1 c:call_0", answered: true, dropped: true,
		},
		{
			name:   "reused ids: results answer the open call whose ids they cover, not a newer one they half answer",
			window: "u:q@a c:call_0@a u:p@a c:call_0,call_1@a", answer: answer{results: []string{"call_0"}, user: "a"},
			want: "u:p u:q c:call_0", answered: true, dropped: true,
		},
		{
			name:   "a long loop: the window starts inside it",
			window: "t:x0 c:x1 t:x1 c:x2 t:x2 c:x3", answer: answer{results: []string{"x3"}},
			want: "c:x1 t:x1 c:x2 t:x2 c:x3", answered: true, dropped: true,
		},
		{
			name:   "results that answer no call",
			window: "u:1 a:1", answer: answer{results: []string{"x"}},
			want: "u:1 a:1",
		},
		{
			name:   "an incomplete call is not answered by the request",
			window: "u:1 ci:x", answer: answer{results: []string{"x"}},
			want: "u:1", dropped: true,
		},
		{name: "empty window", window: "", answer: answer{results: []string{"x"}}, want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			window := at(tt.window)
			before := fmt.Sprint(window)
			got, answered, dropped := arrange(window, tt.answer)
			if s := show(got); s != tt.want {
				t.Errorf("got %q, want %q", s, tt.want)
			}
			if answered != tt.answered || dropped != tt.dropped {
				t.Errorf("got answered %v dropped %v, want %v and %v", answered, dropped, tt.answered, tt.dropped)
			}
			if fmt.Sprint(window) != before {
				t.Error("arrange changed the window it was given")
			}
		})
	}
}

// TestArrangeIsValid checks, over many windows, that what arrange returns
// followed by the request's results is what the API accepts: each call
// followed right away by a result for each of its ids, and no other result.
func TestArrangeIsValid(t *testing.T) {
	words := []string{"u:q@a", "u:q@b", "a:x", "c:i@a", "c:j@b", "c:i,j@a", "t:i@a", "t:j@b", "t:i@b", "ci:i@a"}
	checked := 0
	check := func(window []string) {
		t.Helper()
		for _, res := range [][]string{nil, {"i"}, {"j"}, {"i", "j"}} {
			for _, user := range []string{"a", "b"} {
				ms, answered, _ := arrange(at(strings.Join(window, " ")), answer{results: res, user: user})
				if err := validOrder(ms, res, answered); err != nil {
					t.Fatalf("window %q, results %q of %s: got %q: %v", window, res, user, show(ms), err)
				}
				checked++
			}
		}
	}
	// Every window of up to 3 messages, then longer ones at random (with a
	// fixed seed, so a failure repeats).
	var window []string
	var walk func(n int)
	walk = func(n int) {
		check(window)
		if n == 0 {
			return
		}
		for _, w := range words {
			window = append(window, w)
			walk(n - 1)
			window = window[:len(window)-1]
		}
	}
	walk(3)
	rng := rand.New(rand.NewPCG(13, 13))
	for range 600 {
		window = window[:0]
		for range 4 + rng.IntN(5) {
			window = append(window, words[rng.IntN(len(words))])
		}
		check(window)
	}
	if checked < 10000 {
		t.Fatalf("checked %d windows, want many", checked)
	}
}

// validOrder checks ms plus the request's results against the API's two
// rules on tool messages; results are appended only when answered.
func validOrder(ms []history.Message, results []string, answered bool) error {
	all := append([]history.Message(nil), ms...)
	if answered {
		for _, id := range results {
			all = append(all, history.Message{Role: history.RoleTool, ToolCallID: id})
		}
	}
	var open map[string]bool
	for i, m := range all {
		if m.Role == history.RoleTool {
			if !open[m.ToolCallID] {
				return fmt.Errorf("message %d: a result that answers no call just before it", i)
			}
			delete(open, m.ToolCallID)
			continue
		}
		if len(open) > 0 {
			return fmt.Errorf("message %d: a call before it is not answered", i)
		}
		open = nil
		if m.ToolCalls != nil {
			open = map[string]bool{}
			for _, id := range history.ToolCallIDs(m.ToolCalls) {
				open[id] = true
			}
		}
	}
	if len(open) > 0 && !answered {
		return fmt.Errorf("the last call is not answered")
	}
	if len(open) > 0 {
		return fmt.Errorf("the request's results leave a call unanswered")
	}
	return nil
}

// BenchmarkArrange: arrange a 20-message window of plain turns, and one
// with a tool step answered by the request.
func BenchmarkArrange(b *testing.B) {
	plain := at(strings.Repeat("u:q a:a ", 10))
	tools := at(strings.Repeat("u:q a:a ", 7) + "u:q c:x t:x a:a u:q c:y")
	for _, bc := range []struct {
		name   string
		window []history.Message
		a      answer
	}{
		{"plain", plain, answer{key: "k"}},
		{"tools", tools, answer{results: []string{"y"}, key: "k"}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				msgs, _, _ := arrange(bc.window, bc.a)
				if len(msgs) == 0 {
					b.Fatal("nothing arranged")
				}
			}
		})
	}
}

// TestArrangeWithoutToolsCopiesNothing: a window without tool calls or
// results, for a request with no results, is injected as it is, and its
// messages are not copied (14 KB a request for 20 messages).
func TestArrangeWithoutToolsCopiesNothing(t *testing.T) {
	window := at("u:1 a:1 u:2 a:2 u:3 a:3")
	for _, key := range []string{"", "k"} {
		got, answered, dropped := arrange(window, answer{key: key, user: "alice"})
		require.Equal(t, show(window), show(got))
		require.False(t, answered)
		require.False(t, dropped)
		require.Zero(t, testing.AllocsPerRun(10, func() { arrange(window, answer{key: key}) }))
	}
	// With tools, the pairing still runs.
	got, _, dropped := arrange(at("u:1 c:x u:2 a:2"), answer{})
	require.Equal(t, "u:1 u:2 a:2", show(got))
	require.True(t, dropped)
}

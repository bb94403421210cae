package history

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// msg builds a message for Select: role, content and tokens are all it
// looks at (plus Kind for summaries).
func msg(role, content string, tokens int) Message {
	return Message{Role: role, Content: content, Tokens: tokens}
}

func TestSelect(t *testing.T) {
	toolCall := Message{Role: RoleAssistant, ContentNull: true, Kind: KindToolCall, Content: "call", Tokens: 10,
		ToolCalls: json.RawMessage(`[{"id":"1"},{"id":"2"}]`)}
	// Turn 1 (20 tokens), turn 2 with tool calls (5+10+8+8+6 = 37 tokens),
	// turn 3 (12 tokens).
	conversation := []Message{
		msg(RoleUser, "u1", 10), msg(RoleAssistant, "a1", 10),
		msg(RoleUser, "u2", 5), toolCall, msg(RoleTool, "r1", 8), msg(RoleTool, "r2", 8), msg(RoleAssistant, "a2", 6),
		msg(RoleUser, "u3", 6), msg(RoleAssistant, "a3", 6),
	}
	tests := []struct {
		name          string
		window        []Message
		limits        Limits
		want          []string
		wantTokens    int
		wantTruncated bool
	}{
		{
			name:   "no limits takes everything",
			window: conversation,
			want:   []string{"u1", "a1", "u2", "call", "r1", "r2", "a2", "u3", "a3"}, wantTokens: 69,
		},
		{
			name:   "everything fits exactly",
			window: conversation, limits: Limits{MaxTokens: 69, MaxMessages: 9},
			want: []string{"u1", "a1", "u2", "call", "r1", "r2", "a2", "u3", "a3"}, wantTokens: 69,
		},
		{
			name:   "limit by tokens",
			window: conversation, limits: Limits{MaxTokens: 68},
			want: []string{"u2", "call", "r1", "r2", "a2", "u3", "a3"}, wantTokens: 49, wantTruncated: true,
		},
		{
			name:   "limit by messages",
			window: conversation, limits: Limits{MaxMessages: 8},
			want: []string{"u2", "call", "r1", "r2", "a2", "u3", "a3"}, wantTokens: 49, wantTruncated: true,
		},
		{
			name:   "tool-call group is kept whole or not at all",
			window: conversation, limits: Limits{MaxTokens: 48},
			want: []string{"u3", "a3"}, wantTokens: 12, wantTruncated: true,
		},
		{
			name:   "tool-call group is not split by a message limit",
			window: conversation, limits: Limits{MaxMessages: 6},
			want: []string{"u3", "a3"}, wantTokens: 12, wantTruncated: true,
		},
		{
			name: "a group that does not fit ends the selection",
			// The middle turn is too big; the oldest one would fit in what
			// is left, but taking it would leave a hole.
			window: []Message{
				msg(RoleUser, "u1", 1), msg(RoleAssistant, "a1", 1),
				msg(RoleUser, "u2", 50), msg(RoleAssistant, "a2", 50),
				msg(RoleUser, "u3", 5), msg(RoleAssistant, "a3", 5),
			},
			limits: Limits{MaxTokens: 20},
			want:   []string{"u3", "a3"}, wantTokens: 10, wantTruncated: true,
		},
		{
			name:   "newest turn alone too big",
			window: conversation, limits: Limits{MaxTokens: 11},
			want: nil, wantTokens: 0, wantTruncated: true,
		},
		{
			name:   "newest turn alone has too many messages",
			window: conversation, limits: Limits{MaxMessages: 1},
			want: nil, wantTokens: 0, wantTruncated: true,
		},
		{
			name:   "window starting with tool results drops the partial turn",
			window: conversation[4:],
			want:   []string{"u3", "a3"}, wantTokens: 12, wantTruncated: true,
		},
		{
			name:   "window starting with an assistant message drops it",
			window: conversation[1:],
			want:   []string{"u2", "call", "r1", "r2", "a2", "u3", "a3"}, wantTokens: 49, wantTruncated: true,
		},
		{
			name:   "window without any user message",
			window: []Message{toolCall, msg(RoleTool, "r1", 8), msg(RoleAssistant, "a", 3)},
			want:   nil, wantTokens: 0, wantTruncated: true,
		},
		{
			name: "a summary starts a group",
			window: []Message{
				msg(RoleAssistant, "a0", 3),
				{Role: RoleSystem, Kind: KindSummary, Content: "summary", Tokens: 30},
				msg(RoleAssistant, "a1", 3),
				msg(RoleUser, "u2", 2), msg(RoleAssistant, "a2", 2),
			},
			want: []string{"summary", "a1", "u2", "a2"}, wantTokens: 37, wantTruncated: true,
		},
		{
			name:   "empty window",
			window: nil, limits: Limits{MaxTokens: 100, MaxMessages: 10},
			want: nil, wantTokens: 0, wantTruncated: false,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Select(tt.window, tt.limits)
			if c := contents(got.Messages); !reflect.DeepEqual(c, tt.want) {
				t.Errorf("got messages %q, want %q", c, tt.want)
			}
			if got.Tokens != tt.wantTokens {
				t.Errorf("got %d tokens, want %d", got.Tokens, tt.wantTokens)
			}
			if got.Truncated != tt.wantTruncated {
				t.Errorf("got truncated %v, want %v", got.Truncated, tt.wantTruncated)
			}
			if len(got.Messages) > 0 && got.Messages[0].Role != RoleUser && got.Messages[0].Kind != KindSummary {
				t.Errorf("selection starts with a %s message, want user or summary", got.Messages[0].Role)
			}
		})
	}
}

func BenchmarkSelect(b *testing.B) {
	content := strings.Repeat("word ", 40)
	window := make([]Message, 0, 20)
	for len(window) < 20 {
		window = append(window, msg(RoleUser, content, 50), msg(RoleAssistant, content, 50))
	}
	l := Limits{MaxTokens: 700, MaxMessages: 16}
	b.ReportAllocs()
	for b.Loop() {
		sel := Select(window, l)
		if len(sel.Messages) != 14 {
			b.Fatalf("got %d messages, want 14", len(sel.Messages))
		}
	}
}

func TestSelectToolSteps(t *testing.T) {
	call := func(id string) Message {
		m := msg(RoleAssistant, "", 5)
		m.ToolCalls = []byte(`[{"id":"` + id + `","type":"function","function":{"name":"f","arguments":"{}"}}]`)
		return m
	}
	result := func(id string) Message { m := msg(RoleTool, "ok", 5); m.ToolCallID = id; return m }
	// A loop whose user message is out of the window: without ToolSteps
	// nothing can be selected; with it, whole steps from the newest back.
	window := []Message{result("c0"), call("c1"), result("c1"), call("c2"), result("c2"), call("c3")}
	if got := Select(window, Limits{MaxMessages: 6}); len(got.Messages) != 0 {
		t.Fatalf("got %d messages without ToolSteps, want 0", len(got.Messages))
	}
	got := Select(window, Limits{MaxMessages: 6, MaxTokens: 15, ToolSteps: true})
	if len(got.Messages) != 3 || got.Messages[0].ToolCalls == nil || got.Tokens != 15 || !got.Truncated {
		t.Fatalf("got %d messages (%d tokens, truncated %v), want the last 3 starting at a call", len(got.Messages), got.Tokens, got.Truncated)
	}
	// A user message within reach still starts the selection there.
	window = append([]Message{msg(RoleUser, "go", 5)}, window[1:]...)
	got = Select(window, Limits{MaxMessages: 6, ToolSteps: true})
	if len(got.Messages) != 6 || got.Messages[0].Role != RoleUser {
		t.Fatalf("got %d messages starting with %s, want all 6 from the user message", len(got.Messages), got.Messages[0].Role)
	}
}

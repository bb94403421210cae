package proxy

import (
	"fmt"
	"testing"

	"github.com/historyproxy/historyproxy/history"
)

// TestFitSummary: the summary and the recent turns share the budget; the
// older recent turns yield to the summary, and the summary yields to the
// newest turn.
func TestFitSummary(t *testing.T) {
	// Three turns of 10 tokens each (user 4, assistant 6), q0..q2.
	var msgs []history.Message
	for i := range 3 {
		msgs = append(msgs,
			history.Message{Role: history.RoleUser, Content: fmt.Sprintf("q%d", i), Tokens: 4},
			history.Message{Role: history.RoleAssistant, Content: fmt.Sprintf("a%d", i), Tokens: 6})
	}
	sum := &history.Message{Role: history.RoleSystem, Kind: history.KindSummary, Content: "S", Tokens: 15}
	for _, c := range []struct {
		name    string
		msgs    []history.Message
		limits  history.Limits
		summary *history.Message
		want    string // the injected history, summary first
	}{
		{"no summary", msgs, history.Limits{MaxTokens: 100, MaxMessages: 20}, nil, "[q0 a0 q1 a1 q2 a2]"},
		{"room for all", msgs, history.Limits{MaxTokens: 45, MaxMessages: 20}, sum, "[S q0 a0 q1 a1 q2 a2]"},
		{"older turns yield to it", msgs, history.Limits{MaxTokens: 40, MaxMessages: 20}, sum, "[S q1 a1 q2 a2]"},
		{"older turns yield, max_messages", msgs, history.Limits{MaxTokens: 100, MaxMessages: 4}, sum, "[S q2 a2]"},
		{"only the newest turn left", msgs, history.Limits{MaxTokens: 25, MaxMessages: 20}, sum, "[S q2 a2]"},
		{"it yields to the newest turn", msgs, history.Limits{MaxTokens: 24, MaxMessages: 20}, sum, "[q1 a1 q2 a2]"},
		{"larger than the budget", msgs, history.Limits{MaxTokens: 14, MaxMessages: 20}, sum, "[q2 a2]"},
		{"max_messages of one", msgs, history.Limits{MaxTokens: 100, MaxMessages: 1}, sum, "[]"},
		{"alone", nil, history.Limits{MaxTokens: 100, MaxMessages: 20}, sum, "[S]"},
		{"alone, too large", nil, history.Limits{MaxTokens: 10, MaxMessages: 20}, sum, "[]"},
	} {
		t.Run(c.name, func(t *testing.T) {
			sel, with := fitSummary(c.msgs, c.limits, c.summary, false)
			var got []string
			tokens := 0
			if with {
				got = append(got, c.summary.Content)
				tokens += c.summary.Tokens
			}
			for _, m := range sel.Messages {
				got = append(got, m.Content)
				tokens += m.Tokens
			}
			if fmt.Sprint(got) != c.want {
				t.Errorf("got %v, want %s", got, c.want)
			}
			if c.limits.MaxTokens > 0 && tokens > c.limits.MaxTokens {
				t.Errorf("%d tokens injected, over the budget of %d", tokens, c.limits.MaxTokens)
			}
		})
	}
}

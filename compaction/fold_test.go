package compaction

import (
	"testing"

	"github.com/historyproxy/historyproxy/history"
)

// TestFold: how many messages a compaction folds, down to the target,
// never into the newest keep user turns, at a user turn's start, and
// never parting a tool call from its results (or from results still to
// come).
func TestFold(t *testing.T) {
	u := func(user string) history.Message {
		return history.Message{Role: history.RoleUser, User: user, Content: "q", Tokens: 5}
	}
	a := func(user string) history.Message {
		return history.Message{Role: history.RoleAssistant, User: user, Content: "a", Tokens: 5}
	}
	call := func(user, id string) history.Message {
		return history.Message{Role: history.RoleAssistant, User: user, ToolCalls: []byte(`[{"id":"` + id + `","type":"function","function":{"name":"f","arguments":"{}"}}]`), Tokens: 5}
	}
	res := func(user, id string) history.Message {
		return history.Message{Role: history.RoleTool, User: user, ToolCallID: id, Content: "r", Tokens: 5}
	}
	type M = []history.Message
	cases := []struct {
		name         string
		msgs         M
		target, keep int
		want         int
	}{
		{"plain, keep 1", M{u("j"), a("j"), u("j"), a("j"), u("j"), a("j")}, 0, 1, 4},
		{"plain, target 3 ends at a user turn", M{u("j"), a("j"), u("j"), a("j"), u("j"), a("j")}, 3, 0, 2},
		{"plain, keep 0 folds all", M{u("j"), a("j"), u("j"), a("j")}, 0, 0, 4},
		{"fewer user turns than keep", M{u("j"), a("j")}, 0, 2, 0},
		{"answered call folds with its results", M{u("j"), call("j", "c1"), res("j", "c1"), a("j")}, 0, 0, 4},
		{"pending call, keep 0", M{u("j"), a("j"), u("j"), call("j", "c1")}, 0, 0, 2},
		{"pending call only", M{u("j"), call("j", "c1")}, 0, 0, 0},
		{"call abandoned: its user spoke again", M{u("j"), call("j", "c1"), u("j"), a("j")}, 0, 0, 4},
		{"shared: others spoke before the results came", M{u("al"), call("al", "c1"), u("bo"), a("bo"), u("cy"), a("cy")}, 0, 2, 0},
		{"shared: others spoke, then the results came", M{u("al"), call("al", "c1"), u("bo"), a("bo"), res("al", "c1"), a("al"), u("bo"), a("bo")}, 0, 2, 0},
		{"shared: keep 1 folds the call with its late results", M{u("al"), call("al", "c1"), u("bo"), a("bo"), res("al", "c1"), a("al"), u("bo"), a("bo")}, 0, 1, 6},
		{"shared: another user speaking does not abandon a call", M{u("al"), call("al", "c1"), u("bo"), a("bo"), u("bo"), a("bo")}, 0, 1, 0},
		{"reused id: the result answers its own user's call", M{u("bo"), call("bo", "call_0"), u("al"), call("al", "call_0"), res("bo", "call_0"), a("bo"), u("bo"), a("bo")}, 0, 1, 0},
	}
	w := New(Options{FoldTokens: 1000})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := w.fold(tc.msgs, tc.target, tc.keep); got != tc.want {
				t.Errorf("fold: got %d, want %d", got, tc.want)
			}
		})
	}
}

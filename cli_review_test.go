package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"unicode"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestCommandsPrintNoControlCharacters: what users and models wrote
// reaches the operator's terminal through sessions and transcript; an
// escape sequence in it (a title change, a cleared screen, a hyperlink,
// text hidden by a cursor move) is shown, not obeyed.
func TestCommandsPrintNoControlCharacters(t *testing.T) {
	rs := redistest.Start(t)
	ctx := context.Background()
	s := history.NewRedis(rs.Client(t), "")
	const id = "web:eve:support"
	evil := "hello\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\rover\tthere"
	_, err := s.Append(ctx, id, history.Turn{Messages: []history.Message{
		{Role: history.RoleUser, Content: evil},
		{Role: history.RoleAssistant, ContentNull: true, ToolCalls: json.RawMessage(`[{"id":"call_\u001b[1m","type":"function","function":{"name":"f\u001b[8m","arguments":"{\"a\":\"\u001b]8;;http://x\u0007\"}"}}]`)},
		{Role: history.RoleTool, ToolCallID: "call_\x1b[1m", Content: "result\x1b[0m"},
		{Role: history.RoleAssistant, Refusal: "no\x1b[5m"},
	}}, history.Policy{})
	require.NoError(t, err)
	env := map[string]string{"HISTORYPROXY_REDIS_URL": rs.URL}
	for _, args := range [][]string{{"sessions"}, {"transcript", id}} {
		out, err := runCommand(t, env, args...)
		require.NoError(t, err)
		for _, line := range strings.Split(out, "\n") {
			for _, r := range line {
				if (unicode.IsControl(r) && r != '\t') || r == '\u202e' {
					t.Errorf("%s: a line holds %U: %q", args[0], r, line)
					break
				}
			}
		}
		require.Contains(t, out, `hello\x1b]0;owned`, args[0])
	}
}

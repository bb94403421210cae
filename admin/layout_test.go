package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"testing"

	"github.com/historyproxy/historyproxy/history"
)

// TestTimelineKindsAndStatuses: the timeline gives every message's kind
// and status the same on both stores, although the Redis store leaves out
// a kind its role and tool calls imply and a complete status (see
// history's encodeMessage): a call, its result, a cut reply, and a kind
// set against what role and calls imply.
func TestTimelineKindsAndStatuses(t *testing.T) {
	calls := json.RawMessage(`[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]`)
	msgs := []history.Message{
		{Role: history.RoleUser, Content: "weather?"},
		{Role: history.RoleAssistant, ContentNull: true, ToolCalls: calls},
		{Role: history.RoleTool, ToolCallID: "call_1", Content: "21"},
		{Role: history.RoleAssistant, Content: "It is", Status: history.StatusIncomplete},
		{Role: history.RoleAssistant, ToolCalls: calls, Kind: history.KindMessage},
	}
	want := "[user message complete] [assistant tool_call complete] [tool tool_result complete] " +
		"[assistant message incomplete] [assistant message complete]"
	eachStore(t, func(t *testing.T, s Store) {
		const id = "web:kim:support"
		if _, err := s.Append(context.Background(), id, history.Turn{Messages: msgs}, history.Policy{}); err != nil {
			t.Fatal(err)
		}
		srv := newTestAPI(t, s)
		var got struct {
			Items []struct{ Role, Kind, Status string }
		}
		if code := do(t, http.MethodGet, srv.URL+"/admin/v1/sessions/"+url.PathEscape(id)+"/timeline", nil, &got); code != http.StatusOK {
			t.Fatalf("timeline: got %d", code)
		}
		var seen string
		for i, it := range got.Items {
			if i > 0 {
				seen += " "
			}
			seen += fmt.Sprint([]string{it.Role, it.Kind, it.Status})
		}
		if seen != want {
			t.Errorf("timeline:\ngot  %s\nwant %s", seen, want)
		}
	})
}

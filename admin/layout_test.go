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

// TestImportEmptyToolCalls: an imported assistant message with
// "tool_calls": [] (as vLLM answers and some SDKs send) calls no tool: the
// timeline gives it kind message, with its array as sent. One with null
// content and only [] says nothing, and is refused as one without
// tool_calls is, storing nothing.
func TestImportEmptyToolCalls(t *testing.T) {
	eachStore(t, func(t *testing.T, s Store) {
		const id = "web:kim:support"
		srv := newTestAPI(t, s)
		u := srv.URL + "/admin/v1/sessions/" + url.PathEscape(id)
		body := map[string]any{"messages": []any{
			map[string]any{"role": "user", "content": "hi"},
			map[string]any{"role": "assistant", "content": "hello", "tool_calls": []any{}},
		}}
		if code := do(t, http.MethodPost, u+"/messages", body, nil); code != http.StatusCreated {
			t.Fatalf("import: got %d, want 201", code)
		}
		empty := map[string]any{"messages": []any{map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{}}}}
		var e struct{ Error struct{ Code, Param string } }
		if code := do(t, http.MethodPost, u+"/messages", empty, &e); code != http.StatusBadRequest || e.Error.Code != "missing_required_parameter" {
			t.Errorf("import of null content and []: got %d %+v, want 400 missing_required_parameter", code, e.Error)
		}
		var got struct {
			Items []struct {
				Role, Kind string
				ToolCalls  json.RawMessage `json:"tool_calls"`
			}
		}
		if code := do(t, http.MethodGet, u+"/timeline", nil, &got); code != http.StatusOK {
			t.Fatalf("timeline: got %d", code)
		}
		if len(got.Items) < 2 {
			t.Fatalf("timeline: got %d items, want 2", len(got.Items))
		}
		if a := got.Items[1]; a.Kind != history.KindMessage || string(a.ToolCalls) != "[]" {
			t.Errorf("imported reply: got kind %q tool_calls %s, want message []", a.Kind, a.ToolCalls)
		}
		if len(got.Items) != 2 {
			t.Errorf("timeline: got %d items, want 2 (the refused import stores nothing)", len(got.Items))
		}
	})
}

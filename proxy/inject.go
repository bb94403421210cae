package proxy

import (
	"encoding/json"

	"github.com/historyproxy/historyproxy/history"
)

// wellFormed drops from a selected history what the upstream would reject
// with a 400: an assistant message whose tool calls do not all have their
// results (the app never sent them, or the stream was cut), and tool
// results whose call is gone. answered holds the tool_call_ids that the
// request itself answers, so the newest call, answered right now, stays.
// An assistant message that also has text keeps the text without the calls.
func wellFormed(sel []history.Message, answered map[string]bool) []history.Message {
	results := map[string]bool{}
	for _, m := range sel {
		if m.Role == history.RoleTool {
			results[m.ToolCallID] = true
		}
	}
	kept := map[string]bool{}
	out := make([]history.Message, 0, len(sel))
	for _, m := range sel {
		switch {
		case m.Role == history.RoleAssistant && m.ToolCalls != nil:
			ids := toolCallIDs(m.ToolCalls)
			whole := m.Status != history.StatusIncomplete && len(ids) > 0
			for _, id := range ids {
				if !results[id] && !answered[id] {
					whole = false
				}
			}
			if whole {
				for _, id := range ids {
					kept[id] = true
				}
				out = append(out, m)
				continue
			}
			if m.Content != "" || m.Parts != nil {
				m.ToolCalls = nil
				out = append(out, m)
			}
		case m.Role == history.RoleTool:
			if kept[m.ToolCallID] {
				out = append(out, m)
			}
		default:
			out = append(out, m)
		}
	}
	return out
}

func toolCallIDs(raw json.RawMessage) []string {
	var calls []struct {
		ID string `json:"id"`
	}
	if json.Unmarshal(raw, &calls) != nil {
		return nil
	}
	ids := make([]string, 0, len(calls))
	for _, c := range calls {
		ids = append(ids, c.ID)
	}
	return ids
}

// callsAnswered reports whether msgs hold the tool calls that answered
// names: every id answered must be among the calls.
func callsAnswered(msgs []history.Message, answered map[string]bool) bool {
	calls := map[string]bool{}
	for _, m := range msgs {
		if m.Role == history.RoleAssistant && m.ToolCalls != nil {
			for _, id := range toolCallIDs(m.ToolCalls) {
				calls[id] = true
			}
		}
	}
	for id := range answered {
		if !calls[id] {
			return false
		}
	}
	return true
}

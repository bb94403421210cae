package proxy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/wire"
)

// Roles a request may carry besides the stored ones; see package wire.
const (
	roleDeveloper = wire.RoleDeveloper
	roleFunction  = wire.RoleFunction
)

// chatRequest is the part of a chat completion request that the proxy
// reads. Everything else stays in fields, exactly as sent.
type chatRequest struct {
	fields   map[string]json.RawMessage
	Model    string
	Stream   bool
	User     string
	N        int
	Messages []inMessage
	// ClientUsage: the client itself asked for stream_options.include_usage,
	// so the usage chunk is its to see.
	ClientUsage bool
	// Reserve is max_completion_tokens, else max_tokens; 0 when neither.
	Reserve int
	Tools   json.RawMessage
	// raw holds each message's bytes as sent, for body.
	raw []json.RawMessage
}

// inMessage is one request message: what it says.
type inMessage struct {
	msg history.Message
}

// limits bound what one chat request may carry; a zero field is no bound.
type limits struct {
	Messages int // messages
	Parts    int // content parts, all messages together
	Tools    int // tools, and tool calls of all messages together
}

// parseChat reads and validates a chat completion request. Errors are
// OpenAI-shaped 400s that name the offending field.
func parseChat(body []byte, lim limits) (*chatRequest, *apiError) {
	if !utf8.Valid(body) {
		return nil, badRequest("invalid_request_body", "", "request body is not valid UTF-8")
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return nil, badRequest("invalid_json", "", "The request body must be a JSON object: "+wire.TypeMismatch(err)+".")
	}
	c := &chatRequest{fields: fields}
	if err := wire.Field(fields, "model", &c.Model); err != nil {
		return nil, err
	}
	if err := wire.Field(fields, "stream", &c.Stream); err != nil {
		return nil, err
	}
	if err := wire.Field(fields, "user", &c.User); err != nil {
		return nil, err
	}
	if err := wire.Field(fields, "n", &c.N); err != nil {
		return nil, err
	}
	var maxTokens, maxCompletion int
	if err := wire.Field(fields, "max_tokens", &maxTokens); err != nil {
		return nil, err
	}
	if err := wire.Field(fields, "max_completion_tokens", &maxCompletion); err != nil {
		return nil, err
	}
	c.Reserve = maxCompletion
	if c.Reserve == 0 {
		c.Reserve = maxTokens
	}
	if raw, ok := fields["stream_options"]; ok && !wire.IsNull(raw) {
		var so map[string]json.RawMessage // exact keys, as the upstream reads them
		if err := json.Unmarshal(raw, &so); err != nil || wire.Field(so, "include_usage", &c.ClientUsage) != nil {
			return nil, badRequest("invalid_type", "stream_options", "stream_options must be an object with a boolean include_usage")
		}
	}
	c.Tools = fields["tools"]
	// Counting the tools' tokens decodes them one by one: bounded first,
	// like the messages below.
	if n := bytes.TrimSpace(c.Tools); lim.Tools > 0 && len(n) > 0 && n[0] == '[' {
		if got := wire.ArrayLen(n); got > lim.Tools {
			return nil, badRequest("too_many_tools", "tools",
				fmt.Sprintf("tools has %d tools; this proxy accepts at most %d per request (max_request_tools)", got, lim.Tools))
		}
	}

	raw, ok := fields["messages"]
	if !ok || wire.IsNull(raw) {
		return nil, badRequest("missing_required_parameter", "messages", "messages is required")
	}
	// Bounded before anything is done per message (decoding one costs
	// allocations; counting tokens and the turn's store write grow with
	// them too), by counting the elements of the array as it stands.
	if n := bytes.TrimSpace(raw); lim.Messages > 0 && len(n) > 0 && n[0] == '[' {
		if got := wire.ArrayLen(n); got > lim.Messages {
			return nil, badRequest("too_many_messages", "messages",
				fmt.Sprintf("messages has %d messages; this proxy accepts at most %d per request (max_request_messages)", got, lim.Messages))
		}
	}
	var msgs []json.RawMessage
	if err := json.Unmarshal(raw, &msgs); err != nil {
		return nil, wire.InvalidType("messages", err)
	}
	if len(msgs) == 0 {
		return nil, badRequest("empty_array", "messages", "messages must contain at least one message")
	}
	c.Messages, c.raw = make([]inMessage, len(msgs)), msgs
	parts := wire.Parts{Limit: lim.Parts, ToolCallLimit: lim.Tools}
	for i, m := range msgs {
		msg, err := wire.ParseCounted(m, fmt.Sprintf("messages[%d]", i), &parts)
		if err != nil {
			return nil, err
		}
		c.Messages[i] = inMessage{msg: msg}
	}
	return c, nil
}

// rewritten drops what only body reads (the request's fields and each
// message's bytes as sent), once the body to forward is written: an open
// stream keeps its request until it ends.
func (c *chatRequest) rewritten() {
	c.fields, c.raw = nil, nil
}

// leadingSystem is the number of system or developer messages at the start:
// they stay first, before any injected history.
func (c *chatRequest) leadingSystem() int {
	for i, m := range c.Messages {
		if m.msg.Role != history.RoleSystem && m.msg.Role != roleDeveloper {
			return i
		}
	}
	return len(c.Messages)
}

// lastAssistant is the index of the request's last assistant message, -1
// when there is none. A request with one carries its own history.
func (c *chatRequest) lastAssistant() int {
	for i := len(c.Messages) - 1; i >= 0; i-- {
		if c.Messages[i].msg.Role == history.RoleAssistant {
			return i
		}
	}
	return -1
}

// newMessages are the messages a turn records: after the request's last
// assistant message (or its leading system messages), system, developer
// and legacy function messages left out since the app resends them.
func (c *chatRequest) newMessages() []history.Message {
	var out []history.Message
	for _, m := range c.Messages[c.newStart():] {
		if recorded(m.msg.Role) {
			out = append(out, m.msg)
		}
	}
	return out
}

// newCount is len(c.newMessages()), without building them.
func (c *chatRequest) newCount() int {
	n := 0
	for _, m := range c.Messages[c.newStart():] {
		if recorded(m.msg.Role) {
			n++
		}
	}
	return n
}

// newStart is where the messages a turn may record begin: after the last
// assistant message, or else after the leading system messages.
func (c *chatRequest) newStart() int {
	if start := c.lastAssistant() + 1; start > 0 {
		return start
	}
	return c.leadingSystem()
}

// recorded reports whether a request message of this role is recorded.
func recorded(role string) bool { return role == history.RoleUser || role == history.RoleTool }

// hasParts reports whether any message has a content-part array.
func (c *chatRequest) hasParts() bool {
	for _, m := range c.Messages {
		if m.msg.Parts != nil {
			return true
		}
	}
	return false
}

// leadingResults returns the tool_call_ids of the tool messages the
// request opens with, after its leading system messages: the app sends back
// what its tools returned and relies on the history for the call. nil when
// the request opens with something else.
func (c *chatRequest) leadingResults() []string {
	var ids []string
	for _, m := range c.Messages[c.leadingSystem():] {
		if m.msg.Role != history.RoleTool {
			break
		}
		ids = append(ids, m.msg.ToolCallID)
	}
	return ids
}

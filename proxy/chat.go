package proxy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"github.com/historyproxy/historyproxy/history"
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
}

// inMessage is one request message: its bytes as sent and what they say.
type inMessage struct {
	raw json.RawMessage
	msg history.Message
}

var nullJSON = json.RawMessage("null")

// parseChat reads and validates a chat completion request. Errors are
// OpenAI-shaped 400s that name the offending field.
func parseChat(body []byte) (*chatRequest, *apiError) {
	if !utf8.Valid(body) {
		return nil, badRequest("invalid_request_body", "", "request body is not valid UTF-8")
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return nil, badRequest("invalid_json", "", "request body is not a JSON object: "+err.Error())
	}
	c := &chatRequest{fields: fields}
	if err := field(fields, "model", &c.Model); err != nil {
		return nil, err
	}
	if err := field(fields, "stream", &c.Stream); err != nil {
		return nil, err
	}
	if err := field(fields, "user", &c.User); err != nil {
		return nil, err
	}
	if err := field(fields, "n", &c.N); err != nil {
		return nil, err
	}
	var maxTokens, maxCompletion int
	if err := field(fields, "max_tokens", &maxTokens); err != nil {
		return nil, err
	}
	if err := field(fields, "max_completion_tokens", &maxCompletion); err != nil {
		return nil, err
	}
	c.Reserve = maxCompletion
	if c.Reserve == 0 {
		c.Reserve = maxTokens
	}
	if raw, ok := fields["stream_options"]; ok && !isNull(raw) {
		var so map[string]json.RawMessage // exact keys, as the upstream reads them
		if err := json.Unmarshal(raw, &so); err != nil || field(so, "include_usage", &c.ClientUsage) != nil {
			return nil, badRequest("invalid_type", "stream_options", "stream_options must be an object with a boolean include_usage")
		}
	}
	c.Tools = fields["tools"]

	raw, ok := fields["messages"]
	if !ok || isNull(raw) {
		return nil, badRequest("missing_required_parameter", "messages", "messages is required")
	}
	var msgs []json.RawMessage
	if err := json.Unmarshal(raw, &msgs); err != nil {
		return nil, badRequest("invalid_type", "messages", "messages must be an array of message objects")
	}
	if len(msgs) == 0 {
		return nil, badRequest("empty_array", "messages", "messages must contain at least one message")
	}
	c.Messages = make([]inMessage, len(msgs))
	for i, m := range msgs {
		msg, err := parseMessage(m, i)
		if err != nil {
			return nil, err
		}
		c.Messages[i] = inMessage{raw: m, msg: msg}
	}
	return c, nil
}

// field decodes fields[name] into dst when present and not null.
func field(fields map[string]json.RawMessage, name string, dst any) *apiError {
	raw, ok := fields[name]
	if !ok || isNull(raw) {
		return nil
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return badRequest("invalid_type", name, fmt.Sprintf("%s has the wrong type: %s", name, typeMismatch(err)))
	}
	return nil
}

func typeMismatch(err error) string {
	var te *json.UnmarshalTypeError
	if e, ok := err.(*json.UnmarshalTypeError); ok {
		te = e
		return fmt.Sprintf("got %s, want %s", te.Value, te.Type)
	}
	return err.Error()
}

func isNull(raw json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(raw), nullJSON) }

// Message roles a request may carry. developer is OpenAI's newer name for
// system; function is the legacy form of tool, forwarded but not stored.
const (
	roleDeveloper = "developer"
	roleFunction  = "function"
)

func parseMessage(raw json.RawMessage, i int) (history.Message, *apiError) {
	param := fmt.Sprintf("messages[%d]", i)
	// A map, not a struct: encoding/json matches struct fields ignoring
	// case, so {"role":"system","Role":"user"} would read as a user message
	// here while the upstream, reading exact keys, sees a system message.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return history.Message{}, badRequest("invalid_type", param, param+" must be a message object: "+typeMismatch(err))
	}
	var m struct {
		Role, Name, ToolCallID string
		Content, ToolCalls     json.RawMessage
		Refusal                *string
	}
	for _, f := range []struct {
		key string
		dst any
	}{{"role", &m.Role}, {"name", &m.Name}, {"tool_call_id", &m.ToolCallID}, {"refusal", &m.Refusal}} {
		if err := field(fields, f.key, f.dst); err != nil {
			err.Param = param + "." + f.key
			err.Message = param + "." + err.Message
			return history.Message{}, err
		}
	}
	m.Content, m.ToolCalls = fields["content"], fields["tool_calls"]
	switch m.Role {
	case history.RoleSystem, roleDeveloper, history.RoleUser, history.RoleAssistant, history.RoleTool, roleFunction:
	case "":
		return history.Message{}, badRequest("missing_required_parameter", param+".role", param+".role is required")
	default:
		return history.Message{}, badRequest("invalid_value", param+".role",
			fmt.Sprintf("%s.role %q is not one of system, developer, user, assistant, tool", param, m.Role))
	}
	msg := history.Message{Role: m.Role, Name: m.Name, ToolCallID: m.ToolCallID}
	if m.Refusal != nil {
		msg.Refusal = *m.Refusal
	}
	if len(m.ToolCalls) > 0 && !isNull(m.ToolCalls) {
		if m.Role != history.RoleAssistant || bytes.TrimSpace(m.ToolCalls)[0] != '[' {
			return history.Message{}, badRequest("invalid_type", param+".tool_calls", param+".tool_calls must be an array on an assistant message")
		}
		msg.ToolCalls = m.ToolCalls
	}
	content := bytes.TrimSpace(m.Content)
	switch {
	case len(content) == 0 || isNull(content):
		// The API allows no content only on an assistant message (which
		// then calls tools or refuses).
		if m.Role != history.RoleAssistant && m.Role != roleFunction {
			return history.Message{}, badRequest("missing_required_parameter", param+".content", param+".content is required")
		}
		msg.ContentNull = true
	case content[0] == '"':
		if err := json.Unmarshal(content, &msg.Content); err != nil {
			return history.Message{}, badRequest("invalid_type", param+".content", param+".content is not a valid string")
		}
	case content[0] == '[':
		var parts []struct {
			Type *string `json:"type"`
		}
		if err := json.Unmarshal(content, &parts); err != nil {
			return history.Message{}, badRequest("invalid_type", param+".content", param+".content must be a string or an array of content parts")
		}
		for j, p := range parts {
			if p.Type == nil {
				return history.Message{}, badRequest("missing_required_parameter", fmt.Sprintf("%s.content[%d].type", param, j),
					fmt.Sprintf("%s.content[%d] needs a string type", param, j))
			}
		}
		// Parts of unknown types are kept exactly as sent: the upstream
		// decides what it supports.
		msg.Parts = json.RawMessage(content)
	default:
		return history.Message{}, badRequest("invalid_type", param+".content", param+".content must be a string or an array of content parts")
	}
	return msg, nil
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
	start := c.lastAssistant() + 1
	if start == 0 {
		start = c.leadingSystem()
	}
	var out []history.Message
	for _, m := range c.Messages[start:] {
		switch m.msg.Role {
		case history.RoleUser, history.RoleTool:
			out = append(out, m.msg)
		}
	}
	return out
}

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

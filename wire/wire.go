// Package wire is the OpenAI chat wire format as both the client-facing
// proxy and the admin API read it: messages as clients send them, and
// errors in OpenAI's shape, so that a message the admin API imports is
// validated exactly like one the proxy records.
package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/historyproxy/historyproxy/history"
)

// Error is an error answered in OpenAI's shape, so SDKs surface it the
// same way they surface the upstream's own errors.
type Error struct {
	Status  int    `json:"-"`
	Message string `json:"message"`
	Type    string `json:"type"`
	Param   string `json:"param,omitempty"`
	Code    string `json:"code"`
}

func (e *Error) Error() string { return e.Message }

// BadRequest is a 400 invalid_request_error.
func BadRequest(code, param, msg string) *Error {
	return &Error{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: code, Param: param, Message: msg}
}

// WriteError answers with e as {"error":{...}}.
func WriteError(w http.ResponseWriter, e *Error) {
	body, _ := json.Marshal(struct {
		Error *Error `json:"error"`
	}{e})
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(e.Status)
	_, _ = w.Write(append(body, '\n'))
}

// Field decodes fields[name] into dst when present and not null; a value
// of the wrong type is a 400 naming the field.
func Field(fields map[string]json.RawMessage, name string, dst any) *Error {
	raw, ok := fields[name]
	if !ok || IsNull(raw) {
		return nil
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return BadRequest("invalid_type", name, fmt.Sprintf("%s has the wrong type: %s", name, TypeMismatch(err)))
	}
	return nil
}

// TypeMismatch says what a decoding error found and wanted.
func TypeMismatch(err error) string {
	var te *json.UnmarshalTypeError
	if e, ok := err.(*json.UnmarshalTypeError); ok {
		te = e
		return fmt.Sprintf("got %s, want %s", te.Value, te.Type)
	}
	return err.Error()
}

// IsNull reports whether raw is the JSON null.
func IsNull(raw json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(raw), nullJSON) }

var nullJSON = json.RawMessage("null")

// Message roles a request may carry. developer is OpenAI's newer name for
// system; function is the legacy form of tool, forwarded but not stored.
const (
	RoleDeveloper = "developer"
	RoleFunction  = "function"
)

// ParseMessage reads and validates one chat message as a client sends it;
// param names it in errors ("messages[3]"). Roles are those the API
// accepts (system, developer, user, assistant, tool, and the legacy
// function); content is a string, an array of content parts (kept exactly
// as sent), or null on an assistant message.
func ParseMessage(raw json.RawMessage, param string) (history.Message, *Error) {
	// A map, not a struct: encoding/json matches struct fields ignoring
	// case, so {"role":"system","Role":"user"} would read as a user message
	// here while the upstream, reading exact keys, sees a system message.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return history.Message{}, BadRequest("invalid_type", param, param+" must be a message object: "+TypeMismatch(err))
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
		if err := Field(fields, f.key, f.dst); err != nil {
			err.Param = param + "." + f.key
			err.Message = param + "." + err.Message
			return history.Message{}, err
		}
	}
	m.Content, m.ToolCalls = fields["content"], fields["tool_calls"]
	switch m.Role {
	case history.RoleSystem, RoleDeveloper, history.RoleUser, history.RoleAssistant, history.RoleTool, RoleFunction:
	case "":
		return history.Message{}, BadRequest("missing_required_parameter", param+".role", param+".role is required")
	default:
		return history.Message{}, BadRequest("invalid_value", param+".role",
			fmt.Sprintf("%s.role %q is not one of system, developer, user, assistant, tool", param, m.Role))
	}
	msg := history.Message{Role: m.Role, Name: m.Name, ToolCallID: m.ToolCallID}
	if m.Refusal != nil {
		msg.Refusal = *m.Refusal
	}
	if len(m.ToolCalls) > 0 && !IsNull(m.ToolCalls) {
		if m.Role != history.RoleAssistant || bytes.TrimSpace(m.ToolCalls)[0] != '[' {
			return history.Message{}, BadRequest("invalid_type", param+".tool_calls", param+".tool_calls must be an array on an assistant message")
		}
		msg.ToolCalls = m.ToolCalls
	}
	content := bytes.TrimSpace(m.Content)
	switch {
	case len(content) == 0 || IsNull(content):
		// The API allows no content only on an assistant message (which
		// then calls tools or refuses).
		if m.Role != history.RoleAssistant && m.Role != RoleFunction {
			return history.Message{}, BadRequest("missing_required_parameter", param+".content", param+".content is required")
		}
		msg.ContentNull = true
	case content[0] == '"':
		if err := json.Unmarshal(content, &msg.Content); err != nil {
			return history.Message{}, BadRequest("invalid_type", param+".content", param+".content is not a valid string")
		}
	case content[0] == '[':
		var parts []struct {
			Type *string `json:"type"`
		}
		if err := json.Unmarshal(content, &parts); err != nil {
			return history.Message{}, BadRequest("invalid_type", param+".content", param+".content must be a string or an array of content parts")
		}
		for j, p := range parts {
			if p.Type == nil {
				return history.Message{}, BadRequest("missing_required_parameter", fmt.Sprintf("%s.content[%d].type", param, j),
					fmt.Sprintf("%s.content[%d] needs a string type", param, j))
			}
		}
		// Parts of unknown types are kept exactly as sent: the upstream
		// decides what it supports.
		msg.Parts = json.RawMessage(content)
	default:
		return history.Message{}, BadRequest("invalid_type", param+".content", param+".content must be a string or an array of content parts")
	}
	return msg, nil
}

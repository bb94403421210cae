// Package wire is the OpenAI chat wire format as both the client-facing
// proxy and the admin API read it: messages as clients send them, and
// errors in OpenAI's shape, so that a message the admin API imports is
// validated exactly like one the proxy records.
package wire

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"

	"github.com/historyproxy/historyproxy/history"
)

// Error is an error answered in OpenAI's shape, so SDKs surface it the
// same way they surface the upstream's own errors.
type Error struct {
	Status  int
	Message string
	Type    string
	// Param names the request field at fault ("messages[2].content");
	// empty when none, which the body shows as null.
	Param string
	Code  string
}

func (e *Error) Error() string { return e.Message }

// MarshalJSON writes OpenAI's shape: all four keys, always, with param
// null when the error concerns no one field, as OpenAI sends it (SDKs
// read a missing key as undefined).
func (e *Error) MarshalJSON() ([]byte, error) {
	var param *string
	if e.Param != "" {
		param = &e.Param
	}
	return json.Marshal(struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	}{e.Message, e.Type, param, e.Code})
}

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
		return InvalidType(name, err)
	}
	return nil
}

// InvalidType is the 400 for a value at param that err (from decoding it)
// found of the wrong JSON type, worded as OpenAI words it: "Invalid type
// for 'n': expected an integer, but got a string instead."
func InvalidType(param string, err error) *Error {
	return BadRequest("invalid_type", param, fmt.Sprintf("Invalid type for '%s': %s.", param, TypeMismatch(err)))
}

// TypeMismatch says, in JSON's terms, what a decoding error wanted and
// found: "expected an object, but got an array instead". encoding/json
// names Go types ("map[string]json.RawMessage"), which mean nothing to a
// client.
func TypeMismatch(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("expected %s, but got %s instead", jsonType(te.Type), jsonValue(te.Value))
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("not valid JSON at byte %d (%s)", se.Offset, strings.TrimPrefix(se.Error(), "json: "))
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

// jsonType names the JSON type a Go type decodes from.
func jsonType(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.Slice, reflect.Array:
		return "an array"
	}
	return "a JSON value"
}

// jsonValue names what encoding/json found ("array", "number 1.5", ...).
func jsonValue(v string) string {
	kind, detail, _ := strings.Cut(v, " ")
	switch kind {
	case "object", "array":
		return "an " + kind
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "number":
		if detail != "" {
			return "the number " + detail
		}
		return "a number"
	case "null":
		return "null"
	}
	return v
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
	return ParseCounted(raw, param, nil)
}

// Parts counts the content parts and the tool calls of a request's
// messages against limits.
type Parts struct {
	Limit int // content parts; 0: no limit
	Used  int
	// ToolCallLimit bounds the tool calls (0: no limit); ToolCalls counts
	// them.
	ToolCallLimit, ToolCalls int
}

// ParseCounted is ParseMessage counting the message's content parts and
// tool calls in parts (nil: not counted). Past parts.Limit it answers 400
// too_many_content_parts, past parts.ToolCallLimit too_many_tool_calls,
// before decoding them, so an oversized array costs no allocation per
// element.
func ParseCounted(raw json.RawMessage, param string, parts *Parts) (history.Message, *Error) {
	// A map, not a struct: encoding/json matches struct fields ignoring
	// case, so {"role":"system","Role":"user"} would read as a user message
	// here while the upstream, reading exact keys, sees a system message.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return history.Message{}, InvalidType(param, err)
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
		if raw, ok := fields[f.key]; ok && !IsNull(raw) {
			if err := json.Unmarshal(raw, f.dst); err != nil {
				return history.Message{}, InvalidType(param+"."+f.key, err)
			}
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
		if parts != nil {
			if parts.ToolCalls += ArrayLen(bytes.TrimSpace(m.ToolCalls)); parts.ToolCallLimit > 0 && parts.ToolCalls > parts.ToolCallLimit {
				return history.Message{}, BadRequest("too_many_tool_calls", param+".tool_calls", fmt.Sprintf(
					"the messages up to %s carry %d tool calls; at most %d are accepted per request (max_request_tools)", param, parts.ToolCalls, parts.ToolCallLimit))
			}
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
		if parts != nil {
			if parts.Used += ArrayLen(content); parts.Limit > 0 && parts.Used > parts.Limit {
				return history.Message{}, BadRequest("too_many_content_parts", param+".content", fmt.Sprintf(
					"the messages up to %s carry %d content parts; at most %d are accepted per request (max_request_content_parts)", param, parts.Used, parts.Limit))
			}
		}
		var list []struct {
			Type *string `json:"type"`
		}
		if err := json.Unmarshal(content, &list); err != nil {
			return history.Message{}, BadRequest("invalid_type", param+".content", param+".content must be a string or an array of content parts")
		}
		for j, p := range list {
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

// ArrayLen is the number of elements of raw, a valid JSON array (for
// example one inside a body already decoded once), found without decoding
// them: a limit on them is checked before they cost an allocation each.
func ArrayLen(raw []byte) int {
	depth, commas := 0, 0
	empty := true
	inString, escaped := false, false
	for _, c := range raw {
		if inString {
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
			continue
		}
		switch c {
		case ' ', '\t', '\n', '\r':
			continue
		case '"':
			inString = true
		case '[', '{':
			depth++
			if depth == 2 {
				empty = false
			}
			continue
		case ']', '}':
			depth--
			continue
		case ',':
			if depth == 1 {
				commas++
			}
			continue
		}
		if depth == 1 {
			empty = false // a string, number, true, false or null element
		}
	}
	if empty {
		return 0
	}
	return commas + 1
}

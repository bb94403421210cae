package proxy

import (
	"encoding/json"
	"fmt"
	"slices"
	"unicode/utf8"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/wire"
)

// body returns the request to send upstream: the injected history after
// the leading system messages, and include_usage set on streams so the
// proxy learns the token usage. With nothing to change it returns orig.
//
// The new body is written straight into one buffer from the raw values
// already at hand: going through json.Marshal would re-validate and
// re-compact every byte of the request and the history (it was the
// hottest spot of the proxy in a CPU profile).
func (c *chatRequest) body(orig []byte, inject []history.Message) ([]byte, error) {
	forceUsage := c.Stream && !c.ClientUsage
	if len(inject) == 0 && !forceUsage {
		return orig, nil
	}
	keys := make([]string, 0, len(c.fields)+1)
	for k := range c.fields {
		keys = append(keys, k)
	}
	if _, ok := c.fields["stream_options"]; forceUsage && !ok {
		keys = append(keys, "stream_options")
	}
	slices.Sort(keys) // a stable order, the one json.Marshal gives a map
	size := len(orig) + 64
	for _, m := range inject {
		size += len(m.Content) + len(m.Parts) + len(m.ToolCalls) + 64
	}
	b := make([]byte, 0, size)
	b = append(b, '{')
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, k)
		b = append(b, ':')
		switch {
		case k == "messages" && len(inject) > 0:
			b = c.appendMessages(b, inject)
		case k == "stream_options" && forceUsage:
			so, err := withIncludeUsage(c.fields[k])
			if err != nil {
				return nil, err
			}
			b = append(b, so...)
		default:
			b = append(b, c.fields[k]...)
		}
	}
	return append(b, '}'), nil
}

// appendMessages writes the messages array: the leading system messages,
// the injected history, then the rest of the request's messages as sent.
func (c *chatRequest) appendMessages(b []byte, inject []history.Message) []byte {
	lead := c.leadingSystem()
	b = append(b, '[')
	for i, raw := range c.raw[:lead] {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, raw...)
	}
	for i, m := range inject {
		if lead+i > 0 {
			b = append(b, ',')
		}
		b = appendWire(b, m)
	}
	for _, raw := range c.raw[lead:] {
		b = append(b, ',') // inject is not empty: something precedes
		b = append(b, raw...)
	}
	return append(b, ']')
}

// withIncludeUsage returns stream_options with include_usage set to true
// and the client's other options kept.
func withIncludeUsage(raw json.RawMessage) ([]byte, error) {
	so := map[string]json.RawMessage{}
	if len(raw) > 0 && !wire.IsNull(raw) {
		if err := json.Unmarshal(raw, &so); err != nil {
			return nil, fmt.Errorf("decode stream_options: %w", err)
		}
	}
	so["include_usage"] = json.RawMessage("true")
	b, err := json.Marshal(so)
	if err != nil {
		return nil, fmt.Errorf("encode stream_options: %w", err)
	}
	return b, nil
}

// appendWire writes a stored message in the API's shape. Parts and tool
// calls are JSON that the store kept as it was sent or assembled; an
// empty tool_calls array is left out, since OpenAI refuses it in a request
// (400 empty_array) and it calls nothing.
func appendWire(b []byte, m history.Message) []byte {
	b = append(b, `{"role":`...)
	b = appendString(b, m.Role)
	b = append(b, `,"content":`...)
	switch {
	case m.Parts != nil:
		b = append(b, m.Parts...)
	case m.ContentNull:
		b = append(b, "null"...)
	default:
		b = appendString(b, m.Content)
	}
	if m.Name != "" {
		b = append(b, `,"name":`...)
		b = appendString(b, m.Name)
	}
	if history.HasToolCalls(m.ToolCalls) {
		b = append(b, `,"tool_calls":`...)
		b = append(b, m.ToolCalls...)
	}
	if m.ToolCallID != "" {
		b = append(b, `,"tool_call_id":`...)
		b = appendString(b, m.ToolCallID)
	}
	if m.Refusal != "" {
		b = append(b, `,"refusal":`...)
		b = appendString(b, m.Refusal)
	}
	return append(b, '}')
}

const hexDigits = "0123456789abcdef"

// appendString writes s as a JSON string. Stored text is valid UTF-8 (the
// request it came from was checked), so only quotes, backslashes and
// control characters need escaping; an invalid byte, should one reach
// here, becomes U+FFFD so the output is always valid JSON.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && size == 1 {
				b = append(b, s[start:i]...)
				b = append(b, `\ufffd`...)
				start = i + 1
			}
			i += size
			continue
		}
		if c >= 0x20 && c != '"' && c != '\\' {
			i++
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
		}
		i++
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

package proxy

import (
	"bytes"
	"slices"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// The stream's chunks are read by a scanner that walks the JSON once and
// keeps only the fields the reply is assembled from. encoding/json, even
// with a decoder reused from chunk to chunk, was a fifth of the proxy's
// CPU on streams: reflection over every field of every chunk, about 350
// bytes for a word or two of text.
//
// The scanner reads the chunks of the API's usual shape: text and tool-call
// deltas, role and finish chunks, fields it does not need (skipped, but
// checked). Whatever else it meets (the usage chunk, an error, a field
// named in another case, a field twice, a value of an unexpected type,
// invalid UTF-8 in a text) it leaves to encoding/json, so that what it
// accepts it reads exactly as json.Unmarshal does: FuzzChunkScan holds
// the two to the same chunk.

// chunkScan is one chunk being scanned.
type chunkScan struct {
	data []byte
	pos  int
	// scratch holds a string whose escapes were decoded, until the next.
	scratch []byte
}

// choiceScratch is what a choice's pointers and slices point into, reused
// from chunk to chunk.
type choiceScratch struct {
	content, refusal, finish string
	calls                    []chunkToolCall
	indexes                  []int
}

// scanChunk reads data into c. sure is false when data is not of the
// shape the scanner reads: then nothing about c holds, and encoding/json
// must decide. texts holds what each choice's fields point into; it and
// scratch are reused from chunk to chunk.
func scanChunk(data []byte, c *chunk, texts *[]choiceScratch, scratch *[]byte) (sure bool) {
	s := chunkScan{data: data, scratch: *scratch}
	defer func() { *scratch = s.scratch }()
	*c = chunk{Choices: c.Choices[:0]}
	ok := s.object([]string{"choices", "object", "usage", "error"}, func(field int) bool {
		switch field {
		case 0:
			return s.choices(c, texts)
		case 1:
			// Only "error" matters to the reply (an error event).
			v, ok := s.text()
			if ok && v != nil && string(v) == "error" {
				c.Object = "error"
			}
			return ok
		}
		return s.null() // the usage chunk and errors: encoding/json's
	})
	return ok && s.end()
}

// choices reads the choices array, or null.
func (s *chunkScan) choices(c *chunk, texts *[]choiceScratch) bool {
	if s.null() {
		return true
	}
	if !s.byte('[') {
		return false
	}
	if s.byte(']') {
		return true
	}
	for i := 0; ; i++ {
		if len(*texts) <= i {
			*texts = append(*texts, choiceScratch{})
		}
		t := &(*texts)[i]
		c.Choices = append(c.Choices, chunkChoice{})
		ch := &c.Choices[i]
		ok := s.object([]string{"index", "delta", "finish_reason"}, func(field int) bool {
			switch field {
			case 0:
				return s.int(&ch.Index)
			case 1:
				return s.delta(&ch.Delta, t)
			}
			return s.textInto(&ch.FinishReason, &t.finish)
		})
		if !ok {
			return false
		}
		if s.byte(']') {
			return true
		}
		if !s.byte(',') {
			return false
		}
	}
}

// delta reads a choice's delta, or null.
func (s *chunkScan) delta(d *chunkDelta, t *choiceScratch) bool {
	if s.null() {
		return true
	}
	return s.object([]string{"content", "refusal", "tool_calls"}, func(field int) bool {
		switch field {
		case 0:
			return s.textInto(&d.Content, &t.content)
		case 1:
			return s.textInto(&d.Refusal, &t.refusal)
		}
		return s.toolCalls(d, t)
	})
}

// toolCalls reads a delta's tool calls, or null.
func (s *chunkScan) toolCalls(d *chunkDelta, t *choiceScratch) bool {
	d.ToolCalls = nil
	if s.null() {
		return true
	}
	if !s.byte('[') {
		return false
	}
	d.ToolCalls = t.calls[:0]
	if s.byte(']') {
		return true
	}
	for j := 0; ; j++ {
		if len(t.calls) <= j {
			t.calls = append(t.calls, chunkToolCall{})
			t.indexes = append(t.indexes, 0)
		}
		tc := &t.calls[j]
		*tc = chunkToolCall{}
		ok := s.object([]string{"index", "id", "type", "function"}, func(field int) bool {
			switch field {
			case 0:
				if s.null() {
					return true
				}
				tc.Index = &t.indexes[j]
				return s.int(tc.Index)
			case 1:
				return s.textTo(&tc.ID)
			case 2:
				return s.textTo(&tc.Type)
			}
			if s.null() {
				return true
			}
			return s.object([]string{"name", "arguments"}, func(field int) bool {
				if field == 0 {
					return s.textTo(&tc.Function.Name)
				}
				return s.textTo(&tc.Function.Arguments)
			})
		})
		if !ok {
			return false
		}
		d.ToolCalls = t.calls[:j+1]
		if s.byte(']') {
			return true
		}
		if !s.byte(',') {
			return false
		}
	}
}

// object reads an object whose fields (the ones decoded; at most 8) are
// names: it hands field the index of each as its value comes next, and
// skips the other keys' values. A field named twice, or in another case
// (encoding/json matches names case-insensitively, and merges a field
// named twice), is not the scanner's.
func (s *chunkScan) object(names []string, field func(int) bool) bool {
	if !s.byte('{') {
		return false
	}
	if s.byte('}') {
		return true
	}
	var seen uint8
	for {
		key, ok := s.skippedText() // compared with ASCII names only
		if !ok || key == nil || !s.byte(':') {
			return false
		}
		i := slices.IndexFunc(names, func(n string) bool { return bytes.EqualFold(key, []byte(n)) })
		switch {
		case i < 0:
			ok = s.skip(0)
		case string(key) != names[i] || seen&(1<<i) != 0:
			return false
		default:
			seen |= 1 << i
			ok = field(i)
		}
		if !ok {
			return false
		}
		if s.byte('}') {
			return true
		}
		if !s.byte(',') {
			return false
		}
	}
}

// textTo reads a string into *t; null leaves it as it is.
func (s *chunkScan) textTo(t *string) bool {
	v, ok := s.text()
	if ok && len(v) > 0 {
		*t = string(v)
	}
	return ok
}

// textInto reads a string into *t and points *p at it, or null into a
// nil *p.
func (s *chunkScan) textInto(p **string, t *string) bool {
	v, ok := s.text()
	switch {
	case !ok:
		return false
	case v == nil:
		*p = nil
	default:
		if len(v) == 0 {
			*t = ""
		} else {
			*t = string(v) // the text's own bytes: what assembling the reply needs
		}
		*p = t
	}
	return true
}

// text reads a string, its escapes decoded (in a copy), or null (nil,
// true). Invalid UTF-8, a control character or a broken escape is
// encoding/json's.
func (s *chunkScan) text() ([]byte, bool) {
	v, ok := s.skippedText()
	if ok && v != nil && !utf8.Valid(v) {
		return nil, false
	}
	return v, ok
}

// skippedText is text for a string that is only compared with ASCII or
// skipped: invalid UTF-8 in it changes nothing (encoding/json accepts it,
// and replaces it only in what it decodes).
func (s *chunkScan) skippedText() ([]byte, bool) {
	if s.null() {
		return nil, true
	}
	if !s.byte('"') {
		return nil, false
	}
	start := s.pos
	for i := start; i < len(s.data); i++ {
		switch c := s.data[i]; {
		case c == '"':
			s.pos = i + 1
			v := s.data[start:i]
			if v == nil {
				v = []byte{}
			}
			return v, true
		case c == '\\':
			return s.escaped(start)
		case c < 0x20:
			return nil, false
		}
	}
	return nil, false
}

// escaped reads the rest of a string that has escapes from its start.
func (s *chunkScan) escaped(start int) ([]byte, bool) {
	out := s.scratch[:0]
	defer func() { s.scratch = out[:0] }()
	i := start
	for i < len(s.data) {
		c := s.data[i]
		switch {
		case c == '"':
			s.pos = i + 1
			return out, true
		case c < 0x20:
			return nil, false
		case c != '\\':
			out = append(out, c)
			i++
			continue
		}
		if i+1 >= len(s.data) {
			return nil, false
		}
		switch e := s.data[i+1]; e {
		case '"', '\\', '/':
			out = append(out, e)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r, ok := hex4(s.data[i+2:])
			if !ok {
				return nil, false
			}
			i += 6
			// As encoding/json: a surrogate pair is one rune, a lone
			// surrogate U+FFFD.
			if utf16.IsSurrogate(r) {
				if len(s.data) > i+1 && s.data[i] == '\\' && s.data[i+1] == 'u' {
					if r2, ok := hex4(s.data[i+2:]); ok {
						if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
							out = utf8.AppendRune(out, d)
							i += 6
							continue
						}
					}
				}
				r = utf8.RuneError
			}
			out = utf8.AppendRune(out, r)
			continue
		default:
			return nil, false
		}
		i += 2
	}
	return nil, false
}

// hex4 reads the four hex digits of a \u escape.
func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	r, err := strconv.ParseUint(string(b[:4]), 16, 32)
	return rune(r), err == nil
}

// int reads an integer that fits an int, or null (nothing changes). A
// fraction or an exponent is encoding/json's (it refuses them).
func (s *chunkScan) int(p *int) bool {
	if s.null() {
		return true
	}
	s.ws()
	start := s.pos
	if s.pos < len(s.data) && s.data[s.pos] == '-' {
		s.pos++
	}
	digits := s.pos
	for s.pos < len(s.data) && s.data[s.pos] >= '0' && s.data[s.pos] <= '9' {
		s.pos++
	}
	lit := s.data[start:s.pos]
	if s.pos == digits || (s.data[digits] == '0' && s.pos > digits+1) {
		return false
	}
	if s.pos < len(s.data) && (s.data[s.pos] == '.' || s.data[s.pos] == 'e' || s.data[s.pos] == 'E') {
		return false
	}
	n, err := strconv.ParseInt(string(lit), 10, strconv.IntSize)
	*p = int(n)
	return err == nil
}

// maxDepth bounds the nesting of skipped values. encoding/json refuses
// more than 10,000 levels counted from the chunk itself, and a skipped
// value sits inside up to 7 of the scanner's own (the chunk, choices, a
// choice, its delta, tool_calls, a call, its function): a value deeper
// than what is left is encoding/json's to decide (TestChunkScanDeepNesting).
const maxDepth = 10000 - 8

// skip reads any value, checking that it is JSON.
func (s *chunkScan) skip(depth int) bool {
	if depth > maxDepth {
		return false
	}
	s.ws()
	if s.pos >= len(s.data) {
		return false
	}
	switch c := s.data[s.pos]; {
	case c == '{':
		if s.pos++; s.byte('}') {
			return true
		}
		for {
			if _, ok := s.skippedText(); !ok || !s.byte(':') || !s.skip(depth+1) {
				return false
			}
			if s.byte('}') {
				return true
			}
			if !s.byte(',') {
				return false
			}
		}
	case c == '[':
		if s.pos++; s.byte(']') {
			return true
		}
		for {
			if !s.skip(depth + 1) {
				return false
			}
			if s.byte(']') {
				return true
			}
			if !s.byte(',') {
				return false
			}
		}
	case c == '"':
		_, ok := s.skippedText()
		return ok
	case c == 't':
		return s.literal("true")
	case c == 'f':
		return s.literal("false")
	case c == 'n':
		return s.literal("null")
	}
	return s.number()
}

// number reads a JSON number.
func (s *chunkScan) number() bool {
	d := s.data
	i := s.pos
	if i < len(d) && d[i] == '-' {
		i++
	}
	switch {
	case i < len(d) && d[i] == '0':
		i++
	case i < len(d) && d[i] >= '1' && d[i] <= '9':
		for i < len(d) && d[i] >= '0' && d[i] <= '9' {
			i++
		}
	default:
		return false
	}
	if i < len(d) && d[i] == '.' {
		i++
		j := i
		for i < len(d) && d[i] >= '0' && d[i] <= '9' {
			i++
		}
		if i == j {
			return false
		}
	}
	if i < len(d) && (d[i] == 'e' || d[i] == 'E') {
		i++
		if i < len(d) && (d[i] == '+' || d[i] == '-') {
			i++
		}
		j := i
		for i < len(d) && d[i] >= '0' && d[i] <= '9' {
			i++
		}
		if i == j {
			return false
		}
	}
	s.pos = i
	return true
}

// null reads null if it comes next.
func (s *chunkScan) null() bool {
	s.ws()
	if bytes.HasPrefix(s.data[s.pos:], []byte("null")) {
		s.pos += 4
		return true
	}
	return false
}

func (s *chunkScan) literal(lit string) bool {
	if bytes.HasPrefix(s.data[s.pos:], []byte(lit)) {
		s.pos += len(lit)
		return true
	}
	return false
}

// byte reads c, after white space, if it comes next.
func (s *chunkScan) byte(c byte) bool {
	s.ws()
	if s.pos < len(s.data) && s.data[s.pos] == c {
		s.pos++
		return true
	}
	return false
}

func (s *chunkScan) ws() {
	for s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ' ', '\t', '\r', '\n':
			s.pos++
		default:
			return
		}
	}
}

// end reports whether only white space is left.
func (s *chunkScan) end() bool {
	s.ws()
	return s.pos == len(s.data)
}

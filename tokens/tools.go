package tokens

import (
	"encoding/json"
	"strings"
)

// toolFraming holds the fixed costs of the OpenAI cookbook's tool-counting
// method (num_tokens_for_tools in "How to count tokens with tiktoken"),
// which the cookbook checked against the API for gpt-3.5-turbo, gpt-4,
// gpt-4o and gpt-4o-mini.
type toolFraming struct {
	funcInit, propInit, propKey, enumInit, enumItem, funcEnd int
}

// toolFramings is keyed by encoding: the cookbook gives one set for the
// o200k_base models and one for the cl100k_base models. Other encodings use
// the cl100k_base set.
var toolFramings = map[string]toolFraming{
	O200kBase:  {funcInit: 7, propInit: 3, propKey: 3, enumInit: -3, enumItem: 3, funcEnd: 12},
	Cl100kBase: {funcInit: 10, propInit: 3, propKey: 3, enumInit: -3, enumItem: 3, funcEnd: 12},
}

// toolDef holds the fields of a "function" tool that the cookbook counts.
type toolDef struct {
	Type     string `json:"type"`
	Function *struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Properties map[string]toolProperty `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

type toolProperty struct {
	Type        json.RawMessage   `json:"type"`
	Description string            `json:"description"`
	Enum        []json.RawMessage `json:"enum"`
}

// Tools approximates the tokens that a request's "tools" JSON array adds to
// the prompt, by the OpenAI cookbook's method: per function a fixed start,
// "name:description" as text, and for its top-level parameters a fixed
// start plus, per property, a fixed cost, "name:type:description" as text
// and, for an enum, a fixed cost and the text of each value; a fixed end for
// the whole array. Descriptions lose one trailing period, as in the
// cookbook. Nested schemas below the top-level properties are not counted.
// A tool that is not a function tool, or does not parse, counts as its raw
// JSON text; so does an array that does not parse. nil, "null" and "[]"
// count 0.
func (c *Counter) Tools(model string, tools []byte) int {
	return c.unbounded(model).Tools(tools)
}

// Tools counts a request's tools as Counter.Tools does, within the meter's
// bounds.
func (mt *Meter) Tools(tools []byte) int {
	if isEmptyJSON(tools) {
		return 0
	}
	var entries []json.RawMessage
	if err := json.Unmarshal(tools, &entries); err != nil {
		return mt.Text(string(tools))
	}
	if len(entries) == 0 {
		return 0
	}
	f, ok := toolFramings[mt.framing]
	if !ok {
		f = toolFramings[Cl100kBase]
	}
	n := f.funcEnd
	for _, raw := range entries {
		n += countTool(mt, f, raw)
	}
	return n
}

func countTool(mt *Meter, f toolFraming, raw json.RawMessage) int {
	var t toolDef
	if err := json.Unmarshal(raw, &t); err != nil || t.Function == nil {
		return mt.Text(string(raw))
	}
	fn := t.Function
	n := f.funcInit + mt.Text(fn.Name+":"+strings.TrimSuffix(fn.Description, "."))
	props := fn.Parameters.Properties
	if len(props) == 0 {
		return n
	}
	n += f.propInit
	for name, p := range props {
		n += f.propKey
		if len(p.Enum) > 0 {
			n += f.enumInit
			for _, item := range p.Enum {
				n += f.enumItem + mt.Text(jsonText(item))
			}
		}
		n += mt.Text(name + ":" + jsonText(p.Type) + ":" + strings.TrimSuffix(p.Description, "."))
	}
	return n
}

// jsonText returns a JSON string's value, or any other JSON value's text
// (a type list such as ["string","null"], a numeric enum value).
func jsonText(raw json.RawMessage) string {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s
	}
	return string(raw)
}

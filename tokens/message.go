package tokens

import (
	"bytes"
	"encoding/json"
)

// Framing tokens of OpenAI's published counting rule (the cookbook's
// num_tokens_from_messages, verified there against the API for
// gpt-3.5-turbo, gpt-4, gpt-4o and gpt-4o-mini).
const (
	// TokensPerMessage frames every message: <|start|>{role}\n{content}<|end|>\n.
	TokensPerMessage = 3
	// TokensPerName is added when a message carries a name.
	TokensPerName = 1
	// ReplyPriming is added once per prompt: every reply is primed with
	// <|start|>assistant<|message|>.
	ReplyPriming = 3
)

// Approximations for what the published rule does not cover.
const (
	// ImageTokens is what an image part counts unless it asks for low
	// detail. The real cost depends on the image's size, which the proxy
	// does not fetch or decode; 765 is gpt-4o's price of a 1024×1024 image
	// at high detail (85 base + 4 tiles × 170).
	ImageTokens = 765
	// ImageTokensLow is what an image part with "detail": "low" counts: the
	// fixed 85 tokens OpenAI charges for a low-detail image on gpt-4o.
	ImageTokensLow = 85
	// TokensPerToolCall frames each tool call of an assistant message, on
	// top of its function name and arguments. OpenAI publishes no rule; 3
	// mirrors the per-message framing and is unverified.
	TokensPerToolCall = 3
)

// Message is the part of a chat message that costs tokens.
type Message struct {
	Role, Name, Content string
	// Parts is the JSON array of content parts as sent, or nil. Text and
	// refusal parts count as their text; image parts count ImageTokens or
	// ImageTokensLow; audio and file parts count nothing, since their size
	// cannot be known without decoding them (the upstream's usage reports
	// them). An array that does not parse counts as its raw JSON text.
	Parts []byte
	// ToolCalls is the JSON array of tool calls, or nil. Each call counts
	// its function name and arguments plus TokensPerToolCall; an array that
	// does not parse counts as its raw JSON text.
	ToolCalls []byte
	// ToolCallID counts as text, as the published rule counts every string
	// field of a message.
	ToolCallID string
	Refusal    string
}

// Message counts one message by OpenAI's published rule: TokensPerMessage,
// plus the role and content as text, plus the name as text and
// TokensPerName when there is one. Content parts, tool calls and the tool
// call id are counted by the approximations documented on Message.
func (c *Counter) Message(model string, m Message) int {
	return c.unbounded(model).Message(m)
}

// Messages counts a whole prompt: the sum of Message over ms plus
// ReplyPriming.
func (c *Counter) Messages(model string, ms []Message) int {
	return c.unbounded(model).Messages(ms)
}

// Message counts one message as Counter.Message does, within the meter's
// bounds.
func (mt *Meter) Message(m Message) int {
	n := TokensPerMessage + mt.Text(m.Role) + mt.Text(m.Content)
	if m.Name != "" {
		n += mt.Text(m.Name) + TokensPerName
	}
	n += countParts(mt, m.Parts)
	n += countToolCalls(mt, m.ToolCalls)
	n += mt.Text(m.ToolCallID)
	n += mt.Text(m.Refusal)
	return n
}

// Completion counts a reply the way the API counts its completion_tokens:
// what the model generated (content, content parts, refusal and tool
// calls), without the framing that Message adds for a prompt
// (TokensPerMessage, the role, a name), which the model does not generate.
// Tool calls are counted by the approximation documented on Message.
func (c *Counter) Completion(model string, m Message) int {
	return c.unbounded(model).Completion(m)
}

// Completion counts a reply as Counter.Completion does, within the meter's
// bounds.
func (mt *Meter) Completion(m Message) int {
	return mt.Text(m.Content) + countParts(mt, m.Parts) + countToolCalls(mt, m.ToolCalls) + mt.Text(m.Refusal)
}

// Messages counts a whole prompt as Counter.Messages does, within the
// meter's bounds.
func (mt *Meter) Messages(ms []Message) int {
	n := ReplyPriming
	for _, m := range ms {
		n += mt.Message(m)
	}
	return n
}

// contentPart holds the fields of a content part that cost tokens.
type contentPart struct {
	Type     string `json:"type"`
	Text     string `json:"text"`
	Refusal  string `json:"refusal"`
	ImageURL struct {
		Detail string `json:"detail"`
	} `json:"image_url"`
}

func countParts(mt *Meter, raw []byte) int {
	if isEmptyJSON(raw) {
		return 0
	}
	var parts []contentPart
	if err := json.Unmarshal(raw, &parts); err != nil {
		return mt.Text(string(raw))
	}
	n := 0
	for _, p := range parts {
		switch p.Type {
		case "text":
			n += mt.Text(p.Text)
		case "refusal":
			n += mt.Text(p.Refusal)
		case "image_url":
			if p.ImageURL.Detail == "low" {
				n += ImageTokensLow
			} else {
				n += ImageTokens
			}
		}
	}
	return n
}

// toolCall holds the fields of a tool call that cost tokens: a function
// call, or a custom tool's call with free-form input.
type toolCall struct {
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
	Custom struct {
		Name  string `json:"name"`
		Input string `json:"input"`
	} `json:"custom"`
}

func countToolCalls(mt *Meter, raw []byte) int {
	if isEmptyJSON(raw) {
		return 0
	}
	var calls []toolCall
	if err := json.Unmarshal(raw, &calls); err != nil {
		return mt.Text(string(raw))
	}
	n := 0
	for _, tc := range calls {
		n += TokensPerToolCall +
			mt.Text(tc.Function.Name) + mt.Text(tc.Function.Arguments) +
			mt.Text(tc.Custom.Name) + mt.Text(tc.Custom.Input)
	}
	return n
}

// isEmptyJSON reports whether raw holds no value worth counting: nothing,
// or JSON null.
func isEmptyJSON(raw []byte) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

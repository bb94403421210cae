package tokens

import (
	"testing"
)

// cookbookMessages is the example conversation of the OpenAI cookbook's
// "How to count tokens with tiktoken", section 6 (a system prompt, two
// example exchanges as system messages named "example_user" and
// "example_assistant", and a user message).
var cookbookMessages = []Message{
	{Role: "system", Content: "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
	{Role: "system", Name: "example_user", Content: "New synergies will help drive top-line growth."},
	{Role: "system", Name: "example_assistant", Content: "Things working well together will increase revenue."},
	{Role: "system", Name: "example_user", Content: "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
	{Role: "system", Name: "example_assistant", Content: "Let's talk later when we're less busy about how to do better."},
	{Role: "user", Content: "This late pivot means we don't have time to boil the ocean for the client deliverable."},
}

// TestMessagesCookbook checks the prompt totals the cookbook publishes for
// its example conversation, each matching the API's prompt_tokens: 129 for
// gpt-3.5-turbo, gpt-4-0613 and gpt-4 (cl100k_base), 124 for gpt-4o and
// gpt-4o-mini (o200k_base).
func TestMessagesCookbook(t *testing.T) {
	c := testCounter(t)
	tests := []struct {
		model string
		want  int
	}{
		{"gpt-3.5-turbo", 129},
		{"gpt-3.5-turbo-0613", 129},
		{"gpt-4-0613", 129},
		{"gpt-4", 129},
		{"gpt-4o", 124},
		{"gpt-4o-2024-08-06", 124},
		{"gpt-4o-mini", 124},
	}
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			if got := c.Messages(tt.model, cookbookMessages); got != tt.want {
				t.Errorf("Messages(%s, cookbook example) = %d, want %d", tt.model, got, tt.want)
			}
		})
	}
}

func TestMessages(t *testing.T) {
	c := testCounter(t)
	if got := c.Messages("gpt-4o", nil); got != ReplyPriming {
		t.Errorf("Messages(no messages) = %d, want %d", got, ReplyPriming)
	}
	sum := ReplyPriming
	for _, m := range cookbookMessages {
		sum += c.Message("gpt-4o", m)
	}
	if got := c.Messages("gpt-4o", cookbookMessages); got != sum {
		t.Errorf("Messages = %d, want the sum of Message plus priming, %d", got, sum)
	}
}

// TestMessage checks each field's contribution against the text counts it
// is defined by, so the expected values follow the encoder rather than
// being hard-coded.
func TestMessage(t *testing.T) {
	c := testCounter(t)
	const model = "gpt-4o"
	text := func(s string) int { return c.Text(model, s) }
	base := TokensPerMessage + text("assistant")

	tests := []struct {
		name string
		msg  Message
		want int
	}{
		{
			name: "empty message is the framing alone",
			msg:  Message{},
			want: TokensPerMessage,
		},
		{
			name: "role and content",
			msg:  Message{Role: "assistant", Content: "Hello there, how can I help?"},
			want: base + text("Hello there, how can I help?"),
		},
		{
			name: "name adds its text and one",
			msg:  Message{Role: "assistant", Name: "example_assistant"},
			want: base + text("example_assistant") + TokensPerName,
		},
		{
			name: "text parts count like content",
			msg:  Message{Role: "assistant", Parts: []byte(`[{"type":"text","text":"First part."},{"type":"text","text":"Second part."}]`)},
			want: base + text("First part.") + text("Second part."),
		},
		{
			name: "refusal part",
			msg:  Message{Role: "assistant", Parts: []byte(`[{"type":"refusal","refusal":"I can't help with that."}]`)},
			want: base + text("I can't help with that."),
		},
		{
			name: "image parts count fixed amounts by detail",
			msg: Message{Role: "assistant", Parts: []byte(`[
				{"type":"image_url","image_url":{"url":"https://example.com/a.png","detail":"low"}},
				{"type":"image_url","image_url":{"url":"https://example.com/b.png","detail":"high"}},
				{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]`)},
			want: base + ImageTokensLow + 2*ImageTokens,
		},
		{
			name: "audio and file parts count nothing",
			msg: Message{Role: "assistant", Parts: []byte(`[
				{"type":"input_audio","input_audio":{"data":"UklGRiQAAABXQVZF","format":"wav"}},
				{"type":"file","file":{"file_id":"file-abc"}}]`)},
			want: base,
		},
		{
			name: "null parts count nothing",
			msg:  Message{Role: "assistant", Parts: []byte(" null ")},
			want: base,
		},
		{
			name: "unparsable parts count as raw text",
			msg:  Message{Role: "assistant", Parts: []byte(`[{"type":"text","text":"cut off`)},
			want: base + text(`[{"type":"text","text":"cut off`),
		},
		{
			name: "tool calls count name, arguments and framing",
			msg: Message{Role: "assistant", ToolCalls: []byte(`[
				{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"location\":\"Paris\"}"}},
				{"id":"call_2","type":"function","function":{"name":"get_time","arguments":"{}"}}]`)},
			want: base + 2*TokensPerToolCall +
				text("get_weather") + text(`{"location":"Paris"}`) +
				text("get_time") + text("{}"),
		},
		{
			name: "custom tool call counts name and input",
			msg:  Message{Role: "assistant", ToolCalls: []byte(`[{"id":"call_1","type":"custom","custom":{"name":"sql","input":"SELECT 1"}}]`)},
			want: base + TokensPerToolCall + text("sql") + text("SELECT 1"),
		},
		{
			name: "unparsable tool calls count as raw text",
			msg:  Message{Role: "assistant", ToolCalls: []byte(`{"not":"an array"}`)},
			want: base + text(`{"not":"an array"}`),
		},
		{
			name: "tool result counts its id and content",
			msg:  Message{Role: "tool", ToolCallID: "call_abc123", Content: "18°C and sunny"},
			want: TokensPerMessage + text("tool") + text("call_abc123") + text("18°C and sunny"),
		},
		{
			name: "refusal",
			msg:  Message{Role: "assistant", Refusal: "I'm sorry, I can't help with that."},
			want: base + text("I'm sorry, I can't help with that."),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := c.Message(model, tt.msg); got != tt.want {
				t.Errorf("Message = %d, want %d", got, tt.want)
			}
		})
	}
}

// TestMessageEncodingMatters guards against counting every model with one
// encoding: the cookbook's Japanese example is 8 tokens in o200k_base and 9
// in cl100k_base.
func TestMessageEncodingMatters(t *testing.T) {
	c := testCounter(t)
	m := Message{Role: "user", Content: "お誕生日おめでとう"}
	o200k, cl100k := c.Message("gpt-4o", m), c.Message("gpt-4", m)
	if cl100k-o200k != 1 {
		t.Errorf("Message: got gpt-4o %d and gpt-4 %d, want gpt-4 one token more", o200k, cl100k)
	}
}

func TestCompletionCountsOnlyWhatIsGenerated(t *testing.T) {
	c := testCounter(t)
	for _, model := range []string{"gpt-4o", "gpt-4"} {
		content := Message{Role: "assistant", Content: "The capital of France is Paris."}
		// The API's completion_tokens for this reply is its content alone:
		// no role, no per-message framing.
		if got, want := c.Completion(model, content), c.Text(model, content.Content); got != want {
			t.Errorf("%s: content reply: got %d, want %d (the content's tokens)", model, got, want)
		}
		if got, want := c.Message(model, content)-c.Completion(model, content), TokensPerMessage+c.Text(model, "assistant"); got != want {
			t.Errorf("%s: Message - Completion: got %d, want the framing %d", model, got, want)
		}
		calls := Message{Role: "assistant", ToolCalls: []byte(`[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]`)}
		if got, want := c.Completion(model, calls), TokensPerToolCall+c.Text(model, "get_weather")+c.Text(model, `{"city":"Paris"}`); got != want {
			t.Errorf("%s: tool-call reply: got %d, want %d", model, got, want)
		}
		refusal := Message{Role: "assistant", Refusal: "I can't help with that."}
		if got, want := c.Completion(model, refusal), c.Text(model, refusal.Refusal); got != want {
			t.Errorf("%s: refusal: got %d, want %d", model, got, want)
		}
	}
}

package tokens

import (
	"testing"
)

// weatherTools and weatherMessages are the OpenAI cookbook's tool example
// ("How to count tokens with tiktoken", section 7).
const weatherTools = `[
  {
    "type": "function",
    "function": {
      "name": "get_current_weather",
      "description": "Get the current weather in a given location",
      "parameters": {
        "type": "object",
        "properties": {
          "location": {
            "type": "string",
            "description": "The city and state, e.g. San Francisco, CA"
          },
          "unit": {"type": "string",
                   "description": "The unit of temperature to return",
                   "enum": ["celsius", "fahrenheit"]}
        },
        "required": ["location"]
      }
    }
  }
]`

var weatherMessages = []Message{
	{Role: "system", Content: "You are a helpful assistant that can answer to questions about the weather."},
	{Role: "user", Content: "What's the weather like in San Francisco?"},
}

// TestToolsCookbook checks the prompt totals the cookbook publishes for its
// tool example, each matching the API's prompt_tokens: 105 for
// gpt-3.5-turbo and gpt-4, 101 for gpt-4o and gpt-4o-mini.
func TestToolsCookbook(t *testing.T) {
	c := testCounter(t)
	tests := []struct {
		model string
		want  int
	}{
		{"gpt-3.5-turbo", 105},
		{"gpt-4", 105},
		{"gpt-4o", 101},
		{"gpt-4o-mini", 101},
	}
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			got := c.Messages(tt.model, weatherMessages) + c.Tools(tt.model, []byte(weatherTools))
			if got != tt.want {
				t.Errorf("Messages + Tools (%s, cookbook example) = %d, want %d", tt.model, got, tt.want)
			}
		})
	}
}

func TestTools(t *testing.T) {
	c := testCounter(t)
	const model = "gpt-4o"
	text := func(s string) int { return c.Text(model, s) }
	f := toolFramings[O200kBase]
	oneTool := c.Tools(model, []byte(weatherTools)) - f.funcEnd

	tests := []struct {
		name  string
		tools string
		want  int
	}{
		{name: "nil", tools: "", want: 0},
		{name: "null", tools: "null", want: 0},
		{name: "empty array", tools: "[]", want: 0},
		{
			name:  "function without parameters",
			tools: `[{"type":"function","function":{"name":"now","description":"Current time."}}]`,
			want:  f.funcEnd + f.funcInit + text("now:Current time"),
		},
		{
			name: "non-string type and numeric enum",
			tools: `[{"type":"function","function":{"name":"pick","description":"Pick",
				"parameters":{"type":"object","properties":{"n":{"type":["integer","null"],"description":"How many.","enum":[1,2]}}}}}]`,
			want: f.funcEnd + f.funcInit + text("pick:Pick") + f.propInit + f.propKey +
				f.enumInit + 2*f.enumItem + text("1") + text("2") + text(`n:["integer","null"]:How many`),
		},
		{
			name:  "two tools share one end",
			tools: "[" + weatherTools[1:len(weatherTools)-1] + "," + weatherTools[1:len(weatherTools)-1] + "]",
			want:  f.funcEnd + 2*oneTool,
		},
		{
			name:  "non-function tool counts as raw text",
			tools: `[{"type":"custom","custom":{"name":"sql"}}]`,
			want:  f.funcEnd + text(`{"type":"custom","custom":{"name":"sql"}}`),
		},
		{
			name:  "unparsable array counts as raw text",
			tools: `[{"type":"function"`,
			want:  text(`[{"type":"function"`),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var raw []byte
			if tt.tools != "" {
				raw = []byte(tt.tools)
			}
			if got := c.Tools(model, raw); got != tt.want {
				t.Errorf("Tools = %d, want %d", got, tt.want)
			}
		})
	}
}

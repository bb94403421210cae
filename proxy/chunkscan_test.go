package proxy

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/benchfix"
)

// chunkView is what reply.add and the stream's framing read of a chunk.
func chunkView(c *chunk) string {
	var b strings.Builder
	str := func(p *string) string {
		if p == nil {
			return "<nil>"
		}
		return fmt.Sprintf("%q", *p)
	}
	failed := (len(c.Error) > 0 && string(c.Error) != "null") || c.Object == "error"
	fmt.Fprintf(&b, "failed=%v usage=%v choices=%d", failed, c.Usage != nil, len(c.Choices))
	if c.Usage != nil {
		fmt.Fprintf(&b, " %+v", c.Usage.usage())
	}
	for _, ch := range c.Choices {
		fmt.Fprintf(&b, " [%d content=%s refusal=%s finish=%s tools=%d", ch.Index, str(ch.Delta.Content),
			str(ch.Delta.Refusal), str(ch.FinishReason), len(ch.Delta.ToolCalls))
		for _, tc := range ch.Delta.ToolCalls {
			idx := "<nil>"
			if tc.Index != nil {
				idx = fmt.Sprint(*tc.Index)
			}
			fmt.Fprintf(&b, " (%s %q %q %q %q)", idx, tc.ID, tc.Type, tc.Function.Name, tc.Function.Arguments)
		}
		b.WriteString("]")
	}
	return b.String()
}

// usualChunks are chunks as OpenAI, vLLM and others send them: the
// scanner reads them all itself.
var usualChunks = []string{
	`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}`,
	`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}`,
	`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}`,
	`{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"line\nnext \"quoted\" \u4f60\u597d \ud83d\ude00 \\ \/ \t"},"finish_reason":null}]}`,
	`{"id":"c","choices":[{"index":1,"delta":{"content":"b"}},{"index":0,"delta":{"content":"a"}}]}`,
	`{"id":"c","choices":[{"index":0,"delta":{"refusal":"I can't"},"finish_reason":null}]}`,
	`{"id":"c","choices":[{"index":0,"delta":{"reasoning_content":"hmm","content":null,"tool_calls":null},"finish_reason":null,"stop_reason":null,"logprobs":{"content":[{"token":"a","logprob":-0.5,"bytes":[97],"top_logprobs":[]}]}}]}`,
	` { "choices" : [ { "index" : 0 , "delta" : { "content" : "x" } } ] , "created" : 1.5e3 , "x" : [ true , false , null , -0.0 , {} , [] ] } `,
	`{"choices":[]}`, `{"choices":null}`, `{}`, `{"object":"chat.completion.chunk","choices":[{"index":0,"delta":null}]}`,
	`{"choices":[{"index":0,"delta":{"content":"\ud800"}}]}`,
	`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}`,
	`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]},"finish_reason":null}]}`,
	`{"choices":[{"index":0,"delta":{"tool_calls":[{"id":"a","function":{"name":"f"}},{"index":null,"id":null,"type":null,"function":null},{"index":3,"extra":[1]}]}}]}`,
	`{"choices":[{"index":0,"delta":{"tool_calls":[]}}]}`,
}

// unusualChunks are left to encoding/json; some are not JSON at all.
var unusualChunks = []string{
	`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":5}]}}]}`, `{"choices":[{"index":0,"delta":{"tool_calls":[{"Index":0}]}}]}`,
	`{"choices":[{"index":0,"delta":{"tool_calls":{}}}]}`, `{"choices":[{"index":0,"delta":{"tool_calls":[{"function":{"name":"a","name":"b"}}]}}]}`,
	`{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}}`,
	`{"error":{"message":"boom","type":"server_error"}}`, `{"object":"error","message":"boom"}`,
	`{"Choices":[{"index":0,"delta":{"content":"case"}}]}`, `{"choices":[{"index":0,"delta":{"Content":"case"}}]}`,
	`{"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}`, `{"choices":[{"index":0,"delta":{"content":"a"}}],"choices":[{"index":1}]}`,
	`{"choices":[{"index":1.0,"delta":{"content":"a"}}]}`, `{"choices":[{"index":"0"}]}`, `{"choices":[{"index":99999999999999999999}]}`,
	`{"choices":[{"index":0,"delta":{"content":5}}]}`, `{"choices":[null]}`, `{"choices":{}}`, "{\"choices\":[{\"delta\":{\"content\":\"\xff\"}}]}",
	`{"choices":[{"delta":{"content":"a"}}]`, `{"choices":[{"delta":{"content":"a"}}]}x`, `[1]`, `"s"`, `nul`, ``, `{"a":01}`, `{"a":"\x"}`,
	"{\"a\":\"\x01\"}", `{"ch\u006fices":[{"index":0,"delta":{"content":"escaped key"}}]}`, `{"choices":[{"index":0,"delta":{"content":"a"}}],"error":null}`,
}

// TestChunkScan: the scanner reads the usual chunks itself, and what it
// reads is what encoding/json reads; the unusual ones are read as
// encoding/json reads them either way.
func TestChunkScan(t *testing.T) {
	_, events, withUsage := benchfix.Replies(0)
	usual := append([]string{}, usualChunks...)
	for _, ev := range append(events, withUsage...) {
		if data, done := eventData(ev); data != nil && !done && !strings.Contains(string(data), `"usage":{`) {
			usual = append(usual, string(data))
		}
	}
	for _, data := range usual {
		var c chunk
		var texts []choiceScratch
		var scratch []byte
		require.True(t, scanChunk([]byte(data), &c, &texts, &scratch), "the scanner left %s to encoding/json", data)
		var want chunk
		require.NoError(t, json.Unmarshal([]byte(data), &want))
		require.Equal(t, chunkView(&want), chunkView(&c), data)
	}
	for _, data := range unusualChunks {
		checkChunk(t, []byte(data))
	}
}

// checkChunk holds the decoder (scanner first) to json.Unmarshal on data.
func checkChunk(t *testing.T, data []byte) {
	var want chunk
	wantErr := json.Unmarshal(data, &want)
	var d chunkDecoder
	got, ok := d.decode(data)
	require.Equal(t, wantErr == nil, ok, "%q: json.Unmarshal says %v", data, wantErr)
	if ok {
		require.Equal(t, chunkView(&want), chunkView(got), "%q", data)
	}
}

// FuzzChunkScan: whatever the data, a chunk decodes as json.Unmarshal
// decodes it. go test -fuzz FuzzChunkScan ./proxy/
func FuzzChunkScan(f *testing.F) {
	for _, s := range append(append([]string{}, usualChunks...), unusualChunks...) {
		f.Add([]byte(s))
	}
	f.Fuzz(checkChunk)
}

// TestChunkDecoderReusesNothingStale: a chunk decoded after another keeps
// nothing of it (the scanner reuses the choices and their texts).
func TestChunkDecoderReusesNothingStale(t *testing.T) {
	var d chunkDecoder
	u := usualChunks
	seq := []string{u[4], u[2], u[13], u[1], u[8], u[3], u[14], u[15], u[16], u[13], u[0], u[12]}
	for _, data := range seq {
		checkChunk(t, []byte(data)) // fresh decoder
		var want chunk
		require.NoError(t, json.Unmarshal([]byte(data), &want))
		got, ok := d.decode([]byte(data))
		require.True(t, ok)
		require.Equal(t, chunkView(&want), chunkView(got), data)
	}
}

// TestChunkScanDeepNesting: a skipped value nested near encoding/json's
// limit (10,000 levels, counted from the chunk itself) is read only if
// encoding/json reads it. The scanner counted the depth from the skipped
// value, and read chunks encoding/json refuses.
func TestChunkScanDeepNesting(t *testing.T) {
	for _, wrap := range []string{`{"x":%s,"choices":[{"index":0,"delta":{"content":"a"}}]}`,
		`{"choices":[{"index":0,"delta":{"content":"a","x":%s}}]}`,
		`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"a","x":%s}}]}}]}`} {
		for k := 9985; k <= 10003; k++ {
			data := []byte(fmt.Sprintf(wrap, strings.Repeat("[", k)+strings.Repeat("]", k)))
			var want chunk
			wantErr := json.Unmarshal(data, &want)
			var d chunkDecoder
			got, ok := d.decode(data)
			require.Equal(t, wantErr == nil, ok, "%.60s with %d levels: json.Unmarshal says %v", wrap, k, wantErr)
			if ok {
				require.Equal(t, chunkView(&want), chunkView(got), "%.60s with %d levels", wrap, k)
			}
		}
	}
}

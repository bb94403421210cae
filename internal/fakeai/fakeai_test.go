package fakeai

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"
)

// sdk returns the official client pointed at s. Retries are off so that a
// queued error reply is seen once, as sent.
func sdk(s *Server) *openai.Client {
	c := openai.NewClient(option.WithBaseURL(s.URL), option.WithAPIKey("test"), option.WithMaxRetries(0))
	return &c
}

// testCtx bounds a test's requests so a broken fake fails instead of hanging.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// rawClient sees the bytes on the wire: the transport neither adds
// Accept-Encoding nor decompresses.
func rawClient(t *testing.T) *http.Client {
	tr := &http.Transport{DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func post(t *testing.T, ctx context.Context, c *http.Client, url, body string, header http.Header) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header[k] = v
	}
	res, err := c.Do(req)
	require.NoError(t, err)
	t.Cleanup(func() { res.Body.Close() })
	return res
}

var twoMessages = []openai.ChatCompletionMessageParamUnion{
	openai.SystemMessage("be brief"),
	openai.UserMessage("hello there"),
}

func TestChatCompletion(t *testing.T) {
	type want struct {
		content, refusal, finish string
		toolCalls                []ToolCall
		choices                  int
		prompt, completion       int64
		cached, reasoning        int64
	}
	tests := []struct {
		name  string
		n     int64
		reply *Reply // nil: the default echo
		want  want
	}{
		{
			name: "default echo with estimated usage",
			// prompt: len("be brief")+len("hello there") = 19 chars -> 4;
			// completion: 30 chars -> 7.
			want: want{content: "echo: hello there [messages=2]", finish: "stop", choices: 1, prompt: 4, completion: 7},
		},
		{
			name:  "queued usage with details",
			reply: &Reply{Content: "hi", Usage: &Usage{PromptTokens: 10, CompletionTokens: 5, CachedTokens: 3, ReasoningTokens: 2}},
			want:  want{content: "hi", finish: "stop", choices: 1, prompt: 10, completion: 5, cached: 3, reasoning: 2},
		},
		{
			name:  "tool calls",
			reply: &Reply{ToolCalls: []ToolCall{{ID: "call_a", Name: "get_weather", Arguments: `{"city":"Paris"}`}}, Usage: &Usage{PromptTokens: 1, CompletionTokens: 1}},
			want:  want{finish: "tool_calls", choices: 1, toolCalls: []ToolCall{{ID: "call_a", Name: "get_weather", Arguments: `{"city":"Paris"}`}}, prompt: 1, completion: 1},
		},
		{
			name:  "refusal",
			reply: &Reply{Refusal: "I can't help with that.", Usage: &Usage{PromptTokens: 1, CompletionTokens: 1}},
			want:  want{refusal: "I can't help with that.", finish: "stop", choices: 1, prompt: 1, completion: 1},
		},
		{
			name:  "n=2 gives two choices, the second prefixed",
			n:     2,
			reply: &Reply{Content: "same", FinishReason: "length", Usage: &Usage{PromptTokens: 1, CompletionTokens: 1}},
			want:  want{content: "same", finish: "length", choices: 2, prompt: 1, completion: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			if tt.reply != nil {
				s.Enqueue(*tt.reply)
			}
			params := openai.ChatCompletionNewParams{Model: "gpt-4o-mini", Messages: twoMessages}
			if tt.n > 0 {
				params.N = openai.Int(tt.n)
			}
			res, err := sdk(s).Chat.Completions.New(testCtx(t), params)
			require.NoError(t, err)

			if got := len(res.Choices); got != tt.want.choices {
				t.Fatalf("got %d choices, want %d", got, tt.want.choices)
			}
			msg := res.Choices[0].Message
			if msg.Content != tt.want.content {
				t.Errorf("got content %q, want %q", msg.Content, tt.want.content)
			}
			if msg.Refusal != tt.want.refusal {
				t.Errorf("got refusal %q, want %q", msg.Refusal, tt.want.refusal)
			}
			if got := res.Choices[0].FinishReason; got != tt.want.finish {
				t.Errorf("got finish_reason %q, want %q", got, tt.want.finish)
			}
			var calls []ToolCall
			for _, c := range msg.ToolCalls {
				calls = append(calls, ToolCall{ID: c.ID, Name: c.Function.Name, Arguments: c.Function.Arguments})
			}
			require.Equal(t, tt.want.toolCalls, calls, "tool calls")
			for i := 1; i < len(res.Choices); i++ {
				if got, want := res.Choices[i].Message.Content, "[choice 1] "+tt.want.content; got != want {
					t.Errorf("choice %d: got content %q, want %q", i, got, want)
				}
			}
			u := res.Usage
			gotUsage := [5]int64{u.PromptTokens, u.CompletionTokens, u.TotalTokens, u.PromptTokensDetails.CachedTokens, u.CompletionTokensDetails.ReasoningTokens}
			wantUsage := [5]int64{tt.want.prompt, tt.want.completion, tt.want.prompt + tt.want.completion, tt.want.cached, tt.want.reasoning}
			if gotUsage != wantUsage {
				t.Errorf("got usage [prompt completion total cached reasoning] %v, want %v", gotUsage, wantUsage)
			}
			if res.Object != "chat.completion" || res.Model != "gpt-4o-mini" || !strings.HasPrefix(res.ID, "chatcmpl-") {
				t.Errorf("got object %q model %q id %q, want chat.completion, gpt-4o-mini, chatcmpl-...", res.Object, res.Model, res.ID)
			}
		})
	}
}

func TestChatStreamAccumulates(t *testing.T) {
	parallel := []ToolCall{
		{ID: "call_1", Name: "get_weather", Arguments: `{"city":"Paris","unit":"celsius"}`},
		{ID: "call_2", Name: "get_time", Arguments: `{"tz":"Europe/Paris"}`},
	}
	tests := []struct {
		name         string
		includeUsage bool
		n            int64
		reply        *Reply
		wantContent  string
		wantCalls    []ToolCall
		wantFinish   string
		wantChoices  int
		wantUsage    [3]int64 // prompt, completion, total
	}{
		{
			name:        "default echo without usage",
			wantContent: "echo: hello there [messages=2]",
			wantFinish:  "stop",
			wantChoices: 1,
		},
		{
			name:         "include_usage accumulates the usage chunk",
			includeUsage: true,
			reply:        &Reply{Content: "a b c", Usage: &Usage{PromptTokens: 7, CompletionTokens: 3}},
			wantContent:  "a b c",
			wantFinish:   "stop",
			wantChoices:  1,
			wantUsage:    [3]int64{7, 3, 10},
		},
		{
			name:         "include_usage with estimated usage",
			includeUsage: true,
			wantContent:  "echo: hello there [messages=2]",
			wantFinish:   "stop",
			wantChoices:  1,
			wantUsage:    [3]int64{4, 7, 11},
		},
		{
			name:        "explicit deltas",
			reply:       &Reply{Deltas: []string{"Hel", "lo", ", wor", "ld"}},
			wantContent: "Hello, world",
			wantFinish:  "stop",
			wantChoices: 1,
		},
		{
			name:        "parallel tool calls",
			reply:       &Reply{ToolCalls: parallel},
			wantCalls:   parallel,
			wantFinish:  "tool_calls",
			wantChoices: 1,
		},
		{
			name:        "content then a tool call",
			reply:       &Reply{Content: "Let me check.", ToolCalls: parallel[:1]},
			wantContent: "Let me check.",
			wantCalls:   parallel[:1],
			wantFinish:  "tool_calls",
			wantChoices: 1,
		},
		{
			name:        "n=2 interleaves two choices",
			n:           2,
			reply:       &Reply{Content: "x y"},
			wantContent: "x y",
			wantFinish:  "stop",
			wantChoices: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			if tt.reply != nil {
				s.Enqueue(*tt.reply)
			}
			params := openai.ChatCompletionNewParams{Model: "gpt-4o-mini", Messages: twoMessages}
			if tt.includeUsage {
				params.StreamOptions.IncludeUsage = openai.Bool(true)
			}
			if tt.n > 0 {
				params.N = openai.Int(tt.n)
			}
			stream := sdk(s).Chat.Completions.NewStreaming(testCtx(t), params)
			var acc openai.ChatCompletionAccumulator
			chunks := 0
			for stream.Next() {
				chunks++
				if !acc.AddChunk(stream.Current()) {
					t.Fatalf("chunk %d did not accumulate", chunks)
				}
			}
			require.NoError(t, stream.Err())
			if chunks < 3 {
				t.Errorf("got %d chunks, want at least 3 (role, deltas, finish)", chunks)
			}
			if got := len(acc.Choices); got != tt.wantChoices {
				t.Fatalf("got %d choices, want %d", got, tt.wantChoices)
			}
			msg := acc.Choices[0].Message
			if msg.Content != tt.wantContent {
				t.Errorf("got content %q, want %q", msg.Content, tt.wantContent)
			}
			if msg.Role != "assistant" {
				t.Errorf("got role %q, want assistant", msg.Role)
			}
			if got := acc.Choices[0].FinishReason; got != tt.wantFinish {
				t.Errorf("got finish_reason %q, want %q", got, tt.wantFinish)
			}
			var calls []ToolCall
			for _, c := range msg.ToolCalls {
				if c.Type != "function" {
					t.Errorf("tool call %s: got type %q, want function", c.ID, c.Type)
				}
				calls = append(calls, ToolCall{ID: c.ID, Name: c.Function.Name, Arguments: c.Function.Arguments})
			}
			require.Equal(t, tt.wantCalls, calls, "accumulated tool calls")
			if tt.wantChoices > 1 {
				if got, want := acc.Choices[1].Message.Content, "[choice 1] "+tt.wantContent; got != want {
					t.Errorf("choice 1: got content %q, want %q", got, want)
				}
			}
			gotUsage := [3]int64{acc.Usage.PromptTokens, acc.Usage.CompletionTokens, acc.Usage.TotalTokens}
			if gotUsage != tt.wantUsage {
				t.Errorf("got usage [prompt completion total] %v, want %v", gotUsage, tt.wantUsage)
			}
		})
	}
}

// sseEvents splits a complete SSE body into its data payloads and fails the
// test unless every event is exactly one "data: " line followed by a blank
// line.
func sseEvents(t *testing.T, body string) []string {
	t.Helper()
	if !strings.HasSuffix(body, "\n\n") {
		t.Fatalf("body does not end with a blank line: %q", body)
	}
	var out []string
	for _, ev := range strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		payload, ok := strings.CutPrefix(ev, "data: ")
		if !ok || strings.Contains(payload, "\n") {
			t.Fatalf("got event %q, want a single data: line", ev)
		}
		out = append(out, payload)
	}
	return out
}

// objectKeys returns the keys of a JSON object in the order they appear.
func objectKeys(t *testing.T, data string) []string {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(data))
	tok, err := dec.Token()
	require.NoError(t, err)
	require.Equal(t, json.Delim('{'), tok)
	var keys []string
	for dec.More() {
		k, err := dec.Token()
		require.NoError(t, err)
		keys = append(keys, k.(string))
		var skip json.RawMessage
		require.NoError(t, dec.Decode(&skip))
	}
	return keys
}

// TestStreamFraming checks the stream byte by byte where clients and proxies
// depend on it: the event framing, the role and finish deltas, and usage
// being null on every chunk with include_usage and absent without.
func TestStreamFraming(t *testing.T) {
	tests := []struct {
		name         string
		streamOpts   string
		includeUsage bool
	}{
		{name: "without include_usage"},
		{name: "include_usage false", streamOpts: `,"stream_options":{"include_usage":false}`},
		{name: "include_usage true", streamOpts: `,"stream_options":{"include_usage":true}`, includeUsage: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			s.Enqueue(Reply{Content: "Hi there", Usage: &Usage{PromptTokens: 5, CompletionTokens: 2, CachedTokens: 1}})
			body := `{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]` + tt.streamOpts + `}`
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", body, nil)
			if res.StatusCode != http.StatusOK {
				t.Fatalf("got status %d, want 200", res.StatusCode)
			}
			if got := res.Header.Get("Content-Type"); got != "text/event-stream" {
				t.Errorf("got Content-Type %q, want text/event-stream", got)
			}
			raw, err := io.ReadAll(res.Body)
			require.NoError(t, err)
			events := sseEvents(t, string(raw))
			if got := events[len(events)-1]; got != "[DONE]" {
				t.Fatalf("got last event %q, want [DONE]", got)
			}
			chunks := events[:len(events)-1]

			wantDeltas := []string{`{"role":"assistant","content":"","refusal":null}`, `{"content":"Hi"}`, `{"content":" there"}`, `{}`}
			wantChunks := len(wantDeltas)
			if tt.includeUsage {
				wantChunks++
			}
			if len(chunks) != wantChunks {
				t.Fatalf("got %d chunks, want %d: %q", len(chunks), wantChunks, chunks)
			}
			wantKeys := []string{"id", "object", "created", "model", "service_tier", "system_fingerprint", "choices"}
			if tt.includeUsage {
				wantKeys = append(wantKeys, "usage")
			}
			for i, c := range chunks {
				require.Equal(t, wantKeys, objectKeys(t, c), "chunk %d keys", i)
				var chunk struct {
					Object  string            `json:"object"`
					Choices []json.RawMessage `json:"choices"`
					Usage   json.RawMessage   `json:"usage"`
				}
				require.NoError(t, json.Unmarshal([]byte(c), &chunk))
				if chunk.Object != "chat.completion.chunk" {
					t.Errorf("chunk %d: got object %q, want chat.completion.chunk", i, chunk.Object)
				}
				if i == len(wantDeltas) { // the usage chunk
					if len(chunk.Choices) != 0 || !strings.Contains(c, `"choices":[]`) {
						t.Errorf("usage chunk: got choices %s, want []", chunk.Choices)
					}
					want := `{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}`
					if string(chunk.Usage) != want {
						t.Errorf("usage chunk: got usage %s, want %s", chunk.Usage, want)
					}
					continue
				}
				if tt.includeUsage && string(chunk.Usage) != "null" {
					t.Errorf("chunk %d: got usage %s, want null", i, chunk.Usage)
				}
				var choice struct {
					Index        int             `json:"index"`
					Delta        json.RawMessage `json:"delta"`
					Logprobs     json.RawMessage `json:"logprobs"`
					FinishReason json.RawMessage `json:"finish_reason"`
				}
				require.Len(t, chunk.Choices, 1)
				require.NoError(t, json.Unmarshal(chunk.Choices[0], &choice))
				if string(choice.Delta) != wantDeltas[i] {
					t.Errorf("chunk %d: got delta %s, want %s", i, choice.Delta, wantDeltas[i])
				}
				wantFinish := "null"
				if i == len(wantDeltas)-1 {
					wantFinish = `"stop"`
				}
				if string(choice.FinishReason) != wantFinish || string(choice.Logprobs) != "null" {
					t.Errorf("chunk %d: got finish_reason %s logprobs %s, want %s and null", i, choice.FinishReason, choice.Logprobs, wantFinish)
				}
			}
		})
	}
}

// TestWireShapes pins the exact JSON of tool calls, refusals and errors,
// which the SDK would parse just as well in other shapes but a proxy that
// rewrites or scans bytes might not.
func TestWireShapes(t *testing.T) {
	calls := []ToolCall{{ID: "call_1", Name: "a", Arguments: `{"x":1}`}, {ID: "call_2", Name: "b"}}
	tests := []struct {
		name   string
		stream bool
		reply  Reply
		// want is the message (non-stream) or each chunk's delta (stream).
		want []string
	}{
		{
			name:  "tool calls, non-stream",
			reply: Reply{ToolCalls: calls},
			want:  []string{`{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"a","arguments":"{\"x\":1}"}},{"id":"call_2","type":"function","function":{"name":"b","arguments":""}}],"refusal":null,"annotations":[]}`},
		},
		{
			name:   "tool calls, stream",
			stream: true,
			reply:  Reply{ToolCalls: calls},
			want: []string{
				`{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"a","arguments":""}}],"refusal":null}`,
				`{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":"}}]}`,
				`{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}`,
				`{"tool_calls":[{"index":1,"id":"call_2","type":"function","function":{"name":"b","arguments":""}}]}`,
				`{}`,
			},
		},
		{
			name:  "content, non-stream",
			reply: Reply{Content: "<b>&</b>"},
			want:  []string{`{"role":"assistant","content":"<b>&</b>","refusal":null,"annotations":[]}`},
		},
		{
			name:  "refusal, non-stream",
			reply: Reply{Refusal: "No."},
			want:  []string{`{"role":"assistant","content":null,"refusal":"No.","annotations":[]}`},
		},
		{
			name:   "refusal, stream",
			stream: true,
			reply:  Reply{Refusal: "No way."},
			want:   []string{`{"role":"assistant","content":null,"refusal":""}`, `{"refusal":"No"}`, `{"refusal":" way."}`, `{}`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			s.Enqueue(tt.reply)
			body := `{"model":"m","messages":[{"role":"user","content":"x"}]}`
			if tt.stream {
				body = `{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}`
			}
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", body, nil)
			raw, err := io.ReadAll(res.Body)
			require.NoError(t, err)
			var got []string
			if !tt.stream {
				var c struct {
					Choices []struct {
						Message json.RawMessage `json:"message"`
					} `json:"choices"`
				}
				require.NoError(t, json.Unmarshal(raw, &c))
				require.Equal(t, []string{"id", "object", "created", "model", "choices", "usage", "service_tier", "system_fingerprint"}, objectKeys(t, string(raw)))
				got = append(got, string(c.Choices[0].Message))
			} else {
				events := sseEvents(t, string(raw))
				for _, ev := range events[:len(events)-1] {
					var c struct {
						Choices []struct {
							Delta json.RawMessage `json:"delta"`
						} `json:"choices"`
					}
					require.NoError(t, json.Unmarshal([]byte(ev), &c))
					got = append(got, string(c.Choices[0].Delta))
				}
			}
			require.Equal(t, tt.want, got)
		})
	}
}

func TestErrorReplies(t *testing.T) {
	tests := []struct {
		name      string
		stream    bool
		reply     Reply
		wantRaw   string // the "error" object as sent
		wantRetry string // Retry-After response header
	}{
		{
			name:      "rate limited with code and Retry-After",
			reply:     Reply{Status: 429, ErrorMessage: "Rate limit reached", ErrorType: "requests", ErrorCode: "rate_limit_exceeded", Header: http.Header{"Retry-After": {"1"}}},
			wantRaw:   `{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}`,
			wantRetry: "1",
		},
		{
			name:    "server error defaults",
			reply:   Reply{Status: 500},
			wantRaw: `{"message":"Internal Server Error","type":"server_error","param":null,"code":null}`,
		},
		{
			name:    "client error on a streaming request",
			stream:  true,
			reply:   Reply{Status: 400, ErrorMessage: "bad", ErrorCode: "context_length_exceeded"},
			wantRaw: `{"message":"bad","type":"invalid_request_error","param":null,"code":"context_length_exceeded"}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			s.Enqueue(tt.reply)
			client := sdk(s)
			params := openai.ChatCompletionNewParams{Model: "gpt-4o-mini", Messages: twoMessages}
			var err error
			if tt.stream {
				stream := client.Chat.Completions.NewStreaming(testCtx(t), params)
				for stream.Next() {
					t.Errorf("got chunk %s, want none", stream.Current().RawJSON())
				}
				err = stream.Err()
			} else {
				_, err = client.Chat.Completions.New(testCtx(t), params)
			}
			var apiErr *openai.Error
			if !errors.As(err, &apiErr) {
				t.Fatalf("got error %v (%T), want *openai.Error", err, err)
			}
			if apiErr.StatusCode != tt.reply.Status {
				t.Errorf("got status %d, want %d", apiErr.StatusCode, tt.reply.Status)
			}
			if apiErr.Code != tt.reply.ErrorCode {
				t.Errorf("got code %q, want %q", apiErr.Code, tt.reply.ErrorCode)
			}
			if got := apiErr.RawJSON(); got != tt.wantRaw {
				t.Errorf("got error object %s, want %s", got, tt.wantRaw)
			}
			if got := apiErr.Response.Header.Get("Retry-After"); got != tt.wantRetry {
				t.Errorf("got Retry-After %q, want %q", got, tt.wantRetry)
			}
		})
	}
}

func TestCutAfter(t *testing.T) {
	// "one two three" streams as 5 chunks: role, 3 words, finish.
	tests := []struct {
		name       string
		cutAfter   int
		wantChunks int
	}{
		{name: "mid-stream", cutAfter: 2, wantChunks: 2},
		{name: "after every chunk but before [DONE]", cutAfter: 100, wantChunks: 5},
	}
	for _, tt := range tests {
		t.Run(tt.name+" via SDK", func(t *testing.T) {
			s := New(t)
			s.Enqueue(Reply{Content: "one two three", CutAfter: tt.cutAfter})
			stream := sdk(s).Chat.Completions.NewStreaming(testCtx(t), openai.ChatCompletionNewParams{Model: "m", Messages: twoMessages})
			chunks := 0
			for stream.Next() {
				chunks++
			}
			if chunks != tt.wantChunks {
				t.Errorf("got %d chunks, want %d", chunks, tt.wantChunks)
			}
			if stream.Err() == nil {
				t.Error("got no stream error, want one for the cut connection")
			}
		})
		t.Run(tt.name+" on the wire", func(t *testing.T) {
			s := New(t)
			s.Enqueue(Reply{Content: "one two three", CutAfter: tt.cutAfter})
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", `{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}`, nil)
			raw, err := io.ReadAll(res.Body)
			if !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("got read error %v, want %v", err, io.ErrUnexpectedEOF)
			}
			if got := strings.Count(string(raw), "data: "); got != tt.wantChunks {
				t.Errorf("got %d events, want %d", got, tt.wantChunks)
			}
			if strings.Contains(string(raw), "[DONE]") {
				t.Error("got [DONE] in a cut stream")
			}
		})
	}
}

// TestGate proves that chunks are flushed as they are written: the test
// reads them while the fake is still blocked on the gate.
func TestGate(t *testing.T) {
	tests := []struct {
		name      string
		gzip      bool
		gateAfter int
	}{
		{name: "headers before the first chunk", gateAfter: 0},
		{name: "two chunks", gateAfter: 2},
		{name: "two chunks gzipped", gateAfter: 2, gzip: true},
		{name: "every chunk, before [DONE]", gateAfter: 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			gate := make(chan struct{})
			s.Enqueue(Reply{Content: "one two three", Gate: gate, GateAfter: tt.gateAfter})
			var header http.Header
			if tt.gzip {
				header = http.Header{"Accept-Encoding": {"gzip"}}
			}
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", `{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}`, header)
			var r io.Reader = res.Body
			if tt.gzip {
				if got := res.Header.Get("Content-Encoding"); got != "gzip" {
					t.Fatalf("got Content-Encoding %q, want gzip", got)
				}
				zr, err := gzip.NewReader(res.Body)
				require.NoError(t, err)
				r = zr
			}
			br := bufio.NewReader(r)
			readEvent := func() string {
				t.Helper()
				line, err := br.ReadString('\n')
				require.NoError(t, err)
				blank, err := br.ReadString('\n')
				require.NoError(t, err)
				require.Equal(t, "\n", blank)
				return strings.TrimSuffix(line, "\n")
			}
			before := min(tt.gateAfter, 5) // the stream has 5 chunks
			for range before {
				if ev := readEvent(); !strings.HasPrefix(ev, "data: {") {
					t.Fatalf("got event %q before the gate, want a chunk", ev)
				}
			}
			close(gate)
			var rest []string
			for {
				ev := readEvent()
				rest = append(rest, ev)
				if ev == "data: [DONE]" {
					break
				}
			}
			if got, want := len(rest), 5-before+1; got != want {
				t.Errorf("got %d events after the gate, want %d", got, want)
			}
		})
	}
}

// TestLineEndAndForcedGzip: a stream framed by CRLF or lone CRs, and one
// compressed although the request did not ask for it.
func TestLineEndAndForcedGzip(t *testing.T) {
	tests := []struct {
		name    string
		lineEnd string
		gzip    bool
	}{
		{name: "CRLF", lineEnd: "\r\n"},
		{name: "lone CR", lineEnd: "\r"},
		{name: "gzip without Accept-Encoding", gzip: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			s.Enqueue(Reply{Content: "one two", LineEnd: tt.lineEnd, Gzip: tt.gzip})
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", `{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}`, nil)
			var r io.Reader = res.Body
			if got := res.Header.Get("Content-Encoding") == "gzip"; got != tt.gzip {
				t.Fatalf("got gzip %v, want %v", got, tt.gzip)
			}
			if tt.gzip {
				zr, err := gzip.NewReader(res.Body)
				require.NoError(t, err)
				r = zr
			}
			body, err := io.ReadAll(r)
			require.NoError(t, err)
			le := tt.lineEnd
			if le == "" {
				le = "\n"
			}
			events := strings.Split(strings.TrimSuffix(string(body), le+le), le+le)
			require.Len(t, events, 5, "role, two words, finish, [DONE]: %q", body)
			for _, ev := range events {
				require.True(t, strings.HasPrefix(ev, "data: "), "event %q", ev)
				require.NotContains(t, ev, "\n", "one line ending throughout")
			}
			require.Equal(t, "data: [DONE]", events[4])
		})
	}
}

func TestHeaderDelayStopsWhenClientLeaves(t *testing.T) {
	s := New(t)
	s.Enqueue(Reply{Content: "late", HeaderDelay: 3 * time.Second})
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := sdk(s).Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "m", Messages: twoMessages})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got error %v, want %v", err, context.DeadlineExceeded)
	}
	// httptest.Server.Close waits for running handlers, so it returns
	// quickly only if the delayed handler noticed the client leaving.
	start := time.Now()
	s.ts.Close()
	if d := time.Since(start); d > time.Second {
		t.Errorf("server took %v to close, want the delayed handler to stop early", d)
	}
}

func TestGzip(t *testing.T) {
	tests := []struct {
		acceptEncoding string
		wantGzip       bool
	}{
		{"gzip", true},
		{"br, gzip;q=0.5", true},
		{"gzip;q=0", false},
		{"identity", false},
		{"", false},
	}
	for _, tt := range tests {
		t.Run("Accept-Encoding="+tt.acceptEncoding, func(t *testing.T) {
			s := New(t)
			var header http.Header
			if tt.acceptEncoding != "" {
				header = http.Header{"Accept-Encoding": {tt.acceptEncoding}}
			}
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", `{"model":"m","messages":[{"role":"user","content":"zip"}]}`, header)
			var r io.Reader = res.Body
			gotGzip := res.Header.Get("Content-Encoding") == "gzip"
			if gotGzip != tt.wantGzip {
				t.Fatalf("got gzip %v, want %v", gotGzip, tt.wantGzip)
			}
			if gotGzip {
				zr, err := gzip.NewReader(res.Body)
				require.NoError(t, err)
				r = zr
			}
			var c struct {
				Choices []struct {
					Message struct{ Content string } `json:"message"`
				} `json:"choices"`
			}
			require.NoError(t, json.NewDecoder(r).Decode(&c))
			if got, want := c.Choices[0].Message.Content, "echo: zip [messages=1]"; got != want {
				t.Errorf("got content %q, want %q", got, want)
			}
		})
	}
}

func TestRecordsRequests(t *testing.T) {
	s := New(t)
	params := openai.ChatCompletionNewParams{
		Model:         "gpt-4o",
		Messages:      twoMessages,
		User:          openai.String("alice"),
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	}
	stream := sdk(s).Chat.Completions.NewStreaming(testCtx(t), params)
	for stream.Next() {
	}
	require.NoError(t, stream.Err())

	reqs := s.Requests()
	if len(reqs) != 1 {
		t.Fatalf("got %d requests, want 1", len(reqs))
	}
	got := s.LastChat()
	if got.Method != http.MethodPost || got.Path != "/v1/chat/completions" {
		t.Errorf("got %s %s, want POST /v1/chat/completions", got.Method, got.Path)
	}
	if auth := got.Header.Get("Authorization"); auth != "Bearer test" {
		t.Errorf("got Authorization %q, want %q", auth, "Bearer test")
	}
	require.NotNil(t, got.Chat)
	wantChat := ChatRequest{
		Model: "gpt-4o", Stream: true, IncludeUsage: true, User: "alice",
		Messages: []map[string]any{
			{"role": "system", "content": "be brief"},
			{"role": "user", "content": "hello there"},
		},
	}
	require.Equal(t, wantChat, *got.Chat)
	if !json.Valid(got.Body) {
		t.Errorf("got body %q, want the JSON sent", got.Body)
	}

	// Requests returns copies: changing them leaves the record alone.
	got.Chat.Messages[0]["content"] = "changed"
	got.Header.Set("Authorization", "changed")
	again := s.LastChat()
	if again.Chat.Messages[0]["content"] != "be brief" || again.Header.Get("Authorization") != "Bearer test" {
		t.Error("modifying a returned Request changed the fake's record")
	}
}

func TestQueueThenDefault(t *testing.T) {
	s := New(t)
	s.Enqueue(Reply{Content: "first"})
	s.Enqueue(Reply{Content: "second"})
	s.SetDefault(func(req ChatRequest) Reply { return Reply{Content: "default for " + req.Model} })
	client := sdk(s)
	var got []string
	for range 3 {
		res, err := client.Chat.Completions.New(testCtx(t), openai.ChatCompletionNewParams{Model: "m", Messages: twoMessages})
		require.NoError(t, err)
		got = append(got, res.Choices[0].Message.Content)
	}
	require.Equal(t, []string{"first", "second", "default for m"}, got)
}

// TestValidation checks the requests the API rejects before answering; the
// queued reply must survive them for the next valid request.
func TestValidation(t *testing.T) {
	tests := []struct {
		name, body  string
		wantParam   any
		wantCode    any
		wantMessage string // when not empty, the whole message
	}{
		{name: "not JSON", body: `{"model":`},
		{name: "no model", body: `{"messages":[{"role":"user","content":"x"}]}`},
		{name: "no messages", body: `{"model":"m"}`, wantParam: "messages", wantCode: "missing_required_parameter"},
		{name: "empty messages", body: `{"model":"m","messages":[]}`, wantParam: "messages", wantCode: "empty_array"},
		{name: "stream_options without stream", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}`, wantParam: "stream_options"},
		{name: "tool message after a plain assistant message",
			body: `{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},` +
				`{"role":"tool","tool_call_id":"c1","content":"r"},{"role":"assistant","content":"a"},{"role":"tool","tool_call_id":"c1","content":"r"}]}`,
			wantParam: "messages.[4].role", wantMessage: "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'."},
		{name: "call not answered",
			body: `{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}},{"id":"c2","type":"function","function":{"name":"f","arguments":"{}"}}]},` +
				`{"role":"tool","tool_call_id":"c2","content":"r"},{"role":"user","content":"y"}]}`,
			wantParam: "messages.[3].role", wantMessage: "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: c1"},
		{name: "empty tool_calls",
			body:      `{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":"a","tool_calls":[]},{"role":"user","content":"y"}]}`,
			wantParam: "messages[1].tool_calls", wantCode: "empty_array",
			wantMessage: "Invalid 'messages[1].tool_calls': empty array. Expected an array with minimum length 1, but got an empty array instead."},
	}
	s := New(t)
	s.Enqueue(Reply{Content: "kept"})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", tt.body, nil)
			if res.StatusCode != http.StatusBadRequest {
				t.Errorf("got status %d, want 400", res.StatusCode)
			}
			var e struct {
				Error map[string]any `json:"error"`
			}
			require.NoError(t, json.NewDecoder(res.Body).Decode(&e))
			if e.Error["type"] != "invalid_request_error" || e.Error["message"] == "" {
				t.Errorf("got error %v, want an invalid_request_error with a message", e.Error)
			}
			if tt.wantMessage != "" && e.Error["message"] != tt.wantMessage {
				t.Errorf("got message %q, want %q", e.Error["message"], tt.wantMessage)
			}
			if e.Error["param"] != tt.wantParam || e.Error["code"] != tt.wantCode {
				t.Errorf("got param %v code %v, want %v and %v", e.Error["param"], e.Error["code"], tt.wantParam, tt.wantCode)
			}
		})
	}
	res, err := sdk(s).Chat.Completions.New(testCtx(t), openai.ChatCompletionNewParams{Model: "m", Messages: twoMessages})
	require.NoError(t, err)
	if got := res.Choices[0].Message.Content; got != "kept" {
		t.Errorf("got content %q after rejected requests, want the queued %q", got, "kept")
	}
}

func TestRawReply(t *testing.T) {
	tests := []struct {
		name       string
		reply      Reply
		wantStatus int
		wantType   string
	}{
		{name: "not JSON with 200", reply: Reply{Raw: []byte("not json {")}, wantStatus: 200, wantType: "application/json"},
		{name: "HTML 502 from a gateway", reply: Reply{Raw: []byte("<html>bad gateway</html>"), Status: 502, Header: http.Header{"Content-Type": {"text/html"}}}, wantStatus: 502, wantType: "text/html"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(t)
			s.Enqueue(tt.reply)
			// Raw is never compressed, even when asked.
			res := post(t, testCtx(t), rawClient(t), s.URL+"/chat/completions", `{"model":"m","messages":[{"role":"user","content":"x"}]}`, http.Header{"Accept-Encoding": {"gzip"}})
			raw, err := io.ReadAll(res.Body)
			require.NoError(t, err)
			if res.StatusCode != tt.wantStatus || res.Header.Get("Content-Type") != tt.wantType {
				t.Errorf("got %d %q, want %d %q", res.StatusCode, res.Header.Get("Content-Type"), tt.wantStatus, tt.wantType)
			}
			if !bytes.Equal(raw, tt.reply.Raw) {
				t.Errorf("got body %q, want %q", raw, tt.reply.Raw)
			}
		})
	}
	t.Run("SDK fails to parse", func(t *testing.T) {
		s := New(t)
		s.Enqueue(Reply{Raw: []byte("not json {")})
		if _, err := sdk(s).Chat.Completions.New(testCtx(t), openai.ChatCompletionNewParams{Model: "m", Messages: twoMessages}); err == nil {
			t.Error("got no error for a non-JSON body")
		}
	})
}

func TestOtherEndpoints(t *testing.T) {
	s := New(t)
	client := sdk(s)
	ctx := testCtx(t)

	t.Run("models", func(t *testing.T) {
		page, err := client.Models.List(ctx)
		require.NoError(t, err)
		var ids []string
		for _, m := range page.Data {
			ids = append(ids, m.ID)
		}
		require.Equal(t, models, ids)
	})

	t.Run("embeddings are deterministic unit vectors", func(t *testing.T) {
		embed := func(input string) []float64 {
			res, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{
				Model: "text-embedding-3-small",
				Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String(input)},
			})
			require.NoError(t, err)
			require.Len(t, res.Data, 1)
			return res.Data[0].Embedding
		}
		a, b, c := embed("hello"), embed("hello"), embed("other")
		require.Equal(t, a, b)
		require.NotEqual(t, a, c)
		var norm float64
		for _, v := range a {
			norm += v * v
		}
		if len(a) != embeddingDims || math.Abs(norm-1) > 1e-5 {
			t.Errorf("got %d dims with norm² %v, want %d and 1", len(a), norm, embeddingDims)
		}
	})

	t.Run("embeddings in base64", func(t *testing.T) {
		res := post(t, ctx, rawClient(t), s.URL+"/embeddings", `{"model":"e","input":["hello","x"],"encoding_format":"base64"}`, nil)
		var out struct {
			Data []struct {
				Index     int
				Embedding string
			}
		}
		require.NoError(t, json.NewDecoder(res.Body).Decode(&out))
		require.Len(t, out.Data, 2)
		buf, err := base64.StdEncoding.DecodeString(out.Data[0].Embedding)
		require.NoError(t, err)
		got := make([]float32, len(buf)/4)
		require.NoError(t, binary.Read(bytes.NewReader(buf), binary.LittleEndian, got))
		require.Equal(t, embed("hello", embeddingDims), got)
	})

	for _, tt := range []struct{ method, path string }{
		{http.MethodGet, "/v1/nope"},
		{http.MethodGet, "/v1/chat/completions"},
		{http.MethodPost, "/v2/chat/completions"},
	} {
		t.Run("404 for "+tt.method+" "+tt.path, func(t *testing.T) {
			req, err := http.NewRequestWithContext(ctx, tt.method, strings.TrimSuffix(s.URL, "/v1")+tt.path, nil)
			require.NoError(t, err)
			res, err := rawClient(t).Do(req)
			require.NoError(t, err)
			defer res.Body.Close()
			raw, err := io.ReadAll(res.Body)
			require.NoError(t, err)
			want := `{"error":{"message":"Invalid URL (` + tt.method + " " + tt.path + `)","type":"invalid_request_error","param":null,"code":null}}` + "\n"
			if res.StatusCode != http.StatusNotFound || string(raw) != want {
				t.Errorf("got %d %s, want 404 %s", res.StatusCode, raw, want)
			}
		})
	}
}

// fatalRecorder stands in for a test so that LastChat's failure can be
// observed instead of ending this test.
type fatalRecorder struct {
	testing.TB
	failed bool
}

func (f *fatalRecorder) Fatalf(string, ...any) { f.failed = true }

func TestLastChatFailsWithoutChat(t *testing.T) {
	rec := &fatalRecorder{TB: t}
	s := New(rec)
	_, err := sdk(s).Models.List(testCtx(t))
	require.NoError(t, err)
	s.LastChat()
	if !rec.failed {
		t.Error("LastChat with only a models request did not fail the test")
	}
}

func TestSplitWords(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"one", []string{"one"}},
		{"echo: hi [messages=2]", []string{"echo:", " hi", " [messages=2]"}},
		{" lead  double ", []string{" lead", "  double", " "}},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got := splitWords(tt.in)
			require.Equal(t, tt.want, got)
			if strings.Join(got, "") != tt.in {
				t.Errorf("got pieces %q that do not join to %q", got, tt.in)
			}
		})
	}
}

func TestSplitRunesKeepsUTF8(t *testing.T) {
	in := `{"city":"Zürich","emoji":"🙂"}`
	pieces := splitRunes(in, 5)
	if len(pieces) < 3 {
		t.Errorf("got %d pieces, want several", len(pieces))
	}
	for _, p := range pieces {
		if !utf8.ValidString(p) {
			t.Errorf("piece %q is not valid UTF-8", p)
		}
	}
	if got := strings.Join(pieces, ""); got != in {
		t.Errorf("got %q, want %q", got, in)
	}
}

func TestEchoReply(t *testing.T) {
	tests := []struct {
		name     string
		messages []map[string]any
		want     string
	}{
		{
			name:     "last user message among others",
			messages: []map[string]any{{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}, {"role": "tool", "content": "42"}},
			want:     "echo: second [messages=4]",
		},
		{
			name:     "content parts",
			messages: []map[string]any{{"role": "user", "content": []any{map[string]any{"type": "text", "text": "a"}, map[string]any{"type": "image_url"}, map[string]any{"type": "text", "text": "b"}}}},
			want:     "echo: a\nb [messages=1]",
		},
		{
			name:     "no user message",
			messages: []map[string]any{{"role": "system", "content": "s"}},
			want:     "echo:  [messages=1]",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := EchoReply(ChatRequest{Messages: tt.messages}).Content; got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestValidateToolOrder(t *testing.T) {
	call := func(ids ...string) map[string]any {
		var calls []any
		for _, id := range ids {
			calls = append(calls, map[string]any{"id": id, "type": "function", "function": map[string]any{"name": "f", "arguments": "{}"}})
		}
		return map[string]any{"role": "assistant", "content": nil, "tool_calls": calls}
	}
	tool := func(id string) map[string]any {
		return map[string]any{"role": "tool", "tool_call_id": id, "content": "r"}
	}
	u := map[string]any{"role": "user", "content": "q"}
	a := map[string]any{"role": "assistant", "content": "a"}
	cases := []struct {
		name string
		msgs []map[string]any
		ok   bool
	}{
		{name: "plain turns", msgs: []map[string]any{u, a, u}, ok: true},
		{name: "call answered", msgs: []map[string]any{u, call("c1", "c2"), tool("c2"), tool("c1"), a, u}, ok: true},
		{name: "tool result first", msgs: []map[string]any{tool("c1"), u}},
		{name: "result of another call", msgs: []map[string]any{u, call("c1"), tool("c9")}},
		{name: "call left unanswered", msgs: []map[string]any{u, call("c1"), u}},
		{name: "one of two answered at the end", msgs: []map[string]any{u, call("c1", "c2"), tool("c1")}},
		{name: "result after a plain assistant", msgs: []map[string]any{u, call("c1"), tool("c1"), a, tool("c1")}},
		{name: "history may start at a tool step", msgs: []map[string]any{call("c1"), tool("c1"), u}, ok: true},
		{name: "a reused id answers only the call just before", msgs: []map[string]any{u, call("c1"), tool("c1"), a, u, call("c1"), u}},
		{name: "a result given twice", msgs: []map[string]any{u, call("c1"), tool("c1"), tool("c1")}},
		{name: "a reused id answered in each step", msgs: []map[string]any{u, call("c1"), tool("c1"), call("c1"), tool("c1"), a}, ok: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			msg, _, _ := validateToolOrder(tc.msgs)
			if got := msg == ""; got != tc.ok {
				t.Fatalf("got ok=%v (%q), want ok=%v", got, msg, tc.ok)
			}
		})
	}
}

// TestIntercept: an interceptor answers the requests it claims, before the
// queue, and leaves the others to the queue; max_completion_tokens and the
// system prompt are seen.
func TestIntercept(t *testing.T) {
	s := New(t)
	s.Enqueue(Reply{Content: "queued"})
	s.Intercept(func(r ChatRequest) (Reply, bool) {
		if r.System() != "summarize" {
			return Reply{}, false
		}
		return Reply{Content: fmt.Sprintf("summary (max %d)", r.MaxCompletionTokens)}, true
	})
	post := func(body string) string {
		t.Helper()
		resp, err := http.Post(s.URL+"/chat/completions", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out struct {
			Choices []struct {
				Message struct{ Content string } `json:"message"`
			} `json:"choices"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || len(out.Choices) == 0 {
			t.Fatalf("decode: %v", err)
		}
		return out.Choices[0].Message.Content
	}
	if got := post(`{"model":"m","max_completion_tokens":9,"messages":[{"role":"system","content":"summarize"},{"role":"user","content":"x"}]}`); got != "summary (max 9)" {
		t.Errorf("intercepted: got %q", got)
	}
	if got := post(`{"model":"m","messages":[{"role":"user","content":"hi"}]}`); got != "queued" {
		t.Errorf("other request: got %q, want the queued reply", got)
	}
	if got := s.LastChat().Chat.MaxCompletionTokens; got != 0 {
		t.Errorf("last request's max_completion_tokens: got %d, want 0", got)
	}
}

package fakeai

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// The values below stand in for what the real API reports about itself.
const (
	systemFingerprint = "fp_fakeai"
	serviceTier       = "default"
	// argumentPiece is how many runes of a tool call's arguments go into one
	// streamed fragment; the API sends token-sized fragments of a few
	// characters, so a call's arguments always arrive in several pieces.
	argumentPiece = 5
)

// EchoReply is the default reply: "echo: <text of the last user message>
// [messages=<number of messages>]", so a test can see what the proxy sent
// upstream (for example that history was prepended) from the answer alone.
func EchoReply(req ChatRequest) Reply {
	last := ""
	for i := len(req.Messages) - 1; i >= 0; i-- {
		if req.Messages[i]["role"] == "user" {
			last = messageText(req.Messages[i])
			break
		}
	}
	return Reply{Content: fmt.Sprintf("echo: %s [messages=%d]", last, len(req.Messages))}
}

// messageText returns the text of a message's content, which the API accepts
// either as a string or as an array of parts of which only "text" parts
// carry text.
func messageText(m map[string]any) string {
	switch c := m["content"].(type) {
	case string:
		return c
	case []any:
		var texts []string
		for _, p := range c {
			if part, ok := p.(map[string]any); ok && part["type"] == "text" {
				if t, ok := part["text"].(string); ok {
					texts = append(texts, t)
				}
			}
		}
		return strings.Join(texts, "\n")
	}
	return ""
}

// chatBody is the part of the request body the fake reads.
type chatBody struct {
	Model         string           `json:"model"`
	Stream        bool             `json:"stream"`
	StreamOptions *streamOptions   `json:"stream_options"`
	N             int              `json:"n"`
	User          string           `json:"user"`
	Messages      []map[string]any `json:"messages"`
	MaxTokens     int              `json:"max_tokens"`
	MaxCompletion int              `json:"max_completion_tokens"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

func decodeChat(data []byte) (chatBody, error) {
	var b chatBody
	if err := json.Unmarshal(data, &b); err != nil {
		return chatBody{}, fmt.Errorf("decode chat request: %w", err)
	}
	return b, nil
}

// parseChat decodes a chat completion request body.
func parseChat(data []byte) (*ChatRequest, error) {
	b, err := decodeChat(data)
	if err != nil {
		return nil, err
	}
	return b.request(), nil
}

func (b chatBody) request() *ChatRequest {
	cr := &ChatRequest{Model: b.Model, Stream: b.Stream, N: b.N, User: b.User, Messages: b.Messages,
		MaxTokens: b.MaxTokens, MaxCompletionTokens: b.MaxCompletion}
	if b.StreamOptions != nil {
		cr.IncludeUsage = b.StreamOptions.IncludeUsage
	}
	return cr
}

// validate returns the API's complaint about b, or an empty message. Only
// the mistakes a proxy can plausibly make are checked; the fake does not
// replay the API's whole schema.
func validate(b chatBody) (message, param, code string) {
	switch {
	case b.Model == "":
		return "you must provide a model parameter", "", ""
	case b.Messages == nil:
		return "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
	case len(b.Messages) == 0:
		return "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.", "messages", "empty_array"
	case b.StreamOptions != nil && !b.Stream:
		// The API rejects this, so a proxy that adds include_usage must do
		// it only to streaming requests.
		return "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options", ""
	}
	return validateToolOrder(b.Messages)
}

// validateToolOrder rejects what the API rejects about tool messages, with
// the API's messages: a tool message that answers no call of the assistant
// message just before its block of tool messages, an assistant message
// whose calls are not all answered by the tool messages right after it,
// and an empty tool_calls array.
// Matching is by position, as the API does: an older call with the same id
// does not count. A proxy that injects history can get both wrong.
func validateToolOrder(msgs []map[string]any) (message, param, code string) {
	var open []string // calls of the last assistant message not yet answered, in order
	unanswered := func(i int) (string, string, string) {
		return "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. " +
				"The following tool_call_ids did not have response messages: " + strings.Join(open, ", "),
			fmt.Sprintf("messages.[%d].role", i), ""
	}
	for i, m := range msgs {
		role, _ := m["role"].(string)
		if role == "tool" {
			id, _ := m["tool_call_id"].(string)
			k := slices.Index(open, id)
			if k < 0 {
				return "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
					fmt.Sprintf("messages.[%d].role", i), ""
			}
			open = slices.Delete(open, k, k+1)
			continue
		}
		if len(open) > 0 {
			return unanswered(i)
		}
		open = nil
		if calls, ok := m["tool_calls"].([]any); ok && role == "assistant" {
			if len(calls) == 0 {
				// What a proxy that injects a stored "tool_calls": [] back
				// (vLLM's answer on every reply) gets from OpenAI.
				return fmt.Sprintf("Invalid 'messages[%d].tool_calls': empty array. Expected an array with minimum length 1, but got an empty array instead.", i),
					fmt.Sprintf("messages[%d].tool_calls", i), "empty_array"
			}
			open = []string{}
			for _, c := range calls {
				if call, ok := c.(map[string]any); ok {
					id, _ := call["id"].(string)
					open = append(open, id)
				}
			}
		}
	}
	if len(open) > 0 {
		return unanswered(len(msgs) - 1)
	}
	return "", "", ""
}

func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	data, err := io.ReadAll(r.Body) // already buffered by routes
	if err != nil {
		return
	}
	b, err := decodeChat(data)
	if err != nil {
		s.writeError(w, r, http.StatusBadRequest, "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.", "invalid_request_error", "", "", nil)
		return
	}
	if msg, param, code := validate(b); msg != "" {
		s.writeError(w, r, http.StatusBadRequest, msg, "invalid_request_error", param, code, nil)
		return
	}
	req := b.request()
	s.reply(w, r, *req, s.next(*req))
}

// abort ends the response by dropping the connection: net/http recovers
// this panic silently and closes the connection without finishing the
// chunked body, so the client sees an unexpected EOF as from a crashed
// upstream.
func abort() { panic(http.ErrAbortHandler) }

func (s *Server) reply(w http.ResponseWriter, r *http.Request, req ChatRequest, rep Reply) {
	if !s.sleep(r.Context(), rep.HeaderDelay) {
		abort()
	}
	status := rep.Status
	if status == 0 {
		status = http.StatusOK
	}
	switch {
	case rep.Raw != nil:
		w.Header().Set("Content-Type", "application/json")
		copyHeader(w.Header(), rep.Header)
		w.WriteHeader(status)
		_, _ = w.Write(rep.Raw)
	case status < 200 || status > 299:
		s.writeError(w, r, status, rep.ErrorMessage, rep.ErrorType, "", rep.ErrorCode, rep.Header)
	case req.Stream:
		s.stream(w, r, req, rep, status)
	default:
		s.writeJSON(w, r, status, s.completion(req, rep), rep.Header)
	}
}

// answer is one choice's resolved answer.
type answer struct {
	content   string
	deltas    []string
	refusal   string
	toolCalls []ToolCall
	finish    string
}

// answers resolves rep into n choices. Choice 0 is rep itself; later choices
// get their content prefixed with "[choice i] " so a test can tell which
// choice the proxy kept. Tool call ids are filled in.
func (s *Server) answers(req ChatRequest, rep Reply) []answer {
	n := max(req.N, 1)
	content, deltas := rep.Content, rep.Deltas
	if content == "" && deltas != nil {
		content = strings.Join(deltas, "")
	}
	if deltas == nil {
		deltas = splitWords(content)
	}
	finish := rep.FinishReason
	if finish == "" {
		finish = "stop"
		if len(rep.ToolCalls) > 0 {
			finish = "tool_calls"
		}
	}
	calls := make([]ToolCall, len(rep.ToolCalls))
	seq := s.seq.Add(1)
	for i, c := range rep.ToolCalls {
		if c.ID == "" {
			c.ID = fmt.Sprintf("call_fake%d_%d", seq, i)
		}
		calls[i] = c
	}
	out := make([]answer, n)
	for i := range out {
		a := answer{content: content, deltas: deltas, refusal: rep.Refusal, toolCalls: calls, finish: finish}
		if i > 0 && content != "" {
			prefix := fmt.Sprintf("[choice %d] ", i)
			a.content = prefix + content
			a.deltas = append([]string{prefix}, deltas...)
		}
		out[i] = a
	}
	return out
}

// splitWords splits s into words that keep their leading spaces, the way
// the API's token deltas look ("Hello", " world", "!"-style pieces).
func splitWords(s string) []string {
	var out []string
	start := 0
	for i := 1; i < len(s); i++ {
		if s[i] == ' ' && s[i-1] != ' ' {
			out = append(out, s[start:i])
			start = i
		}
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}

// splitRunes splits s into pieces of at most size runes, never splitting a
// UTF-8 sequence (which JSON encoding would turn into U+FFFD).
func splitRunes(s string, size int) []string {
	var out []string
	for len(s) > 0 {
		i, n := 0, 0
		for i < len(s) && n < size {
			_, w := utf8.DecodeRuneInString(s[i:])
			i += w
			n++
		}
		out = append(out, s[:i])
		s = s[i:]
	}
	return out
}

// usageJSON is the API's usage object, details included, in the API's order.
type usageJSON struct {
	PromptTokens            int               `json:"prompt_tokens"`
	CompletionTokens        int               `json:"completion_tokens"`
	TotalTokens             int               `json:"total_tokens"`
	PromptTokensDetails     promptDetails     `json:"prompt_tokens_details"`
	CompletionTokensDetails completionDetails `json:"completion_tokens_details"`
}

type promptDetails struct {
	CachedTokens int `json:"cached_tokens"`
	AudioTokens  int `json:"audio_tokens"`
}

type completionDetails struct {
	ReasoningTokens          int `json:"reasoning_tokens"`
	AudioTokens              int `json:"audio_tokens"`
	AcceptedPredictionTokens int `json:"accepted_prediction_tokens"`
	RejectedPredictionTokens int `json:"rejected_prediction_tokens"`
}

// usage returns rep.Usage, or the estimate documented on Reply.Usage.
func usage(req ChatRequest, rep Reply, answers []answer) usageJSON {
	u := rep.Usage
	if u == nil {
		prompt := 0
		for _, m := range req.Messages {
			prompt += utf8.RuneCountInString(messageText(m))
		}
		completion := 0
		for _, a := range answers {
			completion += utf8.RuneCountInString(a.content) + utf8.RuneCountInString(a.refusal)
			for _, c := range a.toolCalls {
				completion += utf8.RuneCountInString(c.Name) + utf8.RuneCountInString(c.Arguments)
			}
		}
		u = &Usage{PromptTokens: max(prompt/4, 1), CompletionTokens: max(completion/4, 1)}
	}
	return usageJSON{
		PromptTokens:            u.PromptTokens,
		CompletionTokens:        u.CompletionTokens,
		TotalTokens:             u.PromptTokens + u.CompletionTokens,
		PromptTokensDetails:     promptDetails{CachedTokens: u.CachedTokens},
		CompletionTokensDetails: completionDetails{ReasoningTokens: u.ReasoningTokens},
	}
}

// completionJSON is the non-streaming answer, fields in the API's order.
type completionJSON struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	Choices           []choiceJSON `json:"choices"`
	Usage             usageJSON    `json:"usage"`
	ServiceTier       string       `json:"service_tier"`
	SystemFingerprint string       `json:"system_fingerprint"`
}

type choiceJSON struct {
	Index        int         `json:"index"`
	Message      messageJSON `json:"message"`
	Logprobs     any         `json:"logprobs"` // always null
	FinishReason string      `json:"finish_reason"`
}

// messageJSON is the assistant message. Content is null when the answer is
// only tool calls or a refusal; tool_calls is absent when there are none.
type messageJSON struct {
	Role        string         `json:"role"`
	Content     *string        `json:"content"`
	ToolCalls   []toolCallJSON `json:"tool_calls,omitempty"`
	Refusal     *string        `json:"refusal"`
	Annotations []any          `json:"annotations"`
}

type toolCallJSON struct {
	ID       string       `json:"id"`
	Type     string       `json:"type"`
	Function functionJSON `json:"function"`
}

type functionJSON struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

func (s *Server) completion(req ChatRequest, rep Reply) completionJSON {
	answers := s.answers(req, rep)
	c := completionJSON{
		ID:                fmt.Sprintf("chatcmpl-fake%d", s.seq.Add(1)),
		Object:            "chat.completion",
		Created:           time.Now().Unix(),
		Model:             req.Model,
		Usage:             usage(req, rep, answers),
		ServiceTier:       serviceTier,
		SystemFingerprint: systemFingerprint,
	}
	for i, a := range answers {
		m := messageJSON{Role: "assistant", Refusal: nullable(a.refusal), Annotations: []any{}}
		if a.content != "" || (a.refusal == "" && len(a.toolCalls) == 0) {
			m.Content = &a.content
		}
		for _, tc := range a.toolCalls {
			m.ToolCalls = append(m.ToolCalls, toolCallJSON{ID: tc.ID, Type: "function", Function: functionJSON{Name: tc.Name, Arguments: tc.Arguments}})
		}
		c.Choices = append(c.Choices, choiceJSON{Index: i, Message: m, FinishReason: a.finish})
	}
	return c
}

// chunkJSON is one streamed chunk, fields in the API's order. Usage is
// absent unless the request asked for stream_options.include_usage; then it
// is null on every chunk but the last, which has no choices.
type chunkJSON struct {
	ID                string          `json:"id"`
	Object            string          `json:"object"`
	Created           int64           `json:"created"`
	Model             string          `json:"model"`
	ServiceTier       string          `json:"service_tier"`
	SystemFingerprint string          `json:"system_fingerprint"`
	Choices           []chunkChoice   `json:"choices"`
	Usage             json.RawMessage `json:"usage,omitempty"`
}

type chunkChoice struct {
	Index        int     `json:"index"`
	Delta        delta   `json:"delta"`
	Logprobs     any     `json:"logprobs"` // always null
	FinishReason *string `json:"finish_reason"`
}

// delta holds raw JSON for content and refusal because the API sends each
// of them as a string, as null or not at all depending on the chunk.
type delta struct {
	Role      string          `json:"role,omitempty"`
	Content   json.RawMessage `json:"content,omitempty"`
	ToolCalls []toolCallDelta `json:"tool_calls,omitempty"`
	Refusal   json.RawMessage `json:"refusal,omitempty"`
}

// toolCallDelta announces a call (index, id, type, name, empty arguments)
// or carries a fragment of its arguments (index and arguments only).
type toolCallDelta struct {
	Index    int           `json:"index"`
	ID       string        `json:"id,omitempty"`
	Type     string        `json:"type,omitempty"`
	Function functionDelta `json:"function"`
}

type functionDelta struct {
	Name      string `json:"name,omitempty"`
	Arguments string `json:"arguments"`
}

var jsonNull = json.RawMessage("null")

func jsonString(s string) json.RawMessage {
	b, _ := marshal(s) // a string always encodes
	return b
}

// choiceDeltas returns one choice's deltas in the order the API sends them: the
// role (with the first tool call when there is no text), the content or
// refusal pieces, each tool call's announcement and argument fragments, and
// the empty delta that carries the finish reason.
func (a answer) choiceDeltas(index int) []chunkChoice {
	var out []chunkChoice
	add := func(d delta) { out = append(out, chunkChoice{Index: index, Delta: d}) }
	calls := a.toolCalls
	next := 0 // the first tool call not yet streamed
	switch {
	case a.content != "" || (a.refusal == "" && len(calls) == 0):
		add(delta{Role: "assistant", Content: jsonString(""), Refusal: jsonNull})
		for _, d := range a.deltas {
			if d != "" {
				add(delta{Content: jsonString(d)})
			}
		}
	case a.refusal != "":
		add(delta{Role: "assistant", Content: jsonNull, Refusal: jsonString("")})
		for _, d := range splitWords(a.refusal) {
			add(delta{Refusal: jsonString(d)})
		}
	default:
		// Only tool calls: the first announcement rides on the role delta.
		add(delta{Role: "assistant", Content: jsonNull, ToolCalls: []toolCallDelta{announce(0, calls[0])}, Refusal: jsonNull})
		for _, p := range splitRunes(calls[0].Arguments, argumentPiece) {
			add(delta{ToolCalls: []toolCallDelta{{Index: 0, Function: functionDelta{Arguments: p}}}})
		}
		next = 1
	}
	for i := next; i < len(calls); i++ {
		out = append(out, callDeltas(index, i, calls[i])...)
	}
	finish := a.finish
	out = append(out, chunkChoice{Index: index, Delta: delta{}, FinishReason: &finish})
	return out
}

func announce(i int, c ToolCall) toolCallDelta {
	return toolCallDelta{Index: i, ID: c.ID, Type: "function", Function: functionDelta{Name: c.Name}}
}

// callDeltas announces tool call i of a choice and streams its arguments.
func callDeltas(choice, i int, c ToolCall) []chunkChoice {
	out := []chunkChoice{{Index: choice, Delta: delta{ToolCalls: []toolCallDelta{announce(i, c)}}}}
	for _, p := range splitRunes(c.Arguments, argumentPiece) {
		out = append(out, chunkChoice{Index: choice, Delta: delta{ToolCalls: []toolCallDelta{{Index: i, Function: functionDelta{Arguments: p}}}}})
	}
	return out
}

// chunks returns the whole stream for one request, without data: [DONE].
// With n > 1 the choices' chunks are interleaved, one choice per chunk, as
// the API interleaves them.
func (s *Server) chunks(req ChatRequest, rep Reply) []chunkJSON {
	answers := s.answers(req, rep)
	base := chunkJSON{
		ID:                fmt.Sprintf("chatcmpl-fake%d", s.seq.Add(1)),
		Object:            "chat.completion.chunk",
		Created:           time.Now().Unix(),
		Model:             req.Model,
		ServiceTier:       serviceTier,
		SystemFingerprint: systemFingerprint,
	}
	if req.IncludeUsage {
		base.Usage = jsonNull
	}
	perChoice := make([][]chunkChoice, len(answers))
	longest := 0
	for i, a := range answers {
		perChoice[i] = a.choiceDeltas(i)
		longest = max(longest, len(perChoice[i]))
	}
	var out []chunkJSON
	for step := range longest {
		for _, cs := range perChoice {
			if step < len(cs) {
				c := base
				c.Choices = []chunkChoice{cs[step]}
				out = append(out, c)
			}
		}
	}
	if req.IncludeUsage {
		u, _ := marshal(usage(req, rep, answers)) // plain ints always encode
		c := base
		c.Choices = []chunkChoice{}
		c.Usage = u
		out = append(out, c)
	}
	return out
}

// stream writes the chunks as server-sent events, flushing after each so
// the client (and any proxy in between) sees them as they are produced.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, req ChatRequest, rep Reply, status int) {
	ctx := r.Context()
	chunks := s.chunks(req, rep)
	b := startBody(w, r, status, "text/event-stream", rep.Header, rep.Gzip)
	le := rep.LineEnd
	if le == "" {
		le = "\n"
	}
	flush := func() {
		if err := b.Flush(); err != nil {
			abort() // the client is gone
		}
	}
	gateAfter := min(max(rep.GateAfter, 0), len(chunks))
	cutAfter := min(rep.CutAfter, len(chunks))
	checkpoint := func(sent int) {
		if rep.Gate != nil && sent == gateAfter && !s.wait(ctx, rep.Gate) {
			abort()
		}
		if rep.CutAfter > 0 && sent == cutAfter {
			abort()
		}
	}
	flush() // the headers, so a gated client is not left waiting for them
	checkpoint(0)
	for i, c := range chunks {
		if i > 0 && !s.sleep(ctx, rep.ChunkDelay) {
			abort()
		}
		data, err := marshal(c)
		if err != nil {
			s.t.Errorf("fakeai: encode chunk: %v", err)
			abort()
		}
		if _, err := fmt.Fprintf(b, "data: %s%s%s", data, le, le); err != nil {
			abort()
		}
		flush()
		checkpoint(i + 1)
	}
	if _, err := io.WriteString(b, "data: [DONE]"+le+le); err != nil {
		abort()
	}
	flush()
	_ = b.Close()
}

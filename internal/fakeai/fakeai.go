// Package fakeai is an OpenAI-compatible fake upstream for tests.
//
// It serves /v1/chat/completions (plain and streaming), /v1/models and
// /v1/embeddings on a loopback httptest server, records every request it
// receives, and answers with replies a test queues or with a default that
// echoes what it was sent. The bytes it writes follow the real API's wire
// format (field order, nulls, the usage-only chunk, tool-call deltas, error
// bodies) because the proxy under test parses and relays exactly those
// bytes; a fake that were merely "JSON-ish" would hide the proxy's bugs.
//
// The fake never calls out.
package fakeai

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// chatPath is the path of the chat completions endpoint, which is the only
// one whose requests are parsed into [ChatRequest].
const chatPath = "/v1/chat/completions"

// Server is a running fake. Its methods are safe for concurrent use.
type Server struct {
	// URL is the base URL including the /v1 prefix, as an SDK expects it
	// (for example http://127.0.0.1:4242/v1).
	URL string

	t  testing.TB
	ts *httptest.Server

	// closing is closed when the test ends, before the httptest server is
	// closed, so that handlers blocked on a Gate or a delay give up instead
	// of making httptest.Server.Close wait for them forever.
	closing chan struct{}

	seq atomic.Int64 // numbers completions, tool calls and request ids

	mu        sync.Mutex
	reqs      []Request
	queue     []Reply
	def       func(ChatRequest) Reply
	intercept func(ChatRequest) (Reply, bool)
}

// Request is one request as the fake received it.
type Request struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
	// Chat is the parsed body when Path is /v1/chat/completions and the body
	// is a JSON object; nil otherwise.
	Chat *ChatRequest
}

// ChatRequest is the part of a chat completion request that tests inspect.
type ChatRequest struct {
	Model  string
	Stream bool
	// IncludeUsage is stream_options.include_usage.
	IncludeUsage bool
	// N is the n parameter; 0 when the request did not send one (the fake
	// then answers with one choice, as the API does).
	N    int
	User string
	// Messages are the messages as received, decoded into generic maps so a
	// test sees exactly what the proxy sent (roles, content parts, tool calls).
	Messages []map[string]any
	// MaxTokens and MaxCompletionTokens are max_tokens and
	// max_completion_tokens; 0 when not sent.
	MaxTokens, MaxCompletionTokens int
}

// System is the content of the request's first message when it is a
// system message with text content; "" otherwise. Tests tell the proxy's
// own calls (a summary, a title) by it.
func (c ChatRequest) System() string {
	if len(c.Messages) == 0 || c.Messages[0]["role"] != "system" {
		return ""
	}
	s, _ := c.Messages[0]["content"].(string)
	return s
}

// ToolCall is a function call the fake answers with.
type ToolCall struct {
	// ID is the call id; empty means a generated "call_fake..." id.
	ID        string
	Name      string
	Arguments string
}

// Usage is the token usage the fake reports.
type Usage struct {
	PromptTokens     int
	CompletionTokens int
	CachedTokens     int
	ReasoningTokens  int
}

// Reply describes how the fake answers one chat completion request. The zero
// Reply answers 200 with empty content.
type Reply struct {
	Content string
	Refusal string
	// ToolCalls are returned in order; in a stream each call is announced by
	// its own delta (index, id, type, name, empty arguments) and its
	// arguments follow in several fragments.
	ToolCalls []ToolCall
	// FinishReason defaults to "tool_calls" when ToolCalls is set and to
	// "stop" otherwise.
	FinishReason string
	// Usage nil means an estimate: prompt tokens are the characters of the
	// messages' text over 4, completion tokens the characters of the answer
	// over 4, each at least 1.
	Usage *Usage

	// Status, when not 2xx, makes the fake answer with an OpenAI-shaped error
	// body {"error":{"message","type","param","code"}} instead of a
	// completion. Zero means 200.
	Status int
	// ErrorMessage defaults to the status text; ErrorType to
	// "invalid_request_error" below 500 and "server_error" from 500; an empty
	// ErrorCode is sent as null, as the API does for many errors.
	ErrorMessage, ErrorType, ErrorCode string
	// Header holds extra response headers (Retry-After, a Content-Type for
	// Raw). They replace the fake's own values for the same keys.
	Header http.Header
	// Raw, when non-nil, is written verbatim as the body with Status
	// (default 200) and Content-Type application/json unless Header sets
	// one. It is never compressed, so the bytes on the wire are exactly Raw.
	Raw []byte
	// HeaderDelay is waited before anything is written, for timeout tests.
	// The wait ends early when the client goes away.
	HeaderDelay time.Duration

	// The fields below apply only to streamed answers (stream:true).

	// Deltas are the content deltas in order; nil means Content split into
	// words, each word keeping its leading space (" world"). When Content is
	// empty, the joined Deltas are the content.
	Deltas []string
	// ChunkDelay is slept between chunks.
	ChunkDelay time.Duration
	// Gate, when non-nil, is waited for after GateAfter chunks have been
	// written and flushed (0: right after the headers), so a test can prove
	// that bytes reached it before the stream ended without sleeping.
	// GateAfter past the last chunk waits just before data: [DONE].
	Gate      <-chan struct{}
	GateAfter int
	// CutAfter > 0 aborts the connection after that many chunks without
	// data: [DONE] or the chunked terminator, as a crashed upstream does.
	// CutAfter past the last chunk cuts just before data: [DONE].
	CutAfter int
	// LineEnd ends each line of the stream: "\n" when empty, or "\r\n"
	// or a lone "\r", which the SSE specification allows too.
	LineEnd string
	// Gzip compresses the stream even when the request did not ask for
	// it, as some gateways do; each event is flushed through the
	// compressor as it is written.
	Gzip bool
}

// New starts a fake on 127.0.0.1 that is closed when the test ends.
func New(t testing.TB) *Server {
	t.Helper()
	s := &Server{t: t, closing: make(chan struct{}), def: EchoReply}
	s.ts = httptest.NewServer(s.routes())
	s.URL = s.ts.URL + "/v1"
	t.Cleanup(func() {
		close(s.closing)
		s.ts.Close()
	})
	return s
}

// routes builds the fake's mux. Every request is recorded first, whatever
// its route, so a test can see requests the proxy should not have sent.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+chatPath, s.handleChat)
	mux.HandleFunc("GET /v1/models", s.handleModels)
	mux.HandleFunc("POST /v1/embeddings", s.handleEmbeddings)
	// "/" matches every method, so a wrong method on a known path gets the
	// API's 404 body rather than the mux's plain-text 405.
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, r, http.StatusNotFound, fmt.Sprintf("Invalid URL (%s %s)", r.Method, r.URL.Path), "invalid_request_error", "", "", nil)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			// The client went away mid-body; nothing to answer.
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		s.record(r, body)
		w.Header().Set("X-Request-Id", fmt.Sprintf("req_fake%d", s.seq.Add(1)))
		mux.ServeHTTP(w, r)
	})
}

func (s *Server) record(r *http.Request, body []byte) {
	req := Request{
		Method: r.Method,
		Path:   r.URL.Path,
		Header: r.Header.Clone(),
		Body:   body,
	}
	s.mu.Lock()
	s.reqs = append(s.reqs, req)
	s.mu.Unlock()
}

// Requests returns every request received so far, in order. The result is a
// deep copy: a test may modify it freely.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Request, len(s.reqs))
	for i, r := range s.reqs {
		out[i] = r.clone()
	}
	return out
}

// clone copies r; Chat is decoded again from the body so that no map is
// shared with the fake's record.
func (r Request) clone() Request {
	c := Request{
		Method: r.Method,
		Path:   r.Path,
		Header: r.Header.Clone(),
		Body:   bytes.Clone(r.Body),
	}
	if r.Path == chatPath {
		if cr, err := parseChat(r.Body); err == nil {
			c.Chat = cr
		}
	}
	return c
}

// LastChat returns the last POST /v1/chat/completions received. It fails the
// test (and returns the zero Request) when there was none.
func (s *Server) LastChat() Request {
	s.t.Helper()
	reqs := s.Requests()
	for i := len(reqs) - 1; i >= 0; i-- {
		if reqs[i].Method == http.MethodPost && reqs[i].Path == chatPath {
			return reqs[i]
		}
	}
	s.t.Fatalf("fakeai: no POST %s received (got %d other requests)", chatPath, len(reqs))
	return Request{}
}

// Enqueue makes the next chat completion that passes validation answer with
// r. Replies are used first in, first out; when none is queued the default
// reply function answers.
func (s *Server) Enqueue(r Reply) {
	s.mu.Lock()
	s.queue = append(s.queue, r)
	s.mu.Unlock()
}

// SetDefault replaces the function that answers when no reply is queued.
// The initial default is [EchoReply].
func (s *Server) SetDefault(f func(ChatRequest) Reply) {
	s.mu.Lock()
	s.def = f
	s.mu.Unlock()
}

// Intercept sets a function that sees every valid chat completion before
// the queue: when it answers true, its reply is used and the queue is left
// alone. A test scripts the answers to one kind of request (the proxy's own
// summarization calls, say) this way, whatever order they come in among
// the others. It is called without the fake's lock.
func (s *Server) Intercept(f func(ChatRequest) (Reply, bool)) {
	s.mu.Lock()
	s.intercept = f
	s.mu.Unlock()
}

// next returns the reply for req: the interceptor's, else the oldest
// queued one, else the default. The interceptor and the default are called
// without the lock so that they may use the Server.
func (s *Server) next(req ChatRequest) Reply {
	s.mu.Lock()
	f := s.intercept
	s.mu.Unlock()
	if f != nil {
		if r, ok := f(req); ok {
			return r
		}
	}
	s.mu.Lock()
	if len(s.queue) > 0 {
		r := s.queue[0]
		s.queue = s.queue[1:]
		s.mu.Unlock()
		return r
	}
	def := s.def
	s.mu.Unlock()
	return def(req)
}

// wait blocks until ch is closed (a nil ch never is), the client goes away
// or the test ends. It reports whether ch was closed.
func (s *Server) wait(ctx context.Context, ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	case <-ctx.Done():
		return false
	case <-s.closing:
		return false
	}
}

// sleep waits d, or less when the client goes away or the test ends. It
// reports whether the whole duration passed.
func (s *Server) sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-s.closing:
		return false
	}
}

// body writes a response body, gzip-compressed when the client asked for it,
// and flushes through to the connection on demand.
type body struct {
	w  io.Writer
	gz *gzip.Writer
	rc *http.ResponseController
}

// startBody sets the headers (defaults, then extra, then the encoding) and
// writes the status line. Compression follows the request's Accept-Encoding
// so that a proxy which forwards the header sees compressed bytes, as it
// would from the real API behind a CDN.
func startBody(w http.ResponseWriter, r *http.Request, status int, contentType string, extra http.Header, forceGzip bool) *body {
	h := w.Header()
	h.Set("Content-Type", contentType)
	copyHeader(h, extra)
	b := &body{w: w, rc: http.NewResponseController(w)}
	if forceGzip || acceptsGzip(r.Header) {
		h.Set("Content-Encoding", "gzip")
		h.Add("Vary", "Accept-Encoding")
		h.Del("Content-Length")
		b.gz = gzip.NewWriter(w)
		b.w = b.gz
	}
	w.WriteHeader(status)
	return b
}

// copyHeader sets every key of src in dst, replacing dst's values.
func copyHeader(dst, src http.Header) {
	for k, vs := range src {
		dst.Del(k)
		for _, v := range vs {
			dst.Add(k, v)
		}
	}
}

func (b *body) Write(p []byte) (int, error) { return b.w.Write(p) }

// Flush pushes everything written so far to the client, through the gzip
// stream's sync flush when compressing.
func (b *body) Flush() error {
	if b.gz != nil {
		if err := b.gz.Flush(); err != nil {
			return err
		}
	}
	return b.rc.Flush()
}

// Close ends the gzip stream; the HTTP response ends when the handler returns.
func (b *body) Close() error {
	if b.gz != nil {
		return b.gz.Close()
	}
	return nil
}

// acceptsGzip reports whether an Accept-Encoding header lists gzip with a
// non-zero quality.
func acceptsGzip(h http.Header) bool {
	for _, v := range h.Values("Accept-Encoding") {
		for part := range strings.SplitSeq(v, ",") {
			coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
			if !strings.EqualFold(strings.TrimSpace(coding), "gzip") {
				continue
			}
			q := 1.0
			for p := range strings.SplitSeq(params, ";") {
				k, v, _ := strings.Cut(strings.TrimSpace(p), "=")
				if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); strings.EqualFold(k, "q") && err == nil {
					q = f
				}
			}
			return q > 0
		}
	}
	return false
}

// apiError is the API's error body.
type apiError struct {
	Error apiErrorDetail `json:"error"`
}

type apiErrorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

// writeError answers with the API's error body; empty param and code are
// sent as null, as the API does.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, status int, message, typ, param, code string, extra http.Header) {
	if message == "" {
		message = http.StatusText(status)
	}
	if typ == "" {
		typ = "invalid_request_error"
		if status >= 500 {
			typ = "server_error"
		}
	}
	e := apiError{Error: apiErrorDetail{Message: message, Type: typ, Param: nullable(param), Code: nullable(code)}}
	s.writeJSON(w, r, status, e, extra)
}

// writeJSON answers with v as a JSON document.
func (s *Server) writeJSON(w http.ResponseWriter, r *http.Request, status int, v any, extra http.Header) {
	data, err := marshal(v)
	if err != nil {
		s.t.Errorf("fakeai: encode response: %v", err)
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	b := startBody(w, r, status, "application/json", extra, false)
	// Write errors mean the client went away; there is nobody to tell.
	_, _ = b.Write(append(data, '\n'))
	_ = b.Close()
}

// marshal encodes v like the API does: without escaping <, > and & into
// \u003c and friends, which encoding/json does by default.
func marshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// nullable returns nil (JSON null) for an empty string.
func nullable(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

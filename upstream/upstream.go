// Package upstream is a small client of the upstream's chat completions,
// for the calls the proxy makes on its own behalf (summaries and titles),
// under the same key rules as proxied traffic: the proxy's key when it
// holds one, else the key of the client request that caused the call, and
// the configured organization and project.
//
// Proxied traffic itself goes through the reverse proxy in package proxy,
// which relays bytes; this client builds and reads whole JSON requests.
package upstream

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/historyproxy/historyproxy/tokens"
)

// ErrNoKey is returned when no key can be sent: the proxy holds none and
// the call has no client key to use.
var ErrNoKey = errors.New("no upstream key: the proxy holds none (upstream.api_key_env) and no client request brought one")

// maxReply bounds the reply read: a summary or a title is small.
const maxReply = 4 << 20

// Options configure a Client. URL is required.
type Options struct {
	URL *url.URL // base URL including /v1
	// APIKey, when not empty, is sent on every call; otherwise the
	// Authorization a call brings is.
	APIKey                string
	Organization, Project string
	// Timeout bounds a whole call; 0: 2 minutes.
	Timeout   time.Duration
	Transport http.RoundTripper // nil: http.DefaultTransport
}

// Client calls the upstream's chat completions. It is safe for concurrent
// use.
type Client struct {
	opt  Options
	http *http.Client
}

// New builds a client.
func New(o Options) *Client {
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Minute
	}
	tr := o.Transport
	if tr == nil {
		tr = http.DefaultTransport
	}
	return &Client{opt: o, http: &http.Client{Transport: tr, Timeout: o.Timeout}}
}

// HoldsKey reports whether the client sends a key of its own.
func (c *Client) HoldsKey() bool { return c.opt.APIKey != "" }

// Message is one chat message of a call.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// ChatRequest is a non-streamed chat completion.
type ChatRequest struct {
	Model    string    `json:"model"`
	Messages []Message `json:"messages"`
	// MaxCompletionTokens bounds the reply (OpenAI's current name for
	// max_tokens, which its reasoning models require); 0: not sent.
	MaxCompletionTokens int `json:"max_completion_tokens,omitempty"`
}

// ChatResponse is what a call returned.
type ChatResponse struct {
	Content      string
	FinishReason string
	// Usage is the upstream's; Usage.Estimated when it sent none (the
	// counts are then 0, and the caller estimates).
	Usage     tokens.Usage
	RequestID string
}

// StatusError is an upstream's non-2xx answer.
type StatusError struct {
	Status  int
	Message string // the error body's message, cut short
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("upstream answered %d: %s", e.Status, e.Message)
}

// Chat makes one call. auth is the Authorization header of the client
// request that caused it ("" when none), used only when the client holds
// no key of its own.
func (c *Client) Chat(ctx context.Context, auth string, req ChatRequest) (ChatResponse, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return ChatResponse{}, fmt.Errorf("encode chat request: %w", err)
	}
	u := *c.opt.URL
	u.Path = strings.TrimSuffix(u.Path, "/") + "/chat/completions"
	u.RawPath = ""
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
	if err != nil {
		return ChatResponse{}, fmt.Errorf("chat request: %w", err)
	}
	hr.Header.Set("Content-Type", "application/json")
	switch {
	case c.opt.APIKey != "":
		hr.Header.Set("Authorization", "Bearer "+c.opt.APIKey)
	case auth != "":
		hr.Header.Set("Authorization", auth)
	default:
		return ChatResponse{}, ErrNoKey
	}
	if c.opt.Organization != "" {
		hr.Header.Set("OpenAI-Organization", c.opt.Organization)
	}
	if c.opt.Project != "" {
		hr.Header.Set("OpenAI-Project", c.opt.Project)
	}
	resp, err := c.http.Do(hr)
	if err != nil {
		return ChatResponse{}, fmt.Errorf("chat request: %w", err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxReply))
	if err != nil {
		return ChatResponse{}, fmt.Errorf("read chat reply: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		msg := http.StatusText(resp.StatusCode)
		if json.Unmarshal(raw, &e) == nil && e.Error.Message != "" {
			msg = e.Error.Message
		}
		if len(msg) > 300 {
			// Cut on a character's boundary: the message reaches logs
			// and the admin API's JSON.
			msg = strings.ToValidUTF8(msg[:300], "")
		}
		return ChatResponse{}, &StatusError{Status: resp.StatusCode, Message: msg}
	}
	var out struct {
		Choices []struct {
			Message struct {
				Content *string `json:"content"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage *struct {
			Prompt     int64 `json:"prompt_tokens"`
			Completion int64 `json:"completion_tokens"`
			Prompt2    struct {
				Cached int64 `json:"cached_tokens"`
			} `json:"prompt_tokens_details"`
			Completion2 struct {
				Reasoning int64 `json:"reasoning_tokens"`
			} `json:"completion_tokens_details"`
		} `json:"usage"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return ChatResponse{}, fmt.Errorf("decode chat reply: %w", err)
	}
	if len(out.Choices) == 0 {
		return ChatResponse{}, errors.New("decode chat reply: no choices")
	}
	r := ChatResponse{FinishReason: out.Choices[0].FinishReason, RequestID: resp.Header.Get("X-Request-Id")}
	if p := out.Choices[0].Message.Content; p != nil {
		r.Content = *p
	}
	if u := out.Usage; u != nil {
		r.Usage = tokens.Usage{Prompt: u.Prompt, Completion: u.Completion, Cached: u.Prompt2.Cached, Reasoning: u.Completion2.Reasoning}
	} else {
		r.Usage.Estimated = true
	}
	return r, nil
}

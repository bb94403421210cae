package upstream

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/tokens"
)

func TestChat(t *testing.T) {
	req := ChatRequest{Model: "gpt-4o-mini", Messages: []Message{{Role: "system", Content: "Summarize."}, {Role: "user", Content: "hi"}}, MaxCompletionTokens: 64}
	for _, tc := range []struct {
		name        string
		opt         Options // URL is filled in
		auth        string
		reply       fakeai.Reply
		wantAuth    string // "": auth
		wantOrg     string
		want        ChatResponse // RequestID checked apart
		wantErr     string
		wantStatus  int
		wantNoCalls bool
	}{
		{name: "the proxy's key wins over the client's", opt: Options{APIKey: "sk-proxy", Organization: "org-1", Project: "proj-1"}, auth: "Bearer sk-client",
			reply:    fakeai.Reply{Content: "A summary.", Usage: &fakeai.Usage{PromptTokens: 30, CompletionTokens: 5, CachedTokens: 10, ReasoningTokens: 2}},
			wantAuth: "Bearer sk-proxy", wantOrg: "org-1",
			want: ChatResponse{Content: "A summary.", FinishReason: "stop", Usage: tokens.Usage{Prompt: 30, Completion: 5, Cached: 10, Reasoning: 2}}},
		{name: "the client's key when the proxy holds none", auth: "Bearer sk-client",
			reply:    fakeai.Reply{Content: "Title", FinishReason: "length", Usage: &fakeai.Usage{PromptTokens: 7, CompletionTokens: 1}},
			wantAuth: "Bearer sk-client",
			want:     ChatResponse{Content: "Title", FinishReason: "length", Usage: tokens.Usage{Prompt: 7, Completion: 1}}},
		{name: "no key at all makes no call", wantErr: ErrNoKey.Error(), wantNoCalls: true},
		{name: "an error body's message", auth: "Bearer sk-client",
			reply:   fakeai.Reply{Status: 429, ErrorMessage: "Rate limit reached for gpt-4o-mini"},
			wantErr: "upstream answered 429: Rate limit reached for gpt-4o-mini", wantStatus: 429},
		{name: "an error without a JSON body gets the status text", auth: "Bearer sk-client",
			reply:   fakeai.Reply{Status: 502, Raw: []byte("<html>bad gateway</html>")},
			wantErr: "upstream answered 502: Bad Gateway", wantStatus: 502},
		{name: "a long error message is cut", auth: "Bearer sk-client",
			reply:   fakeai.Reply{Status: 400, ErrorMessage: strings.Repeat("x", 1000)},
			wantErr: "upstream answered 400: " + strings.Repeat("x", 300), wantStatus: 400},
		{name: "a long message is cut between characters", auth: "Bearer sk-client",
			reply:   fakeai.Reply{Status: 400, ErrorMessage: "x" + strings.Repeat("é", 500)},
			wantErr: "upstream answered 400: x" + strings.Repeat("é", 149), wantStatus: 400},
		{name: "no choices is an error", auth: "Bearer sk-client",
			reply: fakeai.Reply{Raw: []byte(`{"id":"c1","object":"chat.completion","choices":[]}`)}, wantErr: "no choices"},
		{name: "not JSON is an error", auth: "Bearer sk-client",
			reply: fakeai.Reply{Raw: []byte(`not json`)}, wantErr: "decode chat reply"},
		{name: "no usage is an estimate", auth: "Bearer sk-client",
			reply: fakeai.Reply{Raw: []byte(`{"choices":[{"message":{"role":"assistant","content":null},"finish_reason":"stop"}]}`)},
			want:  ChatResponse{FinishReason: "stop", Usage: tokens.Usage{Estimated: true}}},
		{name: "a timeout", opt: Options{Timeout: 50 * time.Millisecond}, auth: "Bearer sk-client",
			reply: fakeai.Reply{HeaderDelay: 2 * time.Second}, wantErr: "chat request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := fakeai.New(t)
			up.Enqueue(tc.reply)
			u, err := url.Parse(up.URL)
			require.NoError(t, err)
			opt := tc.opt
			opt.URL = u
			got, err := New(opt).Chat(context.Background(), tc.auth, req)
			if tc.wantNoCalls {
				require.Empty(t, up.Requests())
			}
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				var se *StatusError
				if tc.wantStatus != 0 {
					require.True(t, errors.As(err, &se), "a StatusError")
					require.Equal(t, tc.wantStatus, se.Status)
					require.EqualError(t, err, tc.wantErr) // the whole message, cut where it should be
				}
				return
			}
			require.NoError(t, err)
			require.NotEmpty(t, got.RequestID, "the upstream's x-request-id")
			got.RequestID = ""
			require.Equal(t, tc.want, got)
			sent := up.LastChat()
			require.Equal(t, "/v1/chat/completions", sent.Path)
			wantAuth := tc.wantAuth
			if wantAuth == "" {
				wantAuth = tc.auth
			}
			require.Equal(t, wantAuth, sent.Header.Get("Authorization"))
			require.Equal(t, tc.wantOrg, sent.Header.Get("OpenAI-Organization"))
			require.Equal(t, "application/json", sent.Header.Get("Content-Type"))
			require.JSONEq(t, `{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Summarize."},{"role":"user","content":"hi"}],"max_completion_tokens":64}`, string(sent.Body))
		})
	}
}

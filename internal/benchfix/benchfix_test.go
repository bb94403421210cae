package benchfix

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"
)

// The benchmark's upstream must speak the API's wire format well enough
// for the official SDK, with and without the usage chunk, whatever the
// number of chunks, or the benchmark measures a conversation no app has.
func TestUpstreamWireFormat(t *testing.T) {
	for _, tc := range []struct {
		name   string
		chunks int
		usage  bool
	}{
		{"default chunks", 0, false},
		{"default chunks with usage", 0, true},
		{"one chunk", 1, true},
		{"more chunks than words", 200, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(NewUpstream(UpstreamOptions{Chunks: tc.chunks}))
			defer srv.Close()
			c := openai.NewClient(option.WithBaseURL(srv.URL+"/v1/"), option.WithAPIKey("sk-test"), option.WithMaxRetries(0))
			params := openai.ChatCompletionNewParams{Model: Model, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(UserText)}}
			if tc.usage {
				params.StreamOptions.IncludeUsage = openai.Bool(true)
			}
			stream := c.Chat.Completions.NewStreaming(context.Background(), params)
			var acc openai.ChatCompletionAccumulator
			chunks := 0
			for stream.Next() {
				chunk := stream.Current()
				require.True(t, acc.AddChunk(chunk))
				if len(chunk.Choices) > 0 && chunk.Choices[0].Delta.Role == "" && chunk.Choices[0].FinishReason == "" {
					chunks++
				}
			}
			require.NoError(t, stream.Err())
			require.Equal(t, ReplyText, acc.Choices[0].Message.Content)
			require.Equal(t, "stop", acc.Choices[0].FinishReason)
			want := tc.chunks
			if want == 0 {
				want = StreamChunks
			}
			require.Equal(t, want, chunks, "content chunks")
			if tc.usage {
				require.EqualValues(t, 1539, acc.Usage.TotalTokens)
			} else {
				require.Zero(t, acc.Usage.TotalTokens, "usage sent without include_usage")
			}

			whole, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: Model,
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(UserText)}})
			require.NoError(t, err)
			require.Equal(t, ReplyText, whole.Choices[0].Message.Content)
			require.EqualValues(t, 1539, whole.Usage.TotalTokens)
		})
	}
}

// A stream asked to pause stays open after its first content chunk until
// the client leaves, which is what lets the harness hold many at once.
func TestUpstreamPause(t *testing.T) {
	srv := httptest.NewServer(NewUpstream(UpstreamOptions{}))
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, err := NewRequest(srv.URL+"/v1/chat/completions", RequestBody(true), "bench:pause@example.com:support")
	require.NoError(t, err)
	req = req.WithContext(ctx)
	req.Header.Set(PauseHeader, "1h")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()

	// The role chunk and the first content chunk come at once...
	_, events, _ := Replies(0)
	want := string(events[0]) + string(events[1])
	got := make([]byte, len(want))
	_, err = io.ReadFull(resp.Body, got)
	require.NoError(t, err)
	require.Equal(t, want, string(got))
	// ...then nothing until the client cancels.
	read := make(chan error, 1)
	go func() { _, err := resp.Body.Read(make([]byte, 1)); read <- err }()
	select {
	case err := <-read:
		t.Fatalf("the paused stream went on (read error %v)", err)
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	require.Error(t, <-read)
	require.False(t, strings.Contains(string(got), "[DONE]"))
}

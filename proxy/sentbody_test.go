package proxy

import (
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestSentBodyLetsGo: the rewritten body reads as it was written, then
// holds none of it (an open stream would hold it until it ends).
func TestSentBodyLetsGo(t *testing.T) {
	for _, size := range []int{0, 1, 100, 70_000} {
		want := make([]byte, size)
		for i := range want {
			want[i] = byte(i)
		}
		b := &sentBody{b: want}
		got, err := io.ReadAll(b)
		require.NoError(t, err)
		require.Equal(t, want, got)
		require.Nil(t, b.b, "%d bytes read, still held", size)
		n, err := b.Read(make([]byte, 8))
		require.Equal(t, 0, n)
		require.Equal(t, io.EOF, err)
	}
	b := &sentBody{b: []byte("unread")}
	require.NoError(t, b.Close())
	require.Nil(t, b.b)
}

// TestRewrittenKeepsWhatTheTurnReads: once the body is written, the
// request keeps what recording and counting read, not its raw bytes.
func TestRewrittenKeepsWhatTheTurnReads(t *testing.T) {
	req, aerr := parseChat([]byte(`{"model":"gpt-4o","stream":true,"tools":[{"type":"function","function":{"name":"f"}}],`+
		`"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}]}`), limits{})
	require.Nil(t, aerr)
	req.rewritten()
	require.Nil(t, req.fields)
	require.Nil(t, req.raw)
	require.Equal(t, "gpt-4o", req.Model)
	require.True(t, req.Stream)
	require.JSONEq(t, `[{"type":"function","function":{"name":"f"}}]`, string(req.Tools))
	require.Len(t, req.Messages, 2)
	require.Equal(t, "hi", req.newMessages()[0].Content)
}

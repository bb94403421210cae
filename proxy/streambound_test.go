package proxy

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
)

// endless is an upstream body that sends head, then fill: a single event
// that does not end (it stops at sbLimit, so that a test of a proxy
// without bounds ends too).
type endless struct {
	head []byte
	fill byte
	sent int64
}

const sbLimit = 4 << 20

func (e *endless) Read(p []byte) (int, error) {
	if e.sent >= sbLimit {
		return 0, io.EOF
	}
	n := copy(p, e.head)
	e.head = e.head[n:]
	for i := n; i < len(p); i++ {
		p[i] = e.fill
	}
	e.sent += int64(len(p))
	return len(p), nil
}

func (e *endless) Close() error { return nil }

// TestStreamBodyBounds: what a stream holds to be read is bounded. An
// event that never ends, or a reply that grows past the bound, gets the
// turn recorded at once with what was assembled (incomplete), and the rest
// of the stream relayed unchanged and unread.
func TestStreamBodyBounds(t *testing.T) {
	delta := func(s string) string {
		return fmt.Sprintf(`{"choices":[{"index":0,"delta":{"content":%q},"finish_reason":null}]}`, s)
	}
	cases := []struct {
		name string
		head string
		fill byte
	}{
		{name: "an event that never ends", head: sbEvents(sbRole, sbHello) + "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"", fill: 'x'},
		{name: "a reply that never ends", head: sbEvents(sbRole, sbHello), fill: 0}, // filled with deltas below
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var src io.ReadCloser
			var sent func() int64
			if tc.fill != 0 {
				e := &endless{head: []byte(tc.head), fill: tc.fill}
				src, sent = e, func() int64 { return e.sent }
			} else {
				// Whole events of 1 KiB of content each, without end.
				ev := []byte("data: " + delta(strings.Repeat("y", 1024)) + "\n\n")
				r := &repeater{head: []byte(tc.head), unit: ev}
				src, sent = r, func() int64 { return r.sent }
			}
			var read int
			f := &sbFinish{read: &read}
			rp := &reply{}
			b := newStreamBody(src, false, rp, sbNow, f.finish)
			b.maxEvent, b.maxReply = 64<<10, 64<<10

			// The client reads 1 MiB: sixteen times the bounds.
			var got bytes.Buffer
			buf := make([]byte, 4096)
			for got.Len() < 1<<20 {
				n, err := b.Read(buf)
				require.NoError(t, err)
				got.Write(buf[:n])
				read += n
				require.LessOrEqual(t, cap(b.in), 64<<10+2*len(buf), "the unframed bytes held")
			}
			require.Equal(t, 1, f.calls, "the turn is recorded once the bound is passed")
			require.False(t, f.complete)
			require.True(t, rp.Truncated)
			require.Less(t, f.readAt, 64<<10+2*len(buf), "recorded before the rest was relayed")
			require.LessOrEqual(t, rp.Content.Len(), 64<<10+2*len(buf), "the reply assembled is bounded")
			require.True(t, strings.HasPrefix(rp.Content.String(), "Hello"))
			require.LessOrEqual(t, int64(got.Len()), sent(), "relayed as it came")
			require.NoError(t, b.Close())
			require.Equal(t, 1, f.calls)
		})
	}
}

// repeater sends head, then unit over and over (until sbLimit).
type repeater struct {
	head, unit []byte
	pos        int
	sent       int64
}

func (r *repeater) Read(p []byte) (int, error) {
	if r.sent >= sbLimit {
		return 0, io.EOF
	}
	n := copy(p, r.head)
	r.head = r.head[n:]
	for n < len(p) {
		c := copy(p[n:], r.unit[r.pos:])
		n += c
		r.pos = (r.pos + c) % len(r.unit)
	}
	r.sent += int64(n)
	return n, nil
}

func (r *repeater) Close() error { return nil }

// TestTruncatedReplyIsIncomplete: a reply cut at the bound is stored as
// incomplete even when its finish reason had come.
func TestTruncatedReplyIsIncomplete(t *testing.T) {
	x := &exchange{reply: &reply{FinishReason: "stop", Truncated: true}, req: &chatRequest{}}
	x.reply.Content.WriteString("partial")
	m, ok := x.assistant(0, true)
	require.True(t, ok)
	require.Equal(t, history.StatusIncomplete, m.Status)
}

// TestGzipStreamBodyBounds: a stream gzipped although the proxy asked for
// identity is decoded on the side within the same bounds. Its compressed
// bytes all reach the client unchanged, while the decoder stops at the
// bound (a few KB of gzip can expand to gigabytes); the turn is stored as
// incomplete with what was assembled.
func TestGzipStreamBodyBounds(t *testing.T) {
	delta := "data: " + fmt.Sprintf(`{"choices":[{"index":0,"delta":{"content":%q},"finish_reason":null}]}`, strings.Repeat("y", 1024)) + "\n\n"
	cases := []struct {
		name string
		tail func(w io.Writer)
	}{
		{name: "an event that never ends", tail: func(w io.Writer) {
			_, _ = io.WriteString(w, `data: {"choices":[{"index":0,"delta":{"content":"`)
			_, _ = w.Write(bytes.Repeat([]byte{'x'}, 1<<20))
		}},
		{name: "a reply that never ends", tail: func(w io.Writer) {
			for range 1024 {
				_, _ = io.WriteString(w, delta)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var zipped bytes.Buffer
			zw := gzip.NewWriter(&zipped)
			_, _ = io.WriteString(zw, sbEvents(sbRole, sbHello))
			tc.tail(zw)
			require.NoError(t, zw.Close())

			var read int
			f := &sbFinish{read: &read}
			rp := &reply{}
			g := newGzipStreamBody(io.NopCloser(bytes.NewReader(zipped.Bytes())), rp, sbNow, f.finish)
			g.obs.maxEvent, g.obs.maxReply = 64<<10, 64<<10 // before the first byte reaches the decoder

			got, err := sbRelay(g, 4096, &read)
			require.NoError(t, err)
			require.Equal(t, zipped.Bytes(), got, "relayed unchanged")
			require.Equal(t, 1, f.calls)
			require.False(t, f.complete)
			require.True(t, rp.Truncated, "the decoder stopped at the bound")
			require.True(t, strings.HasPrefix(rp.Content.String(), "Hello"))
			require.LessOrEqual(t, rp.Content.Len(), 64<<10+2*len(g.buf), "the reply assembled is bounded")
			require.NoError(t, g.Close())
			require.Equal(t, 1, f.calls)

			x := &exchange{reply: rp, req: &chatRequest{}}
			m, ok := x.assistant(0, f.complete)
			require.True(t, ok)
			require.Equal(t, history.StatusIncomplete, m.Status)
		})
	}
}

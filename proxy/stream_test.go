package proxy

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
)

// sbReader is an upstream body that hands out data in reads of the given
// sizes (cycled; none: everything at once), then fails with err (io.EOF
// when nil). With eofWithData the last bytes come together with err, as
// some readers do.
type sbReader struct {
	data        []byte
	sizes       []int
	next        int
	err         error
	eofWithData bool
	reads       int
	closed      int
}

func (r *sbReader) Read(p []byte) (int, error) {
	r.reads++
	if len(r.data) == 0 {
		return 0, r.end()
	}
	n := len(r.data)
	if len(r.sizes) > 0 {
		n = r.sizes[r.next%len(r.sizes)]
		r.next++
	}
	n = min(n, len(r.data), len(p))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	if len(r.data) == 0 && r.eofWithData {
		return n, r.end()
	}
	return n, nil
}

func (r *sbReader) end() error {
	if r.err != nil {
		return r.err
	}
	return io.EOF
}

func (r *sbReader) Close() error { r.closed++; return nil }

// sbFinish records the calls of a stream's finish func: with what, and how
// many bytes the client had read by then (read is kept by sbRelay).
type sbFinish struct {
	calls    int
	complete bool
	readAt   int // bytes handed to the client when finish was called
	read     *int
	err      error // what finish returns
}

func (f *sbFinish) finish(complete bool) error {
	f.calls++
	f.complete = complete
	f.readAt = *f.read
	return f.err
}

// sbRelay reads the whole stream as the reverse proxy does, through a
// buffer of bufSize bytes, counting what was read so far into *read. It
// returns what was read and the error that ended the stream (nil at EOF).
func sbRelay(b io.Reader, bufSize int, read *int) ([]byte, error) {
	var out []byte
	buf := make([]byte, bufSize)
	for i := 0; ; i++ {
		if i > 1<<22 {
			return out, errors.New("stream never ends")
		}
		n, err := b.Read(buf)
		out = append(out, buf[:n]...)
		*read += n
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}

var sbNow = func() time.Time { return time.Unix(1700000000, 0) }

// sbEvents joins SSE data payloads into a "data: x\n\n" stream.
func sbEvents(datas ...string) string {
	var b strings.Builder
	for _, d := range datas {
		b.WriteString("data: " + d + "\n\n")
	}
	return b.String()
}

// sbCR frames a stream with lone CRs instead of LFs.
func sbCR(s string) string { return strings.ReplaceAll(s, "\n", "\r") }

// Chunks as the API streams them (gpt-4o-mini, include_usage on).
const (
	sbRole    = `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}`
	sbHello   = `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}`
	sbWorld   = `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{"content":" world"},"logprobs":null,"finish_reason":null}],"usage":null}`
	sbStop    = `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}`
	sbUsage   = `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}`
	sbStopUse = `{"id":"chatcmpl-B9","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}`
	sbDone    = `[DONE]`
	// Error events as servers send them mid-stream.
	sbErrEvent  = `{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}`
	sbErrObject = `{"object":"error","message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}`
)

// sbToolCalls is a parallel tool-call stream: two calls, arguments in
// fragments, announcements interleaved as the API sends them.
var sbToolCalls = sbEvents(
	`{"id":"chatcmpl-T1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}],"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}`,
	`{"id":"chatcmpl-T1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]},"logprobs":null,"finish_reason":null}],"usage":null}`,
	`{"id":"chatcmpl-T1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}`,
	`{"id":"chatcmpl-T1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"get_time","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}`,
	`{"id":"chatcmpl-T1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"tz\":\"Europe/Paris\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}`,
	`{"id":"chatcmpl-T1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}`,
	sbUsage, sbDone)

func TestEventEnd(t *testing.T) {
	cases := []struct {
		name string
		in   string
		want int
	}{
		{name: "empty", in: "", want: -1},
		{name: "LF event", in: "data: x\n\n", want: 9},
		{name: "CRLF event", in: "data: x\r\n\r\n", want: 11},
		{name: "CRLF line, LF blank line", in: "data: x\r\n\n", want: 10},
		{name: "LF line, CRLF blank line", in: "data: x\n\r\n", want: 10},
		{name: "only the first of two events", in: "data: a\n\ndata: b\n\n", want: 9},
		{name: "no blank line yet", in: "data: x\n", want: -1},
		{name: "a CR at the end ends the blank line", in: "data: x\r\n\r", want: 10},
		{name: "no newline at all", in: "data: x", want: -1},
		{name: "multi-line data", in: "data: a\ndata: b\n\nrest", want: 17},
		{name: "comment then data", in: ": keep-alive\ndata: x\n\n", want: 22},
		{name: "lone blank line", in: "\n", want: 1},
		{name: "lone CRLF blank line", in: "\r\n", want: 2},
		{name: "a line of spaces is not blank", in: "data: x\n \n", want: -1},
		{name: "a lone CR ends a line, so CR CR LF holds a blank line", in: "data: x\n\r\r\n", want: 9},
		// Lone CR line endings are allowed by the SSE spec; a CR at the very
		// end ends its line at once (the stream body skips an LF that
		// follows in the next read).
		{name: "CR-only endings", in: "data: x\r\rdata: y", want: 9},
		{name: "CR-only event at the end", in: "data: x\r\r", want: 9},
		{name: "a line ended by a CR at the end, no blank line yet", in: "data: x\r", want: -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := eventEnd([]byte(tc.in)); got != tc.want {
				t.Fatalf("eventEnd(%q): got %d, want %d", tc.in, got, tc.want)
			}
		})
	}
}

func TestEventData(t *testing.T) {
	cases := []struct {
		name     string
		ev       string
		want     string
		wantNil  bool
		wantDone bool
	}{
		{name: "data line", ev: "data: {\"a\":1}\n\n", want: `{"a":1}`},
		{name: "no space after colon", ev: "data:{\"a\":1}\n\n", want: `{"a":1}`},
		{name: "only one space is dropped", ev: "data:  x\n\n", want: " x"},
		{name: "CRLF", ev: "data: x\r\n\r\n", want: "x"},
		{name: "multi-line data joined by LF", ev: "data: {\"a\":\ndata: 1}\n\n", want: "{\"a\":\n1}"},
		{name: "multi-line CRLF", ev: "data: a\r\ndata: b\r\n\r\n", want: "a\nb"},
		{name: "event and id fields ignored", ev: "event: message\nid: 7\ndata: x\nretry: 100\n\n", want: "x"},
		{name: "comment only", ev: ": keep-alive\n\n", wantNil: true},
		{name: "comment and data", ev: ": OPENROUTER PROCESSING\ndata: x\n\n", want: "x"},
		{name: "blank event", ev: "\n", wantNil: true},
		{name: "empty data", ev: "data:\n\n", want: ""},
		{name: "DONE", ev: "data: [DONE]\n\n", want: "[DONE]", wantDone: true},
		{name: "DONE CRLF", ev: "data: [DONE]\r\n\r\n", want: "[DONE]", wantDone: true},
		{name: "DONE without space", ev: "data:[DONE]\n\n", want: "[DONE]", wantDone: true},
		{name: "DONE with trailing space", ev: "data: [DONE] \n\n", want: "[DONE] ", wantDone: true},
		{name: "DONE with trailing text", ev: "data: [DONE]x\n\n", want: "[DONE]x", wantDone: true},
		{name: "DONE not at the start is data", ev: "data:  [DONE]\n\n", want: " [DONE]"},
		{name: "DONE split over two lines is not DONE", ev: "data: [DO\ndata: NE]\n\n", want: "[DO\nNE]"},
		{name: "field name is case sensitive", ev: "Data: x\n\n", wantNil: true},
		{name: "no trailing newline", ev: "data: x", want: "x"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			data, done := eventData([]byte(tc.ev))
			if tc.wantNil {
				if data != nil {
					t.Fatalf("got data %q, want none", data)
				}
			} else {
				if data == nil {
					t.Fatalf("got no data, want %q", tc.want)
				}
				if string(data) != tc.want {
					t.Fatalf("got data %q, want %q", data, tc.want)
				}
			}
			if done != tc.wantDone {
				t.Fatalf("got done %v, want %v", done, tc.wantDone)
			}
		})
	}
}

func TestStreamBodyRelaysBytes(t *testing.T) {
	text := sbEvents(sbRole, sbHello, sbWorld, sbStop, sbUsage, sbDone)
	noUsage := sbEvents(sbRole, sbHello, sbWorld, sbStop, sbDone)
	crlf := strings.ReplaceAll(text, "\n", "\r\n")
	crlfNoUsage := strings.ReplaceAll(noUsage, "\n", "\r\n")
	multi := "data: {\"choices\":[{\"index\":0,\n" + "data: \"delta\":{\"content\":\"Hel\"}}]}\n\n" +
		"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n" + "data: [DONE]\n\n"
	comments := ": keep-alive\n\n" + "data: " + sbHello + "\n\n" + ": OPENROUTER PROCESSING\n\n" + "event: ping\ndata: {}\n\n" + sbEvents(sbStop, sbDone)
	ones := []int{1}
	cases := []struct {
		name        string
		in          string
		sizes       []int // upstream read sizes; nil: all at once
		buf         int   // client read buffer; 0: 32 KiB
		hide        bool
		want        string // what the client gets; "" = in
		wantContent string
		wantUsage   bool
	}{
		{name: "LF framing", in: text, wantContent: "Hello world", wantUsage: true},
		{name: "CRLF framing", in: crlf, wantContent: "Hello world", wantUsage: true},
		{name: "one-byte upstream reads", in: text, sizes: ones, wantContent: "Hello world", wantUsage: true},
		{name: "one-byte client reads", in: text, buf: 1, wantContent: "Hello world", wantUsage: true},
		{name: "odd read sizes both sides", in: crlf, sizes: []int{3, 1, 7, 64, 2}, buf: 5, wantContent: "Hello world", wantUsage: true},
		{name: "multi-line data assembled", in: multi, sizes: ones, wantContent: "Hello"},
		{name: "comments and other fields relayed", in: comments, sizes: []int{2}, wantContent: "Hello"},
		{name: "usage chunk hidden", in: text, hide: true, want: noUsage, wantContent: "Hello world", wantUsage: true},
		{name: "usage chunk hidden CRLF, one-byte reads", in: crlf, sizes: ones, buf: 1, hide: true, want: crlfNoUsage, wantContent: "Hello world", wantUsage: true},
		{name: "usage on a chunk with choices is kept", in: sbEvents(sbHello, sbStopUse, sbDone), hide: true, wantContent: "Hello", wantUsage: true},
		{name: "usage null chunks are kept", in: sbEvents(sbHello, sbStop, sbDone), hide: true, wantContent: "Hello"},
		{name: "usage chunk kept when the client asked", in: text, hide: false, wantContent: "Hello world", wantUsage: true},
		{name: "tool calls relayed", in: sbToolCalls, sizes: []int{13}, wantUsage: true},
		{name: "event without blank line at EOF relayed as is", in: sbEvents(sbHello) + "data: {\"partial\":", wantContent: "Hello"},
		{name: "garbage relayed", in: "\x00\xff{not sse}\n\n\n\r\n", sizes: ones},
		{name: "empty stream", in: ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := &sbReader{data: []byte(tc.in), sizes: tc.sizes}
			var read int
			f := &sbFinish{read: &read}
			r := &reply{}
			b := newStreamBody(src, tc.hide, r, sbNow, f.finish)
			buf := tc.buf
			if buf == 0 {
				buf = 32 << 10
			}
			got, err := sbRelay(b, buf, &read)
			require.NoError(t, err)
			want := tc.want
			if want == "" {
				want = tc.in
			}
			if string(got) != want {
				t.Fatalf("got %q, want %q", got, want)
			}
			require.NoError(t, b.Close())
			if f.calls != 1 {
				t.Fatalf("got %d finish calls, want 1", f.calls)
			}
			if src.closed != 1 {
				t.Fatalf("got %d upstream closes, want 1", src.closed)
			}
			if got := r.Content.String(); got != tc.wantContent {
				t.Fatalf("got content %q, want %q", got, tc.wantContent)
			}
			if (r.Usage != nil) != tc.wantUsage {
				t.Fatalf("got usage %v, want usage %v", r.Usage != nil, tc.wantUsage)
			}
		})
	}
}

func TestStreamBodyFinishesBeforeDone(t *testing.T) {
	text := sbEvents(sbRole, sbHello, sbWorld, sbStop, sbUsage, sbDone)
	cases := []struct {
		name    string
		in      string
		sizes   []int
		buf     int
		hide    bool
		withEOF bool // the last bytes come with io.EOF
	}{
		{name: "whole stream in one read", in: text, buf: 32 << 10},
		{name: "one-byte upstream reads", in: text, sizes: []int{1}, buf: 32 << 10},
		{name: "one-byte client reads", in: text, buf: 1},
		{name: "CRLF, usage hidden, small reads", in: strings.ReplaceAll(text, "\n", "\r\n"), sizes: []int{5, 3}, buf: 7, hide: true},
		{name: "DONE arrives with EOF", in: text, buf: 64, withEOF: true},
		{name: "tool calls", in: sbToolCalls, sizes: []int{1}, buf: 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := &sbReader{data: []byte(tc.in), sizes: tc.sizes, eofWithData: tc.withEOF}
			var read int
			f := &sbFinish{read: &read}
			b := newStreamBody(src, tc.hide, &reply{}, sbNow, f.finish)
			got, err := sbRelay(b, tc.buf, &read)
			require.NoError(t, err)
			done := bytes.Index(got, []byte("data: [DONE]"))
			require.GreaterOrEqual(t, done, 0, "the client gets [DONE]")
			require.Equal(t, 1, f.calls)
			require.True(t, f.complete, "a stream with [DONE] is complete")
			if f.readAt > done {
				t.Fatalf("finish ran after the client had read %d bytes, want at most %d (where [DONE] starts)", f.readAt, done)
			}
			require.NoError(t, b.Close())
			require.Equal(t, 1, f.calls, "Close after the end does not finish again")
		})
	}
}

// TestStreamBodyLoneCRAtReadEnd: an event that ends in a lone CR at the
// end of a read is handed on at once, not held until the next read; an LF
// that comes next belongs to that CR, however the reads split a CR LF.
func TestStreamBodyLoneCRAtReadEnd(t *testing.T) {
	for _, tc := range []struct {
		name, first, rest string
		hide              bool
		wantFirst, want   string
	}{
		{name: "lone CRs", first: sbCR(sbEvents(sbHello)), rest: sbCR(sbEvents(sbStop, sbDone))},
		{name: "a CR LF split by the reads", first: "data: " + sbHello + "\r\n\r", rest: "\n" + sbEvents(sbStop, sbDone)},
		{name: "the LF of a hidden usage chunk is dropped with it", first: sbEvents(sbHello) + "data: " + sbUsage + "\r\n\r", rest: "\n" + sbEvents(sbDone), hide: true,
			wantFirst: sbEvents(sbHello), want: sbEvents(sbHello, sbDone)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pr, pw := io.Pipe()
			var read int
			f := &sbFinish{read: &read}
			r := &reply{}
			b := newStreamBody(pr, tc.hide, r, sbNow, f.finish)
			go func() { _, _ = pw.Write([]byte(tc.first)) }() // then the upstream waits
			got := make(chan []byte, 1)
			go func() {
				buf := make([]byte, 64<<10)
				n, _ := b.Read(buf)
				got <- buf[:n]
			}()
			wantFirst := tc.wantFirst
			if wantFirst == "" {
				wantFirst = tc.first
			}
			select {
			case first := <-got:
				require.Equal(t, wantFirst, string(first), "the first event, at once")
			case <-time.After(10 * time.Second):
				t.Fatal("the event was held back while the upstream waits")
			}
			go func() { _, _ = pw.Write([]byte(tc.rest)); pw.Close() }()
			rest, err := sbRelay(b, 1<<10, &read)
			require.NoError(t, err)
			want := tc.want
			if want == "" {
				want = tc.first + tc.rest
			}
			require.Equal(t, want, wantFirst+string(rest))
			require.Equal(t, "Hello", r.Content.String())
			require.True(t, f.complete)
		})
	}
}

func TestStreamBodyEnds(t *testing.T) {
	errCut := errors.New("connection reset")
	errStoreDown := errors.New("store down")
	cases := []struct {
		name          string
		in            string
		srcErr        error // nil: io.EOF after in
		finishErr     error
		closeAfter    int // >0: Close after reading this many bytes
		wantErr       error
		wantComplete  bool
		wantOut       string // the client's bytes; "" = in
		wantNoDone    bool
		wantFinishes  int
		wantSrcCloses int
	}{
		{name: "EOF without DONE after finish_reason", in: sbEvents(sbHello, sbStop), wantComplete: true, wantFinishes: 1},
		{name: "EOF without DONE or finish_reason", in: sbEvents(sbRole, sbHello), wantComplete: false, wantFinishes: 1},
		{name: "EOF mid-event without finish_reason", in: sbEvents(sbHello) + "data: {\"cho", wantComplete: false, wantFinishes: 1},
		{name: "error mid-stream", in: sbEvents(sbRole, sbHello) + "data: {\"cho", srcErr: errCut, wantErr: errCut, wantComplete: false, wantFinishes: 1},
		{name: "error after finish_reason is still incomplete", in: sbEvents(sbHello, sbStop), srcErr: errCut, wantErr: errCut, wantComplete: false, wantFinishes: 1},
		{name: "error after DONE does not matter", in: sbEvents(sbHello, sbStop, sbDone), srcErr: errCut, wantErr: errCut, wantComplete: true, wantFinishes: 1},
		{name: "Close before the end", in: sbEvents(sbRole, sbHello, sbWorld, sbStop, sbDone), closeAfter: 10, wantComplete: false, wantFinishes: 1,
			wantOut: "data: " + sbRole[:4]},
		{name: "finish error aborts before DONE", in: sbEvents(sbHello, sbStop, sbDone), finishErr: errStoreDown, wantErr: errStoreDown,
			wantComplete: true, wantFinishes: 1, wantOut: sbEvents(sbHello, sbStop), wantNoDone: true},
		{name: "finish error at EOF without DONE surfaces", in: sbEvents(sbHello, sbStop), finishErr: errStoreDown, wantErr: errStoreDown,
			wantComplete: true, wantFinishes: 1},
		{name: "finish error aborts before a DONE framed by lone CRs", in: sbCR(sbEvents(sbHello, sbStop, sbDone)), finishErr: errStoreDown, wantErr: errStoreDown,
			wantComplete: true, wantFinishes: 1, wantOut: sbCR(sbEvents(sbHello, sbStop)), wantNoDone: true},
		{name: "DONE without a blank line ends the reply", in: sbEvents(sbHello) + "data: [DONE]", wantComplete: true, wantFinishes: 1},
		// vLLM ends a generation that failed with an error event, then
		// [DONE]; the clients raise the error: the reply was cut short.
		{name: "an error event before DONE is a cut reply", in: sbEvents(sbRole, sbHello, sbErrEvent, sbDone), wantComplete: false, wantFinishes: 1},
		{name: "an error event (vLLM's older form) before DONE is a cut reply", in: sbEvents(sbRole, sbHello, sbErrObject, sbDone), wantComplete: false, wantFinishes: 1},
		{name: "an error event after finish_reason is a cut reply", in: sbEvents(sbHello, sbStop, sbErrEvent), wantComplete: false, wantFinishes: 1},
		{name: "an error event before DONE without a blank line", in: sbCR(sbEvents(sbHello, sbErrEvent)) + "data: [DONE]", wantComplete: false, wantFinishes: 1},
		{name: "finish error aborts before a DONE without a blank line", in: sbEvents(sbHello, sbStop) + "data: [DONE]\n", finishErr: errStoreDown, wantErr: errStoreDown,
			wantComplete: true, wantFinishes: 1, wantOut: sbEvents(sbHello, sbStop), wantNoDone: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := &sbReader{data: []byte(tc.in), sizes: []int{4, 9}, err: tc.srcErr}
			var read int
			f := &sbFinish{read: &read, err: tc.finishErr}
			r := &reply{}
			b := newStreamBody(src, false, r, sbNow, f.finish)
			var got []byte
			var err error
			if tc.closeAfter > 0 {
				buf := make([]byte, tc.closeAfter)
				n, rerr := io.ReadFull(b, buf)
				require.NoError(t, rerr)
				got = buf[:n]
				require.Equal(t, 0, f.calls, "nothing finished before Close")
				require.NoError(t, b.Close())
				require.NoError(t, b.Close(), "a second Close is harmless")
			} else {
				got, err = sbRelay(b, 6, &read)
				require.NoError(t, b.Close())
			}
			if tc.wantErr == nil {
				require.NoError(t, err)
			} else if !errors.Is(err, tc.wantErr) {
				t.Fatalf("got error %v, want %v", err, tc.wantErr)
			}
			want := tc.wantOut
			if want == "" {
				want = tc.in
			}
			if string(got) != want {
				t.Fatalf("got %q, want %q", got, want)
			}
			if tc.wantNoDone && bytes.Contains(got, []byte("[DONE]")) {
				t.Fatalf("got [DONE] in %q, want the stream cut before it", got)
			}
			if f.calls != tc.wantFinishes {
				t.Fatalf("got %d finish calls, want %d", f.calls, tc.wantFinishes)
			}
			if f.complete != tc.wantComplete {
				t.Fatalf("got complete %v, want %v", f.complete, tc.wantComplete)
			}
			if src.closed == 0 {
				t.Fatalf("got the upstream body left open, want it closed")
			}
			if tc.wantErr != nil {
				// The error sticks: a reader that keeps reading sees it again.
				n, err2 := b.Read(make([]byte, 8))
				if n != 0 || !errors.Is(err2, tc.wantErr) {
					t.Fatalf("got (%d, %v) on a read after the error, want (0, %v)", n, err2, tc.wantErr)
				}
			}
		})
	}
}

func TestReplyAssembly(t *testing.T) {
	cases := []struct {
		name        string
		chunks      []string
		wantContent string
		wantRefusal string
		wantCalls   string // JSON of toolCallsJSON; "" = none
		wantFinish  string
		wantFirst   bool
	}{
		{name: "content deltas", chunks: []string{sbRole, sbHello, sbWorld, sbStop}, wantContent: "Hello world", wantFinish: "stop", wantFirst: true},
		{name: "empty role delta is not a first token", chunks: []string{sbRole}},
		{name: "parallel tool calls", chunks: func() []string {
			var out []string
			for ev := range strings.SplitSeq(strings.TrimSuffix(sbToolCalls, "\n\n"), "\n\n") {
				if d := strings.TrimPrefix(ev, "data: "); d != "[DONE]" {
					out = append(out, d)
				}
			}
			return out
		}(),
			wantCalls: `[{"id":"call_a","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},` +
				`{"id":"call_b","type":"function","function":{"name":"get_time","arguments":"{\"tz\":\"Europe/Paris\"}"}}]`,
			wantFinish: "tool_calls", wantFirst: true},
		{name: "refusal", chunks: []string{`{"choices":[{"index":0,"delta":{"content":null,"refusal":"I can't"}}]}`, `{"choices":[{"index":0,"delta":{"refusal":" help."},"finish_reason":"stop"}]}`},
			wantRefusal: "I can't help.", wantFinish: "stop", wantFirst: true},
		{name: "other choices ignored (n>1)", chunks: []string{`{"choices":[{"index":1,"delta":{"content":"[choice 1] x"}}]}`, `{"choices":[{"index":0,"delta":{"content":"x"}}]}`,
			`{"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}`},
			wantContent: "x", wantFirst: true},
		{name: "odd tool-call indexes kept in order of appearance, no empty slots", chunks: []string{
			`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":-1,"id":"neg","function":{"name":"n"}}]}}]}`,
			`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":99999999,"id":"huge","function":{"name":"h"}}]}}]}`,
			`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"zero","function":{"name":"f","arguments":"{}"}}]}}]}`},
			wantCalls: `[{"id":"neg","type":"function","function":{"name":"n","arguments":""}},{"id":"huge","type":"function","function":{"name":"h","arguments":""}},{"id":"zero","type":"function","function":{"name":"f","arguments":"{}"}}]`,
			wantFirst: true},
		{name: "nulls everywhere", chunks: []string{`{"choices":null,"usage":null}`, `{"choices":[{"index":0,"delta":null,"finish_reason":null}]}`,
			`{"choices":[{"index":0,"delta":{"content":null,"tool_calls":null,"refusal":null}}]}`,
			`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":null,"type":null,"function":null}]}}]}`},
			wantCalls: `[{"id":"","type":"function","function":{"name":"","arguments":""}}]`, wantFirst: true},
		{name: "empty finish_reason ignored", chunks: []string{`{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}`, `{"choices":[{"index":0,"delta":{},"finish_reason":""}]}`},
			wantContent: "a", wantFinish: "stop", wantFirst: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := &reply{}
			for _, c := range tc.chunks {
				var ch chunk
				require.NoError(t, json.Unmarshal([]byte(c), &ch), c)
				r.add(&ch, sbNow())
			}
			require.Equal(t, tc.wantContent, r.Content.String())
			require.Equal(t, tc.wantRefusal, r.Refusal.String())
			require.Equal(t, tc.wantFinish, r.FinishReason)
			require.Equal(t, tc.wantFirst, !r.FirstToken.IsZero(), "first token time set")
			calls := r.toolCallsJSON()
			if tc.wantCalls == "" {
				require.Nil(t, calls)
				return
			}
			require.JSONEq(t, tc.wantCalls, string(calls))
		})
	}
}

// Gateways in front of Claude number streamed tool calls from 1 (after a
// text block). The reply must hold the calls that came, not an empty call
// at index 0 that no tool result can ever answer (which later makes
// arrange drop the whole assistant message and its results).
func TestToolCallIndexGap(t *testing.T) {
	r := &reply{}
	for _, c := range []string{
		`{"choices":[{"index":0,"delta":{"role":"assistant","content":"Let me check."}}]}`,
		`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"toolu_01","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}`,
		`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"city\":\"Paris\"}"}}]}}]}`,
		`{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}`,
	} {
		var ch chunk
		require.NoError(t, json.Unmarshal([]byte(c), &ch))
		r.add(&ch, sbNow())
	}
	want := `[{"id":"toolu_01","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]`
	if got := string(r.toolCallsJSON()); got != want {
		t.Fatalf("got tool calls %s, want %s", got, want)
	}
}

// sbGzip compresses events as an upstream that flushes its compressor after
// each one: the compressed stream, and the read sizes that hand out one
// flushed event (the last read also carries the gzip trailer).
func sbGzip(t *testing.T, events ...string) ([]byte, []int) {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	var sizes []int
	last := 0
	for _, ev := range events {
		_, err := zw.Write([]byte(ev))
		require.NoError(t, err)
		require.NoError(t, zw.Flush())
		sizes = append(sizes, buf.Len()-last)
		last = buf.Len()
	}
	require.NoError(t, zw.Close())
	sizes[len(sizes)-1] += buf.Len() - last
	return buf.Bytes(), sizes
}

func gunzip(t *testing.T, b []byte) string {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	require.NoError(t, err)
	out, _ := io.ReadAll(zr) // a stream cut short ends in ErrUnexpectedEOF
	return string(out)
}

// TestGzipStreamBody: a stream gzipped despite identity is relayed read by
// read, unchanged, and read on the side: the reply is assembled and the
// turn recorded before the read that carries [DONE] is handed on.
func TestGzipStreamBody(t *testing.T) {
	events := []string{"data: " + sbRole + "\n\n", "data: " + sbHello + "\n\n", "data: " + sbWorld + "\n\n", "data: " + sbStop + "\n\n", "data: [DONE]\n\n"}
	zipped, sizes := sbGzip(t, events...)
	doneAt := len(zipped) - sizes[len(sizes)-1]

	t.Run("relayed and recorded before [DONE]", func(t *testing.T) {
		src := &sbReader{data: bytes.Clone(zipped), sizes: sizes}
		var read int
		f := &sbFinish{read: &read}
		r := &reply{}
		b := newGzipStreamBody(src, r, sbNow, f.finish)
		got, err := sbRelay(b, 32<<10, &read)
		require.NoError(t, err)
		require.Equal(t, zipped, got, "the client gets the upstream's bytes")
		require.Equal(t, 1, f.calls)
		require.True(t, f.complete)
		require.LessOrEqual(t, f.readAt, doneAt, "recorded before the read with [DONE] was handed on")
		require.Equal(t, "Hello world", r.Content.String())
		require.Equal(t, "stop", r.FinishReason)
		require.NoError(t, b.Close())
		require.Equal(t, 1, f.calls)
	})

	t.Run("a failed record withholds [DONE]", func(t *testing.T) {
		errStoreDown := errors.New("store down")
		src := &sbReader{data: bytes.Clone(zipped), sizes: sizes}
		var read int
		f := &sbFinish{read: &read, err: errStoreDown}
		b := newGzipStreamBody(src, &reply{}, sbNow, f.finish)
		got, err := sbRelay(b, 32<<10, &read)
		require.ErrorIs(t, err, errStoreDown)
		plain := gunzip(t, got)
		require.Contains(t, plain, "Hello")
		require.NotContains(t, plain, "[DONE]")
		require.NoError(t, b.Close())
	})

	t.Run("the client goes away", func(t *testing.T) {
		src := &sbReader{data: bytes.Clone(zipped), sizes: sizes}
		var read int
		f := &sbFinish{read: &read}
		r := &reply{}
		b := newGzipStreamBody(src, r, sbNow, f.finish)
		buf := make([]byte, sizes[0]+sizes[1])
		_, err := io.ReadFull(b, buf)
		require.NoError(t, err)
		require.NoError(t, b.Close())
		require.Equal(t, 1, f.calls)
		require.False(t, f.complete)
		require.Equal(t, "Hello", r.Content.String(), "what was decoded is recorded")
		require.Equal(t, 1, src.closed)
	})

	t.Run("an error event before [DONE] is a cut reply", func(t *testing.T) {
		zipped, sizes := sbGzip(t, "data: "+sbHello+"\n\n", "data: "+sbErrEvent+"\n\n", "data: [DONE]\n\n")
		src := &sbReader{data: zipped, sizes: sizes}
		var read int
		f := &sbFinish{read: &read}
		r := &reply{}
		b := newGzipStreamBody(src, r, sbNow, f.finish)
		_, err := sbRelay(b, 32<<10, &read)
		require.NoError(t, err)
		require.NoError(t, b.Close())
		require.Equal(t, 1, f.calls)
		require.False(t, f.complete)
		require.Equal(t, "Hello", r.Content.String())
	})

	t.Run("not gzip after all", func(t *testing.T) {
		in := []byte(sbEvents(sbHello, sbDone))
		src := &sbReader{data: bytes.Clone(in), sizes: []int{7}}
		var read int
		f := &sbFinish{read: &read}
		b := newGzipStreamBody(src, &reply{}, sbNow, f.finish)
		got, err := sbRelay(b, 32<<10, &read)
		require.NoError(t, err)
		require.Equal(t, in, got, "relayed unchanged")
		require.Equal(t, 1, f.calls)
		require.False(t, f.complete, "nothing could be read")
		require.NoError(t, b.Close())
	})
}

// TestOpaqueStreamBody: a stream in an encoding the proxy cannot read is
// relayed unchanged and the turn recorded, without the reply, at its end;
// a failed record ends the stream with the error.
func TestOpaqueStreamBody(t *testing.T) {
	in := []byte("\x28\xb5\x2f\xfd not really zstd")
	for _, finishErr := range []error{nil, errors.New("store down")} {
		src := &sbReader{data: bytes.Clone(in), sizes: []int{5}}
		var read int
		f := &sbFinish{read: &read, err: finishErr}
		b := &opaqueStreamBody{src: src, finish: f.finish}
		got, err := sbRelay(b, 8, &read)
		require.ErrorIs(t, err, finishErr)
		require.Equal(t, in, got)
		require.Equal(t, 1, f.calls)
		require.False(t, f.complete)
		require.NoError(t, b.Close())
		require.Equal(t, 1, f.calls, "Close after the end does not record again")
		require.Equal(t, 1, src.closed)
	}
}

// TestStreamErrorEventStoredIncomplete: an upstream whose generation fails
// part way sends an error event, then [DONE] (vLLM). The client's SDK
// raises the error, so the turn is stored as cut short, not as a complete
// exchange.
func TestStreamErrorEventStoredIncomplete(t *testing.T) {
	h := newHarness(t)
	sse := sbEvents(sbRole, sbHello, sbErrEvent, sbDone)
	h.up.Enqueue(fakeai.Reply{Raw: []byte(sse), Header: http.Header{"Content-Type": {"text/event-stream"}}})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o-mini","stream":true,"messages":[`+user("hi")+`]}`, map[string]string{"X-Session-ID": "app:u:a"})
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, sse, string(body), "relayed as it came")
	msgs := h.stored(t, "app:u:a")
	require.Len(t, msgs, 2)
	require.Equal(t, "Hello", msgs[1].Content)
	require.Equal(t, history.StatusIncomplete, msgs[1].Status)
}

// Command floorproxy is the benchmark's floor: the least a history proxy
// can do. It is the bare hop (bareproxy) plus the two Redis round trips no
// history proxy can avoid: before forwarding, XREVRANGE of the newest
// -window entries of the session's stream; after the reply, XADD of the
// turn. It parses no JSON and injects nothing: the turn it records is the
// request's body and the reply's bytes as they came. Like historyproxy, it
// stores the turn before the client sees the end of the reply: a whole
// reply is read and recorded before its first byte is relayed, and a
// stream is recorded before its `data: [DONE]` event is relayed.
//
// The session is the X-Session-ID header; the stream is
// <prefix>:{<session>}. The response carries X-History-Messages, the number
// of entries read, so that the load generator can check the window was
// there.
//
//	floorproxy -listen 127.0.0.1:0 -upstream http://127.0.0.1:8081 -redis-url redis://127.0.0.1:6379/0
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/bench/internal/serve"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

// DefaultPrefix is the default key prefix of the floor's streams.
const DefaultPrefix = "floor"

// writeTimeout bounds the XADD of a turn, which runs even when the client
// has gone (as historyproxy's write does).
const writeTimeout = 2 * time.Second

func main() {
	fs := flag.NewFlagSet("floorproxy", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	upstream := fs.String("upstream", "", "upstream base URL (scheme and host; the path is kept from the request)")
	redisURL := fs.String("redis-url", "", "Redis URL")
	prefix := fs.String("prefix", DefaultPrefix, "key prefix of the sessions' streams")
	window := fs.Int64("window", benchfix.HistoryLen, "entries read before forwarding")
	_ = fs.Parse(os.Args[1:])
	if err := run(*listen, *upstream, *redisURL, *prefix, *window); err != nil {
		fmt.Fprintln(os.Stderr, "floorproxy:", err)
		os.Exit(1)
	}
}

func run(listen, upstream, redisURL, prefix string, window int64) error {
	up, err := url.Parse(upstream)
	if err != nil || up.Host == "" {
		return fmt.Errorf("-upstream %q: want an absolute URL (%v)", upstream, err)
	}
	opts, err := redis.ParseURL(redisURL)
	if err != nil {
		return fmt.Errorf("-redis-url: %w", err)
	}
	rdb := redis.NewClient(opts)
	defer rdb.Close()
	return serve.Run(listen, newFloor(up, rdb, prefix, window), os.Stdout)
}

// floor is the handler. Reply buffers are pooled, as a careful proxy's
// would be, so that the floor is not raised by garbage the task does not
// need. (A request's body is not: the transport may still be reading it
// after a failed round trip returns.)
type floor struct {
	rp     *httputil.ReverseProxy
	rdb    *redis.Client
	prefix string
	window int64
	bufs   sync.Pool // *bytes.Buffer, for replies
}

// turnKey carries a request's *turn from ServeHTTP to ModifyResponse (the
// outbound request's context derives from the inbound one).
type turnKey struct{}

// turn is what one request records.
type turn struct {
	stream  string
	request *bytes.Buffer // the request's body
	reply   *bytes.Buffer // the reply's bytes, as relayed
}

func newFloor(up *url.URL, rdb *redis.Client, prefix string, window int64) *floor {
	f := &floor{rdb: rdb, prefix: prefix, window: window}
	f.bufs.New = func() any { return new(bytes.Buffer) }
	f.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host, pr.Out.Host = up.Scheme, up.Host, up.Host
		},
		Transport:      benchfix.Transport(),
		ModifyResponse: f.modifyResponse,
	}
	return f
}

func (f *floor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// As in bareproxy (benchfix.Bare): a streamed reply through a
	// ReverseProxy is otherwise now and then cut (golang/go#40747).
	_ = http.NewResponseController(w).EnableFullDuplex()
	session := r.Header.Get("X-Session-ID")
	if session == "" {
		http.Error(w, "floorproxy: X-Session-ID is required", http.StatusBadRequest)
		return
	}
	t := &turn{stream: f.prefix + ":{" + session + "}", request: new(bytes.Buffer), reply: f.buffer()}
	// ReverseProxy has closed the reply's body when ServeHTTP returns.
	defer f.bufs.Put(t.reply)

	// The first round trip: the window, before forwarding.
	entries, err := f.rdb.XRevRangeN(r.Context(), t.stream, "+", "-", f.window).Result()
	if err != nil {
		http.Error(w, "floorproxy: read window: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	// The body is read whole, as a history proxy must to record it, and
	// forwarded from memory.
	if _, err := t.request.ReadFrom(r.Body); err != nil {
		http.Error(w, "floorproxy: read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(t.request.Bytes()))
	r.ContentLength = int64(t.request.Len())
	w.Header().Set("X-History-Messages", strconv.Itoa(len(entries)))
	f.rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), turnKey{}, t)))
}

func (f *floor) buffer() *bytes.Buffer {
	b := f.bufs.Get().(*bytes.Buffer)
	b.Reset()
	return b
}

// modifyResponse records a successful reply's turn: a whole reply at once,
// before any of it is relayed; a stream when its [DONE] event arrives.
func (f *floor) modifyResponse(resp *http.Response) error {
	t, _ := resp.Request.Context().Value(turnKey{}).(*turn)
	if t == nil || resp.StatusCode != http.StatusOK {
		return nil
	}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		resp.Body = &recordingBody{ReadCloser: resp.Body, turn: t, record: f.record}
		return nil
	}
	if _, err := t.reply.ReadFrom(resp.Body); err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	resp.Body.Close()
	if err := f.record(resp.Request.Context(), t); err != nil {
		return err
	}
	resp.Body = io.NopCloser(bytes.NewReader(t.reply.Bytes()))
	return nil
}

// record is the second round trip: the turn, appended to the session's
// stream. It outlives a client that has gone, as an acknowledged turn must.
func (f *floor) record(ctx context.Context, t *turn) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), writeTimeout)
	defer cancel()
	err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: t.stream, Values: []any{
		"request", t.request.Bytes(), "reply", t.reply.Bytes(),
	}}).Err()
	if err != nil {
		return fmt.Errorf("record turn: %w", err)
	}
	return nil
}

// done is the event that ends an OpenAI stream.
var done = []byte("data: [DONE]")

// recordingBody relays a stream's bytes unchanged, keeps a copy, and
// records the turn before it hands on the read that holds [DONE] (or, for
// a stream that ends without one, its end). A stream the client leaves is
// recorded as far as it came when the proxy closes it.
type recordingBody struct {
	io.ReadCloser
	turn     *turn
	record   func(context.Context, *turn) error
	recorded bool
}

func (b *recordingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if b.recorded {
		return n, err
	}
	// [DONE] may straddle two reads: look back over its length.
	from := max(0, b.turn.reply.Len()-len(done))
	b.turn.reply.Write(p[:n])
	if bytes.Contains(b.turn.reply.Bytes()[from:], done) || errors.Is(err, io.EOF) {
		b.recorded = true
		if rerr := b.record(context.Background(), b.turn); rerr != nil {
			return 0, rerr
		}
	}
	return n, err
}

func (b *recordingBody) Close() error {
	if !b.recorded {
		b.recorded = true
		_ = b.record(context.Background(), b.turn)
	}
	return b.ReadCloser.Close()
}

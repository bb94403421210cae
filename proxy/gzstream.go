package proxy

import (
	"compress/gzip"
	"io"
	"sync"
	"time"
)

// gzipStreamBody relays an SSE stream that the upstream gzipped although
// the proxy asked for identity. Its bytes go to the client unchanged, each
// read as it arrives, since the client's own decoder frames the events. A
// decoder on the side reads the events into the reply, so the turn is
// still recorded.
//
// Each read is fed to the side decoder, and handed on only once the decoder
// has used it all up and waits for more. So when the upstream flushes its
// compressor after each event (it must, for the events to arrive at all),
// the turn is recorded before the bytes that carry [DONE] reach the client,
// and a failed record (fail_closed) withholds them. The usage chunk the
// proxy asked for cannot be cut out of compressed bytes: the client gets it.
type gzipStreamBody struct {
	src    io.ReadCloser
	finish func(complete bool) error
	once   sync.Once
	obs    *streamBody // frames the decoded bytes; what it would relay is discarded
	done   bool        // the decoder saw [DONE]

	feed   chan []byte   // compressed bytes for the decoder; closed at the end
	idle   chan struct{} // the decoder has used up what it was fed
	exited chan struct{} // closed when the decoder stops
	ready  bool          // the decoder waits on feed
	fed    bool          // feed is closed

	buf     []byte
	pending []byte // compressed bytes not yet handed to the client
	err     error
}

func newGzipStreamBody(src io.ReadCloser, r *reply, now func() time.Time, finish func(bool) error) *gzipStreamBody {
	g := &gzipStreamBody{
		src: src, finish: finish, buf: make([]byte, 32<<10),
		feed: make(chan []byte), idle: make(chan struct{}), exited: make(chan struct{}),
	}
	g.obs = newStreamBody(nil, false, r, now, func(bool) error {
		g.done = true // recorded by the relaying side, in order with the bytes
		return nil
	})
	go g.decode() // stops when feed is closed or the bytes are not gzip
	return g
}

// decode runs the side decoder: gzip, then SSE framing into the reply.
func (g *gzipStreamBody) decode() {
	defer close(g.exited)
	zr, err := gzip.NewReader(&feedReader{feed: g.feed, idle: g.idle})
	if err != nil {
		return
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := zr.Read(buf)
		g.obs.in = append(g.obs.in, buf[:n]...)
		_ = g.obs.frame() // its finish only notes [DONE]
		g.obs.out = g.obs.out[:0]
		if !g.done && g.obs.overBound() {
			// Too much to hold (a gzip bomb, an event that never ends):
			// stop reading; the relaying side goes on, and records what
			// was assembled as incomplete.
			g.obs.reply.Truncated = true
			g.obs.in = nil
			return
		}
		if err != nil {
			if err == io.EOF && g.obs.lastDone() {
				g.done = true
			}
			return
		}
	}
}

// feedReader hands the decoder the bytes it is fed; when it has used them
// all, it says so on idle before it waits for more.
type feedReader struct {
	feed <-chan []byte
	idle chan<- struct{}
	buf  []byte
}

func (f *feedReader) Read(p []byte) (int, error) {
	for len(f.buf) == 0 {
		f.idle <- struct{}{}
		b, ok := <-f.feed
		if !ok {
			return 0, io.EOF
		}
		f.buf = b
	}
	n := copy(p, f.buf)
	f.buf = f.buf[n:]
	return n, nil
}

// wait waits until the decoder has used up what it was fed (true), or has
// stopped (false).
func (g *gzipStreamBody) wait() bool {
	select {
	case <-g.idle:
		return true
	case <-g.exited:
		return false
	}
}

// push feeds b to the decoder and waits until it is used up.
func (g *gzipStreamBody) push(b []byte) {
	if g.fed {
		return
	}
	if !g.ready && !g.wait() {
		g.fed = true
		return
	}
	select {
	case g.feed <- b:
		g.ready = g.wait()
	case <-g.exited:
		g.ready = false
	}
	if !g.ready {
		g.fed = true
	}
}

// stop ends the decoder and waits until it has read everything.
func (g *gzipStreamBody) stop() {
	if !g.fed {
		g.fed = true
		close(g.feed)
	}
	for g.wait() {
	}
}

func (g *gzipStreamBody) Read(p []byte) (int, error) {
	for len(g.pending) == 0 {
		if g.err != nil {
			return 0, g.err
		}
		n, err := g.src.Read(g.buf)
		g.pending = g.buf[:n]
		if n > 0 {
			g.push(g.pending)
		}
		if err != nil {
			g.stop()
		}
		if g.done {
			if ferr := g.end(true); ferr != nil {
				g.pending, g.err = nil, ferr // withhold [DONE]
				continue
			}
		}
		if err != nil {
			complete := g.done || (err == io.EOF && g.obs.reply.FinishReason != "")
			if ferr := g.end(complete); ferr != nil {
				err = ferr
			}
			g.err = err
		}
	}
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
}

func (g *gzipStreamBody) end(complete bool) error {
	var err error
	g.once.Do(func() { err = g.finish(complete && !g.obs.reply.Failed) })
	return err
}

// Close ends the stream; when the client went away before the end, what
// was decoded is recorded as incomplete.
func (g *gzipStreamBody) Close() error {
	g.stop()
	_ = g.end(false)
	return g.src.Close()
}

// opaqueStreamBody relays a stream in an encoding the proxy cannot read,
// unchanged. The turn is recorded without the reply when the stream ends.
type opaqueStreamBody struct {
	src    io.ReadCloser
	finish func(complete bool) error
	once   sync.Once
}

func (o *opaqueStreamBody) Read(p []byte) (int, error) {
	n, err := o.src.Read(p)
	if err != nil {
		if ferr := o.end(); ferr != nil {
			err = ferr
		}
	}
	return n, err
}

func (o *opaqueStreamBody) end() error {
	var err error
	o.once.Do(func() { err = o.finish(false) })
	return err
}

func (o *opaqueStreamBody) Close() error {
	_ = o.end()
	return o.src.Close()
}

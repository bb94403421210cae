package proxy

import (
	"errors"
	"io"
	"time"
)

// errUpstreamStalled is the cause of an upstream call cut because its
// reply fell silent (Options.UpstreamIdleTimeout).
var errUpstreamStalled = errors.New("the upstream sent nothing for stream_idle_timeout")

// idleBody is an upstream reply's body whose silence is bounded: a Read
// that waits d without a byte calls cut, which cancels the upstream call,
// so the Read fails and the reply ends as a cut one does (a stream is
// recorded incomplete). Only the time spent waiting in Read counts: a
// reply held up by a slow client is not the upstream's silence (that one
// is bounded by the client's write timeout).
type idleBody struct {
	io.ReadCloser
	d time.Duration
	t *time.Timer
}

func newIdleBody(rc io.ReadCloser, d time.Duration, cut func()) *idleBody {
	t := time.AfterFunc(d, cut)
	t.Stop()
	return &idleBody{ReadCloser: rc, d: d, t: t}
}

func (b *idleBody) Read(p []byte) (int, error) {
	b.t.Reset(b.d)
	n, err := b.ReadCloser.Read(p)
	b.t.Stop()
	return n, err
}

func (b *idleBody) Close() error {
	b.t.Stop()
	return b.ReadCloser.Close()
}

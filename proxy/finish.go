package proxy

import (
	"context"
	"io"
	"net/http"
	"sync"
)

// What a streamed reply does when its client goes away
// (Agent.OnClientDisconnect).
const (
	DisconnectCancel = "cancel"
	DisconnectFinish = "finish"
)

// finishes reports whether a request's reply outlives its client: the
// agent says finish, and there is a turn to record.
func (x *exchange) finishes() bool {
	return x.record && x.agent.OnClientDisconnect == DisconnectFinish
}

// detach gives a request whose reply outlives its client a context of its
// own for the upstream call: the client's going away does not cancel it,
// Cut does (a drain that runs out of time). The returned function ends it.
func (p *Proxy) detach(r *http.Request) (*http.Request, func()) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	stop := context.AfterFunc(p.cut, cancel)
	return r.WithContext(ctx), func() { stop(); cancel() }
}

// Cut ends the replies that outlive their clients (on_client_disconnect:
// finish): call it when a drain runs out of time, as the server's own
// handlers are cut. A cut reply is recorded as incomplete.
func (p *Proxy) Cut() { p.cutReplies() }

// finishBody is a streamed reply that outlives its client. When the
// reverse proxy closes it before its end (the client went away, a write
// failed), it stays open: the handler then reads it to its end (finish),
// so the turn is recorded complete and its deltas reach the watchers.
type finishBody struct {
	io.ReadCloser
	mu       sync.Mutex
	ended    bool // a read returned an error (io.EOF included)
	detached bool // closed before its end
}

func (b *finishBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.mu.Lock()
		b.ended = true
		b.mu.Unlock()
	}
	return n, err
}

func (b *finishBody) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.ended {
		b.detached = true
		return nil
	}
	return b.ReadCloser.Close()
}

// finish reads a detached reply to its end, recording its turn as the
// stream's own end does, then closes it. It returns at once for a reply
// that was not detached.
func (b *finishBody) finish() bool {
	if b == nil {
		return false
	}
	b.mu.Lock()
	detached := b.detached
	b.mu.Unlock()
	if !detached {
		return false
	}
	_, _ = io.Copy(io.Discard, b.ReadCloser)
	_ = b.ReadCloser.Close()
	return true
}

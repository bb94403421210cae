package proxy

import (
	"errors"
	"net/http"
	"os"
	"time"
)

// stallBound bounds how long a client that stopped reading can hold a
// response: each write to the client may wait at most ClientWriteTimeout.
// The deadline is renewed before every write and flush, so a stream that
// is being read, however long, is never cut. (Server.WriteTimeout bounds
// the whole response instead, which would cut long streams.)
//
// The request body's own bound is the server's ReadTimeout: the server
// lifts that deadline once the body is read, before the response.
func (p *Proxy) stallBound(next http.Handler) http.Handler {
	return WriteDeadlines(p.opt.ClientWriteTimeout, next)
}

// WriteDeadlines bounds each write of next's responses to wt (see
// stallBound): the admin listener's routes are served with it too, so that
// its long-lived watch streams are bounded per write, never as a whole.
// wt 0 or less: no bound.
func WriteDeadlines(wt time.Duration, next http.Handler) http.Handler {
	if wt <= 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "" {
			// A protocol switch hijacks the connection: a deadline set
			// here would cut it later.
			next.ServeHTTP(w, r)
			return
		}
		rc := http.NewResponseController(w)
		// The server writes what is still buffered once the handler
		// returns: bound that too (it clears the deadline afterwards).
		defer func() { _ = rc.SetWriteDeadline(time.Now().Add(wt)) }()
		next.ServeHTTP(&stallWriter{ResponseWriter: w, rc: rc, d: wt}, r)
	})
}

// stallWriter renews the write deadline before each write and flush: a
// client reading slowly is fine, one that stopped reading fails the write
// after d, which ends the response (a stream is then recorded as cut).
type stallWriter struct {
	http.ResponseWriter
	rc *http.ResponseController
	d  time.Duration
}

func (w *stallWriter) Write(b []byte) (int, error) {
	_ = w.rc.SetWriteDeadline(time.Now().Add(w.d))
	return w.ResponseWriter.Write(b)
}

func (w *stallWriter) FlushError() error {
	_ = w.rc.SetWriteDeadline(time.Now().Add(w.d))
	return w.rc.Flush()
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (w *stallWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// isTimeout reports whether err is a connection deadline passing (the
// request body did not arrive within the server's ReadTimeout).
func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}

package proxy

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"sync/atomic"
)

// inflight bounds the bytes of chat request bodies the proxy holds at once
// (Options.MaxInflightBytes). A chat body is held whole while the request
// runs, and the work on it (parsing, the rewritten body, the turn) costs a
// small multiple of it, so this bounds the memory of the chat path.
type inflight struct {
	max  int64 // 0: no bound
	used atomic.Int64
}

// reserve takes n bytes; false when that would pass the bound.
func (f *inflight) reserve(n int64) bool {
	if f.max <= 0 {
		return true
	}
	if f.used.Add(n) > f.max {
		f.used.Add(-n)
		return false
	}
	return true
}

func (f *inflight) release(n int64) {
	if f.max > 0 && n > 0 {
		f.used.Add(-n)
	}
}

// errBusy: the body would pass MaxInflightBytes.
var errBusy = errors.New("too many request bytes in flight")

// readBody reads a chat request's body, at most MaxBodyBytes, holding its
// size against MaxInflightBytes until release is called. A body of known
// length is reserved before it is read, and read into one buffer of that
// size; one of unknown length is reserved as it arrives.
func (p *Proxy) readBody(w http.ResponseWriter, r *http.Request) (body []byte, release func(), err error) {
	var held int64
	release = func() { p.inflight.release(held) }
	size := r.ContentLength
	var src io.Reader = http.MaxBytesReader(w, r.Body, p.opt.MaxBodyBytes)
	switch {
	case size > p.opt.MaxBodyBytes:
		// Too large anyway: the read says so (413) without a reservation.
		size = -1
	case size >= 0:
		if !p.inflight.reserve(size) {
			return nil, release, errBusy
		}
		held = size
	default:
		src = &reservingReader{r: src, f: &p.inflight, held: &held}
	}
	buf := bytes.NewBuffer(make([]byte, 0, max(size, 0)+bytes.MinRead))
	_, err = buf.ReadFrom(src)
	return buf.Bytes(), release, err
}

// reservingReader reserves what it reads.
type reservingReader struct {
	r    io.Reader
	f    *inflight
	held *int64
}

func (rr *reservingReader) Read(b []byte) (int, error) {
	n, err := rr.r.Read(b)
	if n > 0 {
		if !rr.f.reserve(int64(n)) {
			return n, errBusy
		}
		*rr.held += int64(n)
	}
	return n, err
}

func busy() *apiError {
	return &apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "overloaded",
		Message: "the proxy holds too many request bytes at once; retry shortly"}
}

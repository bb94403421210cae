package proxy

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"unicode/utf8"
)

// chatPath is the one path whose requests get history.
const chatPath = "/v1/chat/completions"

// canonicalPath checks a request's escaped path and returns its one
// canonical form, decoded and escaped, segment for segment alike.
//
// The proxy routes on the decoded path while the upstream, or a gateway in
// front of it, may decode again, treat a backslash as a slash or drop a
// ";param" suffix: a path read one way here and another way there would
// reach the upstream outside its base path, or a chat completion around
// the chat handler, with the proxy's key. So a segment that some reading
// could split or climb out of is refused: an encoded slash or backslash,
// an encoded dot segment (once or twice), a semicolon, a control character
// or invalid UTF-8. What every reader agrees on is resolved: literal "."
// and ".." segments as RFC 3986 removes them, and empty segments (a
// doubled or trailing slash) dropped, as routers commonly do.
func canonicalPath(escaped string) (dec, esc string, err *apiError) {
	if !strings.HasPrefix(escaped, "/") {
		return "", "", invalidPath(escaped)
	}
	var decs, escs []string
	for _, seg := range strings.Split(escaped[1:], "/") {
		switch seg {
		case "", ".":
			continue
		case "..":
			if n := len(decs); n > 0 {
				decs, escs = decs[:n-1], escs[:n-1]
			}
			continue
		}
		s, uerr := url.PathUnescape(seg)
		if uerr != nil || !plainSegment(s) {
			return "", "", invalidPath(escaped)
		}
		if strings.Contains(s, "%") {
			// A server that decodes twice reads %252e%252e as "..".
			if s2, uerr := url.PathUnescape(s); uerr == nil && !plainSegment(s2) {
				return "", "", invalidPath(escaped)
			}
		}
		decs, escs = append(decs, s), append(escs, seg)
	}
	return "/" + strings.Join(decs, "/"), "/" + strings.Join(escs, "/"), nil
}

// plainSegment reports whether a decoded path segment means the same to
// every router: not a dot segment, and no byte that some servers read as a
// separator or a parameter.
func plainSegment(s string) bool {
	if s == "." || s == ".." || !utf8.ValidString(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '/', c == '\\', c == ';', c < 0x20, c == 0x7f:
			return false
		}
	}
	return true
}

func invalidPath(p string) *apiError {
	return badRequest("invalid_path", "",
		"the request path "+quote(p)+" has no canonical form: encoded slashes, backslashes, encoded dot segments, semicolons and control characters are refused")
}

// endpoints is the allow-list of calls forwarded upstream. A nil
// *endpoints allows every call.
type endpoints struct {
	mux *http.ServeMux
}

// allowed marks the patterns of the allow-list; comparing a handler with it
// tells a match from the mux's not-found, 405 and redirect handlers.
var allowed = new(allowMark)

type allowMark struct{}

func (*allowMark) ServeHTTP(http.ResponseWriter, *http.Request) {}

// newEndpoints compiles ServeMux patterns; none, or a "*" entry, allow
// everything.
func newEndpoints(patterns []string) (*endpoints, error) {
	if len(patterns) == 0 {
		return nil, nil
	}
	e := &endpoints{mux: http.NewServeMux()}
	for _, p := range patterns {
		if p == "*" {
			return nil, nil
		}
		if err := handle(e.mux, p); err != nil {
			return nil, fmt.Errorf("passthrough pattern %q: %w", p, err)
		}
	}
	return e, nil
}

// handle registers pattern, turning ServeMux's panic on a bad one into an
// error.
func handle(mux *http.ServeMux, pattern string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	mux.Handle(pattern, allowed)
	return nil
}

// allows reports whether r, whose URL holds the canonical client path, may
// be forwarded.
func (e *endpoints) allows(r *http.Request) bool {
	if e == nil {
		return true
	}
	h, _ := e.mux.Handler(r)
	return h == allowed
}

func notAllowed(method, p string) *apiError {
	return &apiError{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "endpoint_not_allowed",
		Message: method + " " + quote(p) + " is not among the calls this proxy forwards (upstream.passthrough)"}
}

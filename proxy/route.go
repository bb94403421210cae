package proxy

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"unicode"
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
// an encoded dot segment (however many times encoded), a semicolon, a
// control character, invalid UTF-8, a character that Unicode
// normalisation (NFKC) turns into one of these, and a trailing dot or space
// (Windows drops them: "..." and ".. " read as ".."). What every reader
// agrees on is resolved: literal "."
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
		// A server that decodes twice reads %252e%252e as "..", a chain
		// of them decoding thrice %25252e%25252e: decode until nothing
		// changes (each round shortens the segment).
		for d := s; strings.Contains(d, "%"); {
			d2, uerr := url.PathUnescape(d)
			if uerr != nil || d2 == d {
				break
			}
			if !plainSegment(d2) {
				return "", "", invalidPath(escaped)
			}
			d = d2
		}
		decs, escs = append(decs, s), append(escs, seg)
	}
	return "/" + strings.Join(decs, "/"), "/" + strings.Join(escs, "/"), nil
}

// plainSegment reports whether a decoded path segment means the same to
// every router: not a dot segment, not ending in a dot or space (which
// Windows drops), and no byte that some servers read as a separator or a
// parameter, nor a character that NFKC normalises into one.
func plainSegment(s string) bool {
	if s == "" || s[len(s)-1] == '.' || s[len(s)-1] == ' ' || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		switch {
		case r == '/', r == '\\', r == ';', r < 0x20, r == 0x7f:
			return false
		case r >= utf8.RuneSelf && unicode.Is(nfkcSeparators, r):
			return false
		}
	}
	return true
}

// nfkcSeparators are the characters whose NFKC normalisation contains ".",
// "/", "\\", ";" or "%" (Unicode 14: "．" U+FF0E is ".", "‥" U+2025 is
// "..", "／" U+FF0F is "/", "％" U+FF05 is "%"). A server that normalises
// a path reads them as dot segments, separators or escapes.
var nfkcSeparators = &unicode.RangeTable{
	R16: []unicode.Range16{
		{Lo: 0x037e, Hi: 0x037e, Stride: 1},
		{Lo: 0x2024, Hi: 0x2026, Stride: 1},
		{Lo: 0x2100, Hi: 0x2101, Stride: 1},
		{Lo: 0x2105, Hi: 0x2106, Stride: 1},
		{Lo: 0x2488, Hi: 0x249b, Stride: 1},
		{Lo: 0x33c2, Hi: 0x33c7, Stride: 5},
		{Lo: 0x33d8, Hi: 0x33d8, Stride: 1},
		{Lo: 0xfe14, Hi: 0xfe19, Stride: 5},
		{Lo: 0xfe30, Hi: 0xfe30, Stride: 1},
		{Lo: 0xfe52, Hi: 0xfe54, Stride: 2},
		{Lo: 0xfe68, Hi: 0xfe6a, Stride: 2},
		{Lo: 0xff05, Hi: 0xff05, Stride: 1},
		{Lo: 0xff0e, Hi: 0xff0f, Stride: 1},
		{Lo: 0xff1b, Hi: 0xff1b, Stride: 1},
		{Lo: 0xff3c, Hi: 0xff3c, Stride: 1},
	},
	R32: []unicode.Range32{
		{Lo: 0x1f100, Hi: 0x1f100, Stride: 1},
	},
}

func invalidPath(p string) *apiError {
	return badRequest("invalid_path", "",
		"the request path "+quote(p)+" has no canonical form: encoded slashes, backslashes, encoded dot segments, semicolons, control characters, their Unicode look-alikes and segments ending in a dot or space are refused")
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

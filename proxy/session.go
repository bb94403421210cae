package proxy

import (
	"net/http"
	"path"
	"strconv"
	"strings"

	"github.com/historyproxy/historyproxy/history"
)

// Session headers. They belong to the proxy and are never forwarded.
const (
	headerSessionID      = "X-Session-ID"
	headerSessionChannel = "X-Session-Channel"
	headerSessionUser    = "X-Session-User"
	headerSessionAgent   = "X-Session-Agent"
)

// sharedUser is the user part of a shared agent's conversation. '*' cannot
// appear in a real part, so it never collides with a user's own id.
const sharedUser = history.SharedUser

// Session is a resolved session: which conversation a request belongs to.
type Session struct {
	Channel, User, Agent string
}

// ID is the session id "channel:user:agent".
func (s Session) ID() string { return s.Channel + ":" + s.User + ":" + s.Agent }

// pathSession is a session taken from a /s/{channel}/{user}/{agent} prefix.
type pathSession struct {
	Channel, User, Agent string
	ok                   bool
}

// resolveSession applies the session rules. Each part (channel, user,
// agent) comes from the first source that names it, in this order:
// X-Session-ID (which names all three), the X-Session-{Channel,User,Agent}
// headers, the path prefix, then the body's user field (the user only);
// a part no source names comes from the defaults. So sources combine: a
// path prefix with X-Session-Agent keeps the path's channel and user. ok is
// false when no user was found (a stateless request).
func resolveSession(h http.Header, p pathSession, bodyUser, defChannel, defAgent string) (s Session, ok bool, err *apiError) {
	if v := h.Values(headerSessionID); len(v) > 0 {
		if len(v) > 1 {
			return s, false, invalidSession(headerSessionID, "X-Session-ID is given more than once")
		}
		parts := strings.Split(v[0], ":")
		if len(parts) != 3 {
			return s, false, invalidSession(headerSessionID, "X-Session-ID must be channel:user:agent, got "+quote(v[0]))
		}
		s = Session{parts[0], parts[1], parts[2]}
		if err := s.validate(headerSessionID); err != nil {
			return s, false, err
		}
		return s, true, nil
	}
	for _, part := range []struct {
		dst       *string
		header    string
		path, def string
		body      string // only the user part has one
	}{
		{&s.Channel, headerSessionChannel, p.Channel, defChannel, ""},
		{&s.User, headerSessionUser, p.User, "", bodyUser},
		{&s.Agent, headerSessionAgent, p.Agent, defAgent, ""},
	} {
		if v, set := single(h, part.header); set {
			if err := validatePart(part.header, part.header, v); err != nil {
				return s, false, err
			}
			*part.dst = v
			continue
		}
		switch {
		case p.ok: // parsePathSession validated its parts
			*part.dst = part.path
		case part.body != "":
			if err := validatePart(`the request's "user" field`, "user", part.body); err != nil {
				return s, false, err
			}
			*part.dst = part.body
		default:
			*part.dst = part.def
		}
	}
	return s, s.User != "", nil
}

// single returns the header's value and whether it was present. Repeated
// headers are joined so validation rejects them (the comma is not allowed).
func single(h http.Header, name string) (string, bool) {
	v := h.Values(name)
	if len(v) == 0 {
		return "", false
	}
	return strings.Join(v, ","), true
}

// parsePathSession splits "/s/{channel}/{user}/{agent}/rest" into the
// session and "/rest". ok is false when the path has no such prefix.
func parsePathSession(urlPath string) (p pathSession, rest string, err *apiError) {
	if !strings.HasPrefix(urlPath, "/s/") {
		return p, urlPath, nil
	}
	segs := strings.SplitN(urlPath[len("/s/"):], "/", 4)
	if len(segs) < 4 {
		return p, urlPath, invalidSession("", "path prefix must be /s/{channel}/{user}/{agent}/v1/..., got "+quote(urlPath))
	}
	p = pathSession{Channel: segs[0], User: segs[1], Agent: segs[2], ok: true}
	for _, c := range []struct{ name, val string }{{"path channel", p.Channel}, {"path user", p.User}, {"path agent", p.Agent}} {
		if err := validatePart(c.name, "", c.val); err != nil {
			return p, urlPath, err
		}
	}
	// Clean the rest, as ServeMux would, but here: its redirect to the
	// clean path would drop the session prefix. A base URL with a trailing
	// slash gives "//v1/...".
	rest = path.Clean("/" + segs[3])
	if strings.HasSuffix(segs[3], "/") && rest != "/" {
		rest += "/"
	}
	// The rest must be the API's own path: /s/web/erin/v1/... misses a
	// part, and a 404 for it would hide why.
	if rest != "/v1" && !strings.HasPrefix(rest, "/v1/") {
		return pathSession{}, urlPath, invalidSession("", "path prefix must be /s/{channel}/{user}/{agent}/v1/..., with all three parts, got "+quote(urlPath))
	}
	return p, rest, nil
}

func (s Session) validate(header string) *apiError {
	for _, v := range []string{s.Channel, s.User, s.Agent} {
		if err := validatePart(header, header, v); err != nil {
			return err
		}
	}
	return nil
}

// validatePart enforces history.CheckPart: the rules of a session id part
// are the store's, shared with the admin API. where names the source in
// the message; param is the error's param: the header or body field at
// fault, "" for the path, which is no field.
func validatePart(where, param, v string) *apiError {
	if err := history.CheckPart(v); err != nil {
		return invalidSession(param, where+": "+err.Error())
	}
	return nil
}

func invalidSession(param, msg string) *apiError {
	return badRequest("invalid_session_id", param, msg)
}

// quote shows a value in an error, bounded so a huge header cannot bloat it.
func quote(v string) string {
	if len(v) > 64 {
		return strconv.Quote(v[:64]) + "..."
	}
	return strconv.Quote(v)
}

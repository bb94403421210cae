package proxy

import (
	"net/http"
	"strings"
	"testing"
)

func TestResolveSession(t *testing.T) {
	long := strings.Repeat("a", 129)
	cases := []struct {
		name     string
		headers  map[string]string
		path     string
		bodyUser string
		want     string // resolved id, "" when stateless
		wantCode string // error code, "" when none
		wantPath string
	}{
		{name: "session id header", headers: map[string]string{"X-Session-ID": "chat:john@example.com:support"}, want: "chat:john@example.com:support"},
		{name: "id header beats parts and body", headers: map[string]string{"X-Session-ID": "a:b:c", "X-Session-User": "x"}, bodyUser: "y", want: "a:b:c"},
		{name: "parts headers with defaults", headers: map[string]string{"X-Session-User": "u1"}, want: "api:u1:default"},
		{name: "all part headers", headers: map[string]string{"X-Session-Channel": "web", "X-Session-User": "u1", "X-Session-Agent": "sales"}, want: "web:u1:sales"},
		{name: "part headers without user fall back to body user", headers: map[string]string{"X-Session-Agent": "sales"}, bodyUser: "bob", want: "api:bob:sales"},
		// Each part from the first source that names it: every pair of
		// sources, in the README's order (X-Session-ID, part headers, path
		// prefix, body user).
		{name: "id beats path", headers: map[string]string{"X-Session-ID": "a:b:c"}, path: "/s/web/p/sales/v1/chat/completions", want: "a:b:c", wantPath: "/v1/chat/completions"},
		{name: "id names all three: no part header fills in", headers: map[string]string{"X-Session-ID": "a:b:c", "X-Session-Agent": "z", "X-Session-Channel": "y"}, want: "a:b:c"},
		{name: "id beats body user", headers: map[string]string{"X-Session-ID": "a:b:c"}, bodyUser: "y", want: "a:b:c"},
		{name: "user header with path keeps the path's channel and agent", headers: map[string]string{"X-Session-User": "frank"}, path: "/s/web/erin/sales/v1/chat/completions", want: "web:frank:sales", wantPath: "/v1/chat/completions"},
		{name: "agent header with path keeps the path's channel and user", headers: map[string]string{"X-Session-Agent": "billing"}, path: "/s/web/erin/sales/v1/chat/completions", want: "web:erin:billing", wantPath: "/v1/chat/completions"},
		{name: "channel header with path", headers: map[string]string{"X-Session-Channel": "app"}, path: "/s/web/erin/sales/v1/chat/completions", want: "app:erin:sales", wantPath: "/v1/chat/completions"},
		{name: "channel header with body user", headers: map[string]string{"X-Session-Channel": "web"}, bodyUser: "dave", want: "web:dave:default"},
		{name: "user header beats body user", headers: map[string]string{"X-Session-User": "h"}, bodyUser: "b", want: "api:h:default"},
		{name: "agent header, path and body user: the path's user", headers: map[string]string{"X-Session-Agent": "billing"}, path: "/s/web/erin/sales/v1/chat/completions", bodyUser: "b", want: "web:erin:billing", wantPath: "/v1/chat/completions"},
		{name: "path prefix", path: "/s/web/p@x.io/sales/v1/chat/completions", want: "web:p@x.io:sales", wantPath: "/v1/chat/completions"},
		{name: "path prefix beats body user", path: "/s/web/p/sales/v1/models", bodyUser: "b", want: "web:p:sales", wantPath: "/v1/models"},
		{name: "body user only", bodyUser: "user-42", want: "api:user-42:default"},
		{name: "unicode letters", bodyUser: "jürgen", want: "api:jürgen:default"},
		{name: "allowed punctuation", bodyUser: "a.b_c@d", want: "api:a.b_c@d:default"},
		{name: "plus and equals", bodyUser: "a+b=c-d", want: "api:a+b=c-d:default"},
		{name: "no user is stateless", headers: map[string]string{"X-Session-Channel": "web"}, want: ""},
		{name: "nothing at all", want: ""},
		// Every bad form.
		{name: "id with two parts", headers: map[string]string{"X-Session-ID": "a:b"}, wantCode: "invalid_session_id"},
		{name: "id with four parts", headers: map[string]string{"X-Session-ID": "a:b:c:d"}, wantCode: "invalid_session_id"},
		{name: "id with empty part", headers: map[string]string{"X-Session-ID": "a::c"}, wantCode: "invalid_session_id"},
		{name: "colon inside a part header", headers: map[string]string{"X-Session-User": "a:b"}, wantCode: "invalid_session_id"},
		{name: "space", headers: map[string]string{"X-Session-User": "a b"}, wantCode: "invalid_session_id"},
		{name: "tab control char", bodyUser: "a\tb", wantCode: "invalid_session_id"},
		{name: "nul control char", bodyUser: "a\x00b", wantCode: "invalid_session_id"},
		{name: "newline", bodyUser: "a\nb", wantCode: "invalid_session_id"},
		{name: "invalid utf8", headers: map[string]string{"X-Session-User": "a\xffb"}, wantCode: "invalid_session_id"},
		{name: "too long", headers: map[string]string{"X-Session-Agent": long, "X-Session-User": "u"}, wantCode: "invalid_session_id"},
		{name: "128 bytes is fine", headers: map[string]string{"X-Session-User": long[:128]}, want: "api:" + long[:128] + ":default"},
		{name: "empty part header", headers: map[string]string{"X-Session-User": ""}, wantCode: "invalid_session_id"},
		{name: "slash in body user", bodyUser: "a/b", wantCode: "invalid_session_id"},
		{name: "bad path part", path: "/s/web/a b/sales/v1/chat/completions", wantCode: "invalid_session_id"},
		{name: "short path prefix", path: "/s/web/u/v1", wantCode: "invalid_session_id"},
		{name: "path prefix missing a part", path: "/s/web/erin/v1/chat/completions", wantCode: "invalid_session_id"},
		{name: "path prefix with too many parts", path: "/s/web/erin/sales/x/v1/chat/completions", wantCode: "invalid_session_id"},
		{name: "path prefix, base URL with a trailing slash", path: "/s/web/erin/sales//v1/models", want: "web:erin:sales", wantPath: "/v1/models"},
		{name: "empty path part", path: "/s/web//sales/v1/chat/completions", wantCode: "invalid_session_id"},
		{name: "shared marker is not a valid user", bodyUser: "*", wantCode: "invalid_session_id"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			for k, v := range tc.headers {
				h.Set(k, v)
			}
			path := tc.path
			if path == "" {
				path = "/v1/chat/completions"
			}
			ps, rest, err := parsePathSession(path)
			var s Session
			var ok bool
			if err == nil {
				s, ok, err = resolveSession(h, ps, tc.bodyUser, "api", "default")
			}
			if tc.wantCode != "" {
				if err == nil {
					t.Fatalf("got session %q, want error %s", s.ID(), tc.wantCode)
				}
				if err.Code != tc.wantCode || err.Status != http.StatusBadRequest {
					t.Fatalf("got %d %s, want 400 %s", err.Status, err.Code, tc.wantCode)
				}
				return
			}
			if err != nil {
				t.Fatalf("got error %v, want %q", err, tc.want)
			}
			got := ""
			if ok {
				got = s.ID()
			}
			if got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			if tc.wantPath != "" && rest != tc.wantPath {
				t.Fatalf("got path %q, want %q", rest, tc.wantPath)
			}
		})
	}
}

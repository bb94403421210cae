package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// The tests of this file drive the whole program over HTTP against a
// gateway that serves the fake upstream under a base path, as a company
// gateway serves a tenant: http://gw/tenant-a/v1. The gateway records the
// path and headers of every request it receives, and answers any path
// outside the base itself, as an internal service behind it would.

const (
	tenantBase = "/tenant-a/v1"
	heldKey    = "sk-held-by-the-proxy"
)

// gateway is the recording gateway in front of the fake upstream.
type gateway struct {
	URL string // base URL including tenantBase
	up  *fakeai.Server

	mu   sync.Mutex
	reqs []gatewayRequest
}

type gatewayRequest struct {
	Method     string
	RequestURI string // as sent on the wire
	Path       string // decoded
	Header     http.Header
	Trailer    http.Header // request trailers, read after the body
}

func newGateway(t *testing.T) *gateway {
	t.Helper()
	g := &gateway{up: fakeai.New(t)}
	fake, err := url.Parse(g.up.URL)
	require.NoError(t, err)
	fwd := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.Out.URL.Scheme, pr.Out.URL.Host, pr.Out.Host = fake.Scheme, fake.Host, fake.Host
		pr.Out.URL.Path = strings.TrimPrefix(pr.In.URL.Path, "/tenant-a")
		pr.Out.URL.RawPath = strings.TrimPrefix(pr.In.URL.RawPath, "/tenant-a")
	}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The body is read first: trailers arrive after it.
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		g.mu.Lock()
		g.reqs = append(g.reqs, gatewayRequest{Method: r.Method, RequestURI: r.RequestURI, Path: r.URL.Path, Header: r.Header.Clone(), Trailer: r.Trailer.Clone()})
		g.mu.Unlock()
		r.Trailer = nil
		// Routed as many servers do: decoded and cleaned.
		if p := path.Clean(r.URL.Path); !strings.HasPrefix(p, tenantBase+"/") && p != tenantBase {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"internal":%q}`, p)
			return
		}
		fwd.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	g.URL = srv.URL + tenantBase
	return g
}

func (g *gateway) requests() []gatewayRequest {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]gatewayRequest(nil), g.reqs...)
}

// last is the last request the gateway received.
func (g *gateway) last(t *testing.T) gatewayRequest {
	t.Helper()
	reqs := g.requests()
	require.NotEmpty(t, reqs, "the gateway received nothing")
	return reqs[len(reqs)-1]
}

// requireUnderBase checks that nothing the gateway received left the base
// path, however a server along the way reads it.
func (g *gateway) requireUnderBase(t *testing.T) {
	t.Helper()
	for _, r := range g.requests() {
		p := path.Clean(r.Path)
		require.True(t, p == tenantBase || strings.HasPrefix(p, tenantBase+"/"), "the gateway got %s %s (%s), outside %s", r.Method, r.RequestURI, p, tenantBase)
		require.Equal(t, p, r.Path, "the gateway got a path with dot segments: %s", r.RequestURI)
		for _, bad := range []string{"%2f", "%5c", "\\", "%2e", "%25"} {
			require.NotContains(t, strings.ToLower(r.RequestURI), bad, "the gateway got %s", r.RequestURI)
		}
	}
}

// heldKeyEnv is the environment of a proxy that holds the upstream key.
func heldKeyEnv(upstream string) map[string]string {
	return map[string]string{"HISTORYPROXY_UPSTREAM": upstream, "HISTORYPROXY_UPSTREAM_KEY_ENV": "HP_TEST_KEY", "HP_TEST_KEY": heldKey}
}

// configFile writes a YAML configuration and returns the -config flag for it.
func configFile(t *testing.T, yaml string) []string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "historyproxy.yaml")
	require.NoError(t, os.WriteFile(p, []byte(yaml), 0o600))
	return []string{"-config", p}
}

// rawResponse is an answer read whole.
type rawResponse struct {
	Status int
	Header http.Header
	Body   string
}

// send sends target exactly as written on the request line: the client
// neither cleans nor re-escapes it.
func (p *program) send(t *testing.T, method, target, body string, hdr map[string]string) rawResponse {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+p.addrs.Proxy+"/", strings.NewReader(body))
	require.NoError(t, err)
	req.URL.Opaque = target
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer sk-client")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultTransport.RoundTrip(req) // no redirects followed
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return rawResponse{Status: resp.StatusCode, Header: resp.Header, Body: string(b)}
}

// openAIError decodes an OpenAI-shaped error body, failing the test when
// the body is not one.
func openAIError(t *testing.T, body string) (code, message string) {
	t.Helper()
	var e struct {
		Error *struct {
			Message, Type, Code string
		} `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &e), body)
	require.NotNil(t, e.Error, body)
	require.NotEmpty(t, e.Error.Type, body)
	require.NotEmpty(t, e.Error.Message, body)
	return e.Error.Code, e.Error.Message
}

func chatJSON(msgs ...string) string {
	return `{"model":"gpt-4o-mini","messages":[` + strings.Join(msgs, ",") + `]}`
}

// repeat is n copies of msg, comma-separated.
func repeat(n int, msg string) string { return strings.Repeat(msg+",", n-1) + msg }

func userJSON(s string) string {
	b, _ := json.Marshal(s)
	return `{"role":"user","content":` + string(b) + `}`
}

// TestHeldKeyStaysUnderTheBasePath: no spelling of a path takes a request,
// and the proxy's key with it, out of the upstream's base path.
func TestHeldKeyStaysUnderTheBasePath(t *testing.T) {
	gw := newGateway(t)
	p := start(t, heldKeyEnv(gw.URL))
	for _, target := range []string{
		"/v1/%2e%2e/%2e%2e/internal/admin",
		"/v1/%2E%2E/%2E%2E/internal/admin",
		"/v1/..%2f..%2finternal/admin",
		"/v1/models/..%2F..%2F..%2Finternal",
		"/v1/models/..%5c..%5c..%5cinternal",
		`/v1/models/..\..\..\internal`,
		"/v1/%252e%252e/%252e%252e/internal/admin",
		"/v1/models/%252F..%252F..%252Finternal",
		"/v1/models/%c0%ae%c0%ae/%c0%ae%c0%ae/internal",
		"/v1/models;jsessionid=1",
		"/v1/models%00.json",
		"/s/web/u1/a/v1/%2e%2e/%2e%2e/internal/admin",
		"/s/web/u1/a/v1/..%2f..%2finternal",
	} {
		t.Run(target, func(t *testing.T) {
			r := p.send(t, http.MethodGet, target, "", nil)
			require.Equal(t, http.StatusBadRequest, r.Status, r.Body)
			code, _ := openAIError(t, r.Body)
			require.Equal(t, "invalid_path", code)
		})
	}
	// Literal dot segments mean the same to every server: resolved, they
	// stay under /v1 or find no route here.
	r := p.send(t, http.MethodGet, "/v1/../../internal/admin", "", nil)
	require.Equal(t, http.StatusNotFound, r.Status, r.Body)
	code, _ := openAIError(t, r.Body)
	require.Equal(t, "unknown_url", code)
	require.Empty(t, gw.requests(), "nothing reached the gateway")

	// The ordinary paths still go through, under the base, with the key.
	r = p.send(t, http.MethodGet, "/v1/./models", "", nil)
	require.Equal(t, http.StatusOK, r.Status, r.Body)
	got := gw.last(t)
	require.Equal(t, tenantBase+"/models", got.RequestURI)
	require.Equal(t, "Bearer "+heldKey, got.Header.Get("Authorization"))
	r = p.send(t, http.MethodGet, "/s/web/u1/a/v1/models/gpt-4o%3Amini", "", nil)
	require.Contains(t, r.Body, "Invalid URL", "the fake upstream answered")
	require.Equal(t, tenantBase+"/models/gpt-4o%3Amini", gw.last(t).RequestURI)
	gw.requireUnderBase(t)
}

// TestChatRoutesOnOneCanonicalPath: every spelling of the chat path that a
// router could serve as a chat completion goes through the chat handler
// (session rules, history, recording), or is refused.
func TestChatRoutesOnOneCanonicalPath(t *testing.T) {
	gw := newGateway(t)
	rs := redistest.Start(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": gw.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-session-require")

	// Without a session, the chat handler answers 400 missing_session; a
	// path with no canonical form gets 400 invalid_path. Neither forwards.
	for _, tc := range []struct{ target, code string }{
		{"/v1/chat/completions", "missing_session"},
		{"/v1/chat/completions/", "missing_session"},
		{"/v1//chat//completions", "missing_session"},
		{"/v1/Chat/Completions", "missing_session"},
		{"/v1/chat%2Fcompletions", "invalid_path"},
		{"/v1/chat%2fcompletions", "invalid_path"},
		{"/v1/chat/completions;x", "invalid_path"},
		{"/v1/chat/completions%3Bx", "invalid_path"},
		{"/v1/chat/completions/.", "missing_session"},
		{"/v1/chat/x/../completions", "missing_session"},
		{"/v1/chat/x/%2e%2e/completions", "invalid_path"},
		{"/v1/chat/x/%2e./completions", "invalid_path"},
		{`/v1/chat\completions`, "invalid_path"},
		{"/s/web/u1/a/v1/chat%2Fcompletions", "invalid_path"},
	} {
		t.Run(tc.target, func(t *testing.T) {
			r := p.send(t, http.MethodPost, tc.target, chatJSON(userJSON("hi")), nil)
			require.Equal(t, http.StatusBadRequest, r.Status, r.Body)
			code, _ := openAIError(t, r.Body)
			require.Equal(t, tc.code, code)
		})
	}
	require.Empty(t, gw.requests(), "nothing reached the gateway")

	// With a session in the path prefix, a trailing slash is recorded and
	// gets history like the plain path.
	for i, target := range []string{"/s/web/u1/a/v1/chat/completions/", "/s/web/u1/a/v1/chat/completions"} {
		r := p.send(t, http.MethodPost, target, chatJSON(userJSON(fmt.Sprintf("turn %d", i))), nil)
		require.Equal(t, http.StatusOK, r.Status, r.Body)
		require.Equal(t, fmt.Sprint(2*i), r.Header.Get("X-History-Messages"), target)
		require.Equal(t, tenantBase+"/chat/completions", gw.last(t).RequestURI)
	}
	n, err := rs.Client(t).XLen(context.Background(), "hp:{web:u1:a}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 4, n, "both turns recorded")
	gw.requireUnderBase(t)
}

// TestHeldKeyReachesOnlyTheAllowList: with the proxy's key, only the
// calls of upstream.passthrough are forwarded; without it, all are.
func TestHeldKeyReachesOnlyTheAllowList(t *testing.T) {
	allowed := []struct{ method, target, body string }{
		{http.MethodPost, "/v1/chat/completions", chatJSON(userJSON("hi"))},
		{http.MethodGet, "/v1/models", ""},
		{http.MethodGet, "/v1/models/gpt-4o-mini", ""},
		{http.MethodGet, "/v1/models/meta-llama/Llama-3.1-8B", ""},
		{http.MethodPost, "/v1/embeddings", `{"model":"text-embedding-3-small","input":"x"}`},
		{http.MethodPost, "/v1/moderations", `{"input":"x"}`},
	}
	refused := []struct{ method, target, body string }{
		{http.MethodGet, "/v1/files", ""},
		{http.MethodPost, "/v1/files", "x"},
		{http.MethodGet, "/v1/files/file-abc/content", ""},
		{http.MethodGet, "/v1/chat/completions", ""}, // stored completions of every app
		{http.MethodGet, "/v1/chat/completions/chatcmpl-1/messages", ""},
		{http.MethodDelete, "/v1/models/ft:gpt-4o-mini:org::abc", ""},
		{http.MethodPost, "/v1/responses", `{"model":"gpt-4o-mini","input":"x"}`},
		{http.MethodGet, "/v1/responses/resp_1", ""},
		{http.MethodPost, "/v1/batches", "{}"},
		{http.MethodGet, "/v1/organization/costs", ""},
		{http.MethodGet, "/v1", ""},
		{http.MethodGet, "/s/web/u1/a/v1/files", ""},
	}

	t.Run("held key, default list", func(t *testing.T) {
		gw := newGateway(t)
		p := start(t, heldKeyEnv(gw.URL))
		for _, c := range refused {
			r := p.send(t, c.method, c.target, c.body, nil)
			require.Equal(t, http.StatusForbidden, r.Status, "%s %s: %s", c.method, c.target, r.Body)
			code, _ := openAIError(t, r.Body)
			require.Equal(t, "endpoint_not_allowed", code)
		}
		require.Empty(t, gw.requests(), "no refused call reached the gateway")
		for _, c := range allowed {
			p.send(t, c.method, c.target, c.body, nil)
			got := gw.last(t)
			require.Equal(t, c.method+" "+tenantBase+strings.TrimPrefix(c.target, "/v1"), got.Method+" "+got.RequestURI)
			require.Equal(t, "Bearer "+heldKey, got.Header.Get("Authorization"))
		}
	})
	t.Run("no held key, everything passes", func(t *testing.T) {
		gw := newGateway(t)
		p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": gw.URL})
		for _, c := range append(refused, allowed...) {
			p.send(t, c.method, c.target, c.body, nil)
			got := gw.last(t)
			require.Equal(t, c.method+" "+tenantBase+strings.TrimPrefix(strings.TrimPrefix(c.target, "/s/web/u1/a"), "/v1"), got.Method+" "+got.RequestURI)
			require.Equal(t, "Bearer sk-client", got.Header.Get("Authorization"))
		}
	})
	t.Run("held key, star opts into everything", func(t *testing.T) {
		gw := newGateway(t)
		p := start(t, heldKeyEnv(gw.URL), configFile(t, "upstream:\n  passthrough: [\"*\"]\n")...)
		for _, c := range refused {
			p.send(t, c.method, c.target, c.body, nil)
			require.Equal(t, c.method, gw.last(t).Method, c.target)
		}
		require.Len(t, gw.requests(), len(refused))
	})
	t.Run("held key, own list", func(t *testing.T) {
		gw := newGateway(t)
		p := start(t, heldKeyEnv(gw.URL), configFile(t, "upstream:\n  passthrough:\n    - \"GET /v1/files/{id}\"\n")...)
		r := p.send(t, http.MethodGet, "/v1/files/file-abc", "", nil)
		require.NotEqual(t, http.StatusForbidden, r.Status, r.Body)
		require.Equal(t, tenantBase+"/files/file-abc", gw.last(t).RequestURI)
		for _, c := range []struct{ method, target string }{{http.MethodPost, "/v1/chat/completions"}, {http.MethodGet, "/v1/models"}, {http.MethodDelete, "/v1/files/file-abc"}} {
			r := p.send(t, c.method, c.target, chatJSON(userJSON("x")), nil)
			require.Equal(t, http.StatusForbidden, r.Status, "%s %s: %s", c.method, c.target, r.Body)
		}
		require.Len(t, gw.requests(), 1)
	})
}

// TestHeldKeyBillsTheConfiguredOrganization: a client cannot pick the
// organization or project that the proxy's key bills.
func TestHeldKeyBillsTheConfiguredOrganization(t *testing.T) {
	client := map[string]string{"OpenAI-Organization": "org-client", "OpenAI-Project": "proj-client", "X-Session-User": "u1"}
	calls := []struct{ method, target, body string }{
		{http.MethodPost, "/v1/chat/completions", chatJSON(userJSON("hi"))},
		{http.MethodGet, "/v1/models", ""},
	}
	cases := []struct {
		name          string
		env           func(string) map[string]string
		config        string
		wantOrg, want string
	}{
		{name: "held key drops the client's", env: heldKeyEnv},
		{name: "held key sends the configured ones", env: heldKeyEnv,
			config: "upstream:\n  organization: org-proxy\n  project: proj-proxy\n", wantOrg: "org-proxy", want: "proj-proxy"},
		{name: "client's key keeps the client's", env: func(u string) map[string]string { return map[string]string{"HISTORYPROXY_UPSTREAM": u} },
			wantOrg: "org-client", want: "proj-client"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			gw := newGateway(t)
			var args []string
			if tc.config != "" {
				args = configFile(t, tc.config)
			}
			p := start(t, tc.env(gw.URL), args...)
			for _, c := range calls {
				r := p.send(t, c.method, c.target, c.body, client)
				require.Equal(t, http.StatusOK, r.Status, r.Body)
				h := gw.last(t).Header
				require.Equal(t, tc.wantOrg, h.Get("OpenAI-Organization"), c.target)
				require.Equal(t, tc.want, h.Get("OpenAI-Project"), c.target)
				require.Len(t, h.Values("OpenAI-Organization"), min(1, len(tc.wantOrg)))
			}
		})
	}
}

// TestRequestLimits: a request with too many messages or content parts is
// refused before anything is done with it, and a turn larger than one
// store write may hold is refused before it is forwarded.
func TestRequestLimits(t *testing.T) {
	gw := newGateway(t)
	rs := redistest.Start(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": gw.URL, "HISTORYPROXY_REDIS_URL": rs.URL})
	many := func(n int, msg string) string { return chatJSON(repeat(n, msg)) }
	partsMsg := func(n int) string {
		return `{"role":"user","content":[` + repeat(n, `{"type":"text","text":""}`) + `]}`
	}
	parts := func(n int) string { return chatJSON(partsMsg(n)) }
	sys := `{"role":"system","content":""}`
	ctx := context.Background()
	rc := rs.Client(t)

	for _, tc := range []struct {
		name, body, code string
		hdr              map[string]string
	}{
		{"4097 messages", many(4097, sys), "too_many_messages", nil},
		{"4097 messages, stateless", many(4097, sys), "too_many_messages", map[string]string{"X-History": "off"}},
		{"4097 content parts in one message", parts(4097), "too_many_content_parts", nil},
		{"4097 content parts over two messages", chatJSON(partsMsg(2048), partsMsg(2049)), "too_many_content_parts", nil},
		{"a turn of 257 messages", many(257, userJSON("")), "turn_too_large", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hdr := map[string]string{"X-Session-User": "limits"}
			for k, v := range tc.hdr {
				hdr[k] = v
			}
			r := p.send(t, http.MethodPost, "/v1/chat/completions", tc.body, hdr)
			require.Equal(t, http.StatusBadRequest, r.Status, r.Body)
			code, _ := openAIError(t, r.Body)
			require.Equal(t, tc.code, code)
		})
	}
	require.Empty(t, gw.requests(), "nothing refused reached the gateway")
	keys, err := rc.Keys(ctx, "hp:{api:limits:default}:*").Result()
	require.NoError(t, err)
	require.Empty(t, keys, "nothing refused was stored")

	// At the bounds, requests pass; a turn of 256 messages is recorded.
	for _, body := range []string{chatJSON(repeat(4095, sys), userJSON("")), parts(4096)} {
		r := p.send(t, http.MethodPost, "/v1/chat/completions", body, map[string]string{"X-History": "read-only", "X-Session-User": "limits"})
		require.Equal(t, http.StatusOK, r.Status, r.Body)
	}
	r := p.send(t, http.MethodPost, "/v1/chat/completions", many(256, userJSON("")), map[string]string{"X-Session-User": "limits"})
	require.Equal(t, http.StatusOK, r.Status, r.Body)
	n, err := rc.XLen(ctx, "hp:{api:limits:default}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 257, n, "256 messages and the reply")
	// A larger turn goes through unrecorded when the client says so.
	r = p.send(t, http.MethodPost, "/v1/chat/completions", many(300, userJSON("")), map[string]string{"X-Session-User": "limits", "X-History": "read-only"})
	require.Equal(t, http.StatusOK, r.Status, r.Body)
	n, err = rc.XLen(ctx, "hp:{api:limits:default}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 257, n)

	// The limits are configurable.
	p2 := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": gw.URL},
		configFile(t, "max_request_messages: 3\nmax_request_content_parts: 2\nmax_turn_messages: 1\n")...)
	for _, tc := range []struct{ body, code string }{
		{many(4, sys), "too_many_messages"},
		{parts(3), "too_many_content_parts"},
		{many(2, userJSON("")), "turn_too_large"},
	} {
		r := p2.send(t, http.MethodPost, "/v1/chat/completions", tc.body, map[string]string{"X-Session-User": "limits"})
		require.Equal(t, http.StatusBadRequest, r.Status, r.Body)
		code, _ := openAIError(t, r.Body)
		require.Equal(t, tc.code, code)
	}
}

// TestErrorsHideInternalAddresses: an unreachable upstream is reported to
// the client without the addresses of the proxy's network; the log has
// them.
func TestErrorsHideInternalAddresses(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close()) // nothing listens there now
	_, port, _ := net.SplitHostPort(addr)

	p := start(t, heldKeyEnv("http://"+addr+"/tenant-a/v1"))
	for _, c := range []struct{ method, target, body string }{
		{http.MethodPost, "/v1/chat/completions", chatJSON(userJSON("hi"))},
		{http.MethodGet, "/v1/models", ""},
	} {
		r := p.send(t, c.method, c.target, c.body, map[string]string{"X-Session-User": "u1"})
		require.Equal(t, http.StatusBadGateway, r.Status, r.Body)
		code, _ := openAIError(t, r.Body)
		require.Equal(t, "upstream_unreachable", code)
		for _, leak := range []string{"127.0.0.1", port, "dial", "tcp", "refused"} {
			require.NotContains(t, r.Body, leak, c.target)
		}
	}
	require.Contains(t, p.stderr.String(), addr, "the log names the upstream and the cause")
	require.Contains(t, p.stderr.String(), "connection refused")
}

// TestRequestLimitsCoverTools: the request's tools and its messages' tool
// calls are arrays the proxy decodes (to count their tokens) element by
// element, like messages and content parts: millions of empty ones in a
// few MB cost gigabytes. They are bounded the same way, before anything is
// done per element.
func TestRequestLimitsCoverTools(t *testing.T) {
	gw := newGateway(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": gw.URL})
	tools := func(n int) string {
		return `{"model":"gpt-4o-mini","tools":[` + repeat(n, `{"type":"function","function":{"name":"f"}}`) + `],"messages":[` + userJSON("hi") + `]}`
	}
	calls := func(n ...int) string {
		var msgs []string
		for _, k := range n {
			msgs = append(msgs, userJSON("hi"), `{"role":"assistant","content":null,"tool_calls":[`+repeat(k, `{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}`)+`]}`)
		}
		return chatJSON(append(msgs, `{"role":"tool","tool_call_id":"c","content":"x"}`)...)
	}
	hdr := map[string]string{"X-Session-User": "tools"}
	for _, tc := range []struct{ name, body, code, param string }{
		{"4097 tools", tools(4097), "too_many_tools", "tools"},
		{"4097 tool calls in one message", calls(4097), "too_many_tool_calls", "messages[1].tool_calls"},
		{"4097 tool calls over two messages", calls(2048, 2049), "too_many_tool_calls", "messages[3].tool_calls"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := p.send(t, http.MethodPost, "/v1/chat/completions", tc.body, hdr)
			require.Equal(t, http.StatusBadRequest, r.Status, r.Body[:min(len(r.Body), 300)])
			code, msg := openAIError(t, r.Body)
			require.Equal(t, tc.code, code, msg[:min(len(msg), 300)])
			require.Contains(t, r.Body, `"param":"`+tc.param+`"`)
		})
	}
	require.Empty(t, gw.requests(), "nothing refused reached the gateway")

	// At the bound, requests are forwarded (the fake upstream may refuse
	// calls without results: that is its answer, not the proxy's).
	for i, body := range []string{tools(4096), calls(4096), calls(2048, 2048)} {
		p.send(t, http.MethodPost, "/v1/chat/completions", body, hdr)
		require.Len(t, gw.requests(), i+1, "forwarded")
	}

	// The bound is configurable.
	p2 := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": gw.URL}, configFile(t, "max_request_tools: 2\n")...)
	for _, tc := range []struct{ body, code string }{{tools(3), "too_many_tools"}, {calls(3), "too_many_tool_calls"}} {
		r := p2.send(t, http.MethodPost, "/v1/chat/completions", tc.body, hdr)
		require.Equal(t, http.StatusBadRequest, r.Status, r.Body[:min(len(r.Body), 300)])
		code, _ := openAIError(t, r.Body)
		require.Equal(t, tc.code, code)
	}
}

// TestClientTrailersStayBehind: a chunked request body may end in
// trailers, header fields sent after the body. The client's Authorization,
// its OpenAI-Organization and OpenAI-Project and the proxy's own headers
// are dropped as headers; sent as trailers they must not reach the
// upstream either (a server may merge trailers into the headers).
func TestClientTrailersStayBehind(t *testing.T) {
	gw := newGateway(t)
	p := start(t, heldKeyEnv(gw.URL))
	for _, c := range []struct{ target, body string }{
		{"/v1/chat/completions", chatJSON(userJSON("hi"))},
		{"/v1/embeddings", `{"model":"text-embedding-3-small","input":"x"}`},
	} {
		t.Run(c.target, func(t *testing.T) {
			// An io.Reader of unknown length: the body is sent chunked,
			// with the trailers after it.
			req, err := http.NewRequest(http.MethodPost, "http://"+p.addrs.Proxy+c.target, io.MultiReader(strings.NewReader(c.body)))
			require.NoError(t, err)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("X-Session-User", "u1")
			req.Trailer = http.Header{
				"Authorization":       {"Bearer sk-client"},
				"Openai-Organization": {"org-client"},
				"Openai-Project":      {"proj-client"},
				"X-Session-Id":        {"a:b:c"},
			}
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode)
			got := gw.last(t)
			require.Equal(t, []string{"Bearer " + heldKey}, got.Header.Values("Authorization"))
			require.Empty(t, got.Trailer, "trailers the upstream received")
			require.Empty(t, got.Header.Values("Trailer"))
		})
	}
}

// TestHeldKeyBillsTheConfiguredOrganizationWhateverTheSpelling: servers
// that hand headers to apps as CGI variables (WSGI, Rack, PHP) read
// OpenAI_Organization as OpenAI-Organization, in any letter case. No
// spelling of the client's organization or project passes with the held
// key.
func TestHeldKeyBillsTheConfiguredOrganizationWhateverTheSpelling(t *testing.T) {
	gw := newGateway(t)
	p := start(t, heldKeyEnv(gw.URL), configFile(t, "upstream:\n  organization: org-proxy\n")...)
	client := map[string]string{
		"openai-organization": "org-client-1", "OPENAI_ORGANIZATION": "org-client-2", "OpenAI_Organization": "org-client-3",
		"openai_project": "proj-client-1", "OpenAI_Project": "proj-client-2", "X-Session-User": "u1",
	}
	for _, c := range []struct{ method, target, body string }{
		{http.MethodPost, "/v1/chat/completions", chatJSON(userJSON("hi"))},
		{http.MethodGet, "/v1/models", ""},
	} {
		r := p.send(t, c.method, c.target, c.body, client)
		require.Equal(t, http.StatusOK, r.Status, r.Body)
		got := gw.last(t).Header
		var org, proj []string
		for k, v := range got {
			switch strings.ToLower(strings.ReplaceAll(k, "_", "-")) {
			case "openai-organization":
				org = append(org, v...)
			case "openai-project":
				proj = append(proj, v...)
			}
		}
		require.Equal(t, []string{"org-proxy"}, org, "%s %s: %v", c.method, c.target, got)
		require.Empty(t, proj, "%s %s: %v", c.method, c.target, got)
	}
}

// TestHeldKeyStaysUnderTheBasePathWhateverTheReading: paths that the
// allow-list lets through (GET /v1/models/{model...} takes any rest) but
// that a server behind the proxy may read as dot segments or separators
// are refused: a chain of servers that decodes three times; a server that
// normalises Unicode compatibility forms (NFKC reads U+FF0E FULLWIDTH FULL
// STOP as ".", U+2025 TWO DOT LEADER as "..", U+FF0F as "/", U+FF05 as
// "%"); Windows and IIS, which drop a segment's trailing dots and spaces
// ("..." and ".. " read as "..", "completions." as "completions").
func TestHeldKeyStaysUnderTheBasePathWhateverTheReading(t *testing.T) {
	gw := newGateway(t)
	p := start(t, heldKeyEnv(gw.URL))
	const fw = "%EF%BC%8E" // U+FF0E
	for _, target := range []string{
		"/v1/models/%25252e%25252e/%25252e%25252e/%25252e%25252e/internal",
		"/v1/models/x%25252f..%25252f..%25252f..%25252finternal",
		"/v1/models/" + fw + fw + "/" + fw + fw + "/" + fw + fw + "/internal",
		"/v1/models/%E2%80%A5/%E2%80%A5/%E2%80%A5/internal",
		"/v1/models/x%EF%BC%8F..%EF%BC%8F..%EF%BC%8F..%EF%BC%8Finternal",
		"/v1/models/%EF%BC%852e%EF%BC%852e/%EF%BC%852e%EF%BC%852e/internal",
		"/v1/models/.../.../.../internal",
		"/v1/models/..%20/..%20/..%20/internal",
	} {
		t.Run(target, func(t *testing.T) {
			r := p.send(t, http.MethodGet, target, "", nil)
			require.Equal(t, http.StatusBadRequest, r.Status, r.Body)
			code, _ := openAIError(t, r.Body)
			require.Equal(t, "invalid_path", code)
		})
	}
	require.Empty(t, gw.requests(), "nothing reached the gateway")

	// Without a held key everything passes, but no reading of the chat
	// path escapes the chat handler.
	rs := redistest.Start(t)
	p2 := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": gw.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-session-require")
	for _, target := range []string{"/v1/chat/completions.", "/v1/chat/completions%20", "/v1/chat/completions%E2%80%A4"} {
		r := p2.send(t, http.MethodPost, target, chatJSON(userJSON("hi")), nil)
		require.Equal(t, http.StatusBadRequest, r.Status, "%s: %s", target, r.Body)
	}
	require.Empty(t, gw.requests(), "nothing reached the gateway")

	// Dots and non-ASCII letters inside a segment still pass.
	p.send(t, http.MethodGet, "/v1/models/llama-3.1..8b-%C3%A9", "", nil)
	require.Equal(t, tenantBase+"/models/llama-3.1..8b-%C3%A9", gw.last(t).RequestURI)
}

// TestHeldKeyAllowListHoldsAgainstOverrides: the allow-list decides on the
// method and the path, so nothing that makes a server behind the proxy
// route on another method or path passes with the held key: Symfony and
// Laravel serve a POST with X-HTTP-Method-Override: GET (or ?_method=GET,
// PHP reading ".method" as "_method" too) as a GET, Express's
// method-override and Google's front ends do the same with the header, and
// IIS rewrites and older Symfony route on X-Original-URL and X-Rewrite-URL.
// POST /v1/chat/completions read as GET lists every app's stored
// completions, which the allow-list refuses.
func TestHeldKeyAllowListHoldsAgainstOverrides(t *testing.T) {
	gw := newGateway(t)
	p := start(t, heldKeyEnv(gw.URL))
	overrides := map[string]string{
		"X-HTTP-Method-Override": "GET", "X-HTTP-Method": "GET", "X-Method-Override": "GET", "X_HTTP_Method_Override": "GET",
		"X-Original-URL": "/tenant-a/v1/files", "X-Rewrite-URL": "/tenant-a/v1/files", "X-Session-User": "u1",
	}
	for _, c := range []struct{ method, target, body string }{
		{http.MethodPost, "/v1/chat/completions", chatJSON(userJSON("hi"))},
		{http.MethodPost, "/v1/embeddings", `{"model":"text-embedding-3-small","input":"x"}`},
		{http.MethodGet, "/v1/models", ""},
	} {
		r := p.send(t, c.method, c.target, c.body, overrides)
		require.Equal(t, http.StatusOK, r.Status, r.Body)
		got := gw.last(t).Header
		for k := range got {
			switch strings.ToLower(strings.ReplaceAll(k, "_", "-")) {
			case "x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url":
				t.Errorf("%s %s: the upstream got %s: %s", c.method, c.target, k, got.Get(k))
			}
		}
	}
	for _, target := range []string{"/v1/chat/completions?_method=GET", "/v1/chat/completions?x=1&.method=GET", "/v1/embeddings?x=1&_method=DELETE"} {
		r := p.send(t, http.MethodPost, target, chatJSON(userJSON("hi")), map[string]string{"X-Session-User": "u1"})
		require.Equal(t, http.StatusForbidden, r.Status, "%s: %s", target, r.Body)
		code, _ := openAIError(t, r.Body)
		require.Equal(t, "endpoint_not_allowed", code)
	}
	require.Len(t, gw.requests(), 3, "no method override in the query reached the gateway")
}

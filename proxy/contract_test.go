package proxy

import (
	"context"
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/metrics"
)

// TestTruncatedCountsMaxMessages: a history cut by max_messages (not by
// the token budget) is counted in historyproxy_history_truncated_total.
func TestTruncatedCountsMaxMessages(t *testing.T) {
	h, reg := metricsHarness(t, func(o *Options) {
		o.Agent = func(string) Agent {
			return Agent{Mode: ModePerUser, MaxTokens: 100000, MaxMessages: 4, OutputReserve: 1024}
		}
	})
	sid := map[string]string{"X-Session-ID": "c:trunc:a"}
	truncated := func() float64 {
		v, _ := gathered(t, reg, "historyproxy_history_truncated_total", map[string]string{"channel": "c", "agent": "a"})
		return v
	}
	for i, want := range []struct {
		injected  string
		truncated float64
	}{{"0", 0}, {"2", 0}, {"4", 0}, {"4", 1}, {"4", 2}} {
		r := h.do(t, "/v1/chat/completions", chatBody(user("turn")), sid)
		require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
		require.Equal(t, want.injected, r.Header.Get("X-History-Messages"), "request %d", i)
		require.Equal(t, want.truncated, truncated(), "request %d: %d messages stored, 4 injected at most", i, 2*i)
	}
}

// TestSessionPartsCombineThroughTheProxy: the README's per-part rule, seen
// from a client, with the three cases.
func TestSessionPartsCombineThroughTheProxy(t *testing.T) {
	h := newHarness(t)
	for _, c := range []struct {
		name, path, body string
		hdr              map[string]string
		want             string
	}{
		{"channel header and body user", "/v1/chat/completions", `{"model":"m","user":"dave","messages":[` + user("x") + `]}`,
			map[string]string{"X-Session-Channel": "web"}, "web:dave:default"},
		{"path and agent header", "/s/web/erin/sales/v1/chat/completions", chatBody(user("x")),
			map[string]string{"X-Session-Agent": "billing"}, "web:erin:billing"},
		{"path and user header", "/s/web/erin/sales/v1/chat/completions", chatBody(user("x")),
			map[string]string{"X-Session-User": "frank"}, "web:frank:sales"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := h.do(t, c.path, c.body, c.hdr)
			require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
			require.Equal(t, c.want, r.Header.Get("X-Session-ID"))
			require.Len(t, h.stored(t, c.want), 2, "the turn is stored under %s", c.want)
		})
	}
}

// TestPathPrefixMissingAPart: /s/web/erin/v1/... is a prefix with two
// parts, answered as a bad session id rather than an unknown URL.
func TestPathPrefixMissingAPart(t *testing.T) {
	h := newHarness(t)
	for _, path := range []string{"/s/web/erin/v1/chat/completions", "/s/web/erin/v1/models"} {
		r := h.do(t, path, chatBody(user("x")), nil)
		require.Equal(t, http.StatusBadRequest, r.StatusCode)
		body := readAll(t, r)
		assertOpenAIError(t, body, "invalid_session_id")
		require.Contains(t, body, "/s/{channel}/{user}/{agent}/v1/")
	}
	require.Empty(t, h.up.Requests())
}

// errorBody decodes an error answer keeping which keys are present.
func errorBody(t *testing.T, r *http.Response) map[string]any {
	t.Helper()
	body := readAll(t, r)
	var e struct {
		Error map[string]any `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &e), body)
	require.NotNil(t, e.Error, body)
	return e.Error
}

// TestEveryErrorBodyHasParam: each of the proxy's own error codes answers
// with OpenAI's four keys, param null when no field is at fault. (The
// upstream and store errors are checked by assertOpenAIError where they
// are provoked.)
func TestEveryErrorBodyHasParam(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.MaxBodyBytes = 1 << 10; o.RequireSession = true })
	type hdr = map[string]string
	sid := hdr{"X-Session-ID": "c:u:a"}
	cases := []struct {
		name, path, body string
		hdr              hdr
		status           int
		code             string
		param            any // nil: JSON null
	}{
		{"invalid_json", "/v1/chat/completions", `[1]`, sid, 400, "invalid_json", nil},
		{"invalid_request_body", "/v1/chat/completions", "{\"a\":\"\xff\"}", sid, 400, "invalid_request_body", nil},
		{"missing messages", "/v1/chat/completions", `{"model":"m"}`, sid, 400, "missing_required_parameter", "messages"},
		// The README: param names the field at fault; a session header or
		// the body's user field is one, a path prefix is not.
		{"invalid_session_id", "/v1/chat/completions", chatBody(user("x")), hdr{"X-Session-ID": "a b"}, 400, "invalid_session_id", "X-Session-ID"},
		{"invalid_session_id, part header", "/v1/chat/completions", chatBody(user("x")), hdr{"X-Session-User": "a b"}, 400, "invalid_session_id", "X-Session-User"},
		{"invalid_session_id, body user", "/v1/chat/completions", `{"model":"m","user":"a b","messages":[` + user("x") + `]}`, nil, 400, "invalid_session_id", "user"},
		{"invalid_session_id, path prefix", "/s/web/erin/v1/chat/completions", chatBody(user("x")), nil, 400, "invalid_session_id", nil},
		{"invalid_session_id, path part", "/s/web/a%20b/sales/v1/chat/completions", chatBody(user("x")), nil, 400, "invalid_session_id", nil},
		{"invalid_session_id, passthrough", "/v1/embeddings", `{}`, hdr{"X-Session-Agent": "a:b"}, 400, "invalid_session_id", "X-Session-Agent"},
		{"missing_session", "/v1/chat/completions", chatBody(user("x")), nil, 400, "missing_session", nil},
		{"bad X-History", "/v1/chat/completions", chatBody(user("x")), hdr{"X-Session-ID": "c:u:a", "X-History": "sometimes"}, 400, "invalid_value", "X-History"},
		{"request_too_large", "/v1/chat/completions", chatBody(user(strings.Repeat("x", 2<<10))), sid, 413, "request_too_large", nil},
		{"unknown_url", "/v2/chat/completions", chatBody(user("x")), sid, 404, "unknown_url", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := h.do(t, c.path, c.body, c.hdr)
			require.Equal(t, c.status, r.StatusCode)
			e := errorBody(t, r)
			require.Equal(t, c.code, e["code"])
			param, ok := e["param"]
			require.True(t, ok, "no param key: %v", e)
			require.Equal(t, c.param, param)
		})
	}
}

// TestErrorsSpeakJSON: type errors in a request body are worded in JSON's
// and OpenAI's terms, naming the field, never Go types.
func TestErrorsSpeakJSON(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		name, body, param, want string
	}{
		{"array body", `[{"model":"m"}]`, "", "The request body must be a JSON object: expected an object, but got an array instead."},
		{"string body", `"hello"`, "", "expected an object, but got a string instead"},
		{"broken JSON", `{"model":`, "", "The request body must be a JSON object: not valid JSON"},
		{"max_tokens as a string", `{"model":"m","max_tokens":"10","messages":[` + user("x") + `]}`, "max_tokens",
			"Invalid type for 'max_tokens': expected an integer, but got a string instead."},
		{"max_tokens fractional", `{"model":"m","max_tokens":1.5,"messages":[` + user("x") + `]}`, "max_tokens",
			"Invalid type for 'max_tokens': expected an integer, but got the number 1.5 instead."},
		{"stream as a string", `{"model":"m","stream":"yes","messages":[` + user("x") + `]}`, "stream",
			"Invalid type for 'stream': expected a boolean, but got a string instead."},
		{"model as an object", `{"model":{},"messages":[` + user("x") + `]}`, "model",
			"Invalid type for 'model': expected a string, but got an object instead."},
		{"messages as an object", `{"model":"m","messages":{"role":"user"}}`, "messages",
			"Invalid type for 'messages': expected an array, but got an object instead."},
		{"a message as a string", `{"model":"m","messages":["hi"]}`, "messages[0]",
			"Invalid type for 'messages[0]': expected an object, but got a string instead."},
		{"a role as a number", `{"model":"m","messages":[{"role":1,"content":"x"}]}`, "messages[0].role",
			"Invalid type for 'messages[0].role': expected a string, but got a number instead."},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := h.do(t, "/v1/chat/completions", c.body, map[string]string{"X-Session-ID": "c:u:a"})
			require.Equal(t, http.StatusBadRequest, r.StatusCode)
			e := errorBody(t, r)
			msg := e["message"].(string)
			require.Contains(t, msg, c.want)
			for _, goTerm := range []string{"Go value", "map[", "json.RawMessage", "[]", " int ", "float64", "unmarshal"} {
				require.NotContains(t, msg, goTerm, "the message speaks Go")
			}
			if c.param == "" {
				require.Nil(t, e["param"])
			} else {
				require.Equal(t, c.param, e["param"])
			}
		})
	}
}

// TestSessionEchoedOnBodyErrors: a request whose headers or path name a
// valid session gets X-Session-ID back on every error about its body.
func TestSessionEchoedOnBodyErrors(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.MaxBodyBytes = 1 << 10 })
	for _, c := range []struct {
		name, path, body string
		hdr              map[string]string
		status           int
		want             string
	}{
		{"invalid_json, id header", "/v1/chat/completions", `{`, map[string]string{"X-Session-ID": "c:u:a"}, 400, "c:u:a"},
		{"missing messages, user header", "/v1/chat/completions", `{"model":"m"}`, map[string]string{"X-Session-User": "u"}, 400, "api:u:default"},
		{"wrong type, path prefix", "/s/web/u/sales/v1/chat/completions", `{"model":"m","messages":"x"}`, nil, 400, "web:u:sales"},
		{"too large", "/v1/chat/completions", chatBody(user(strings.Repeat("x", 2<<10))), map[string]string{"X-Session-ID": "c:u:a"}, 413, "c:u:a"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := h.do(t, c.path, c.body, c.hdr)
			require.Equal(t, c.status, r.StatusCode)
			require.Equal(t, c.want, r.Header.Get("X-Session-ID"))
		})
	}
	// The body's user is only known once the body is read.
	r := h.do(t, "/v1/chat/completions", `{"user":"u","messages":"x"}`, nil)
	require.Equal(t, http.StatusBadRequest, r.StatusCode)
	require.Empty(t, r.Header.Get("X-Session-ID"))
}

// TestSessionEchoedBeforeRouting: answers the proxy gives before a
// handler runs (a path outside /v1, a call outside the allow-list, a path
// with no canonical form) still carry the session the request named, as
// the README promises for every answer to a request with a session.
func TestSessionEchoedBeforeRouting(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.Passthrough = []string{"POST /v1/chat/completions"} })
	for _, c := range []struct {
		name, method, path string
		hdr                map[string]string
		status             int
		code, want         string
	}{
		{"unknown_url, id header", http.MethodGet, "/v2/models", map[string]string{"X-Session-ID": "c:u:a"}, 404, "unknown_url", "c:u:a"},
		{"unknown_url, user header", http.MethodGet, "/v2/models", map[string]string{"X-Session-User": "u"}, 404, "unknown_url", "api:u:default"},
		{"endpoint_not_allowed, id header", http.MethodGet, "/v1/files", map[string]string{"X-Session-ID": "c:u:a"}, 403, "endpoint_not_allowed", "c:u:a"},
		{"endpoint_not_allowed, path prefix", http.MethodGet, "/s/web/erin/sales/v1/files", nil, 403, "endpoint_not_allowed", "web:erin:sales"},
		{"endpoint_not_allowed, prefix and agent header", http.MethodGet, "/s/web/erin/sales/v1/files", map[string]string{"X-Session-Agent": "billing"}, 403, "endpoint_not_allowed", "web:erin:billing"},
		// X-Session-ID names all three parts whatever the path says.
		{"invalid_path, id header", http.MethodGet, "/v1/a%2Fb", map[string]string{"X-Session-ID": "c:u:a"}, 400, "invalid_path", "c:u:a"},
		{"bad prefix, id header", http.MethodGet, "/s/web/erin/v1/models", map[string]string{"X-Session-ID": "c:u:a"}, 400, "invalid_session_id", "c:u:a"},
		// A broken path may have named parts: without X-Session-ID the
		// session is not known.
		{"invalid_path, user header", http.MethodGet, "/v1/a%2Fb", map[string]string{"X-Session-User": "u"}, 400, "invalid_path", ""},
		{"no session", http.MethodGet, "/v1/files", nil, 403, "endpoint_not_allowed", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			req, err := http.NewRequest(c.method, h.srv.URL+c.path, nil)
			require.NoError(t, err)
			for k, v := range c.hdr {
				req.Header.Set(k, v)
			}
			r, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			defer r.Body.Close()
			require.Equal(t, c.status, r.StatusCode)
			require.Equal(t, c.code, errorBody(t, r)["code"])
			require.Equal(t, c.want, r.Header.Get("X-Session-ID"))
		})
	}
	require.Empty(t, h.up.Requests())
}

// TestHistorySessionHeader: X-History-Session names the id that holds the
// conversation, which in a shared agent is not the user's own.
func TestHistorySessionHeader(t *testing.T) {
	h := newHarness(t, func(o *Options) {
		o.Agent = func(name string) Agent {
			a := defaultAgent(name)
			switch name {
			case "room":
				a.Mode = ModeShared
			case "quiet":
				a.Mode = ModeOff
			}
			return a
		}
	})
	for _, c := range []struct {
		name string
		hdr  map[string]string
		want string
	}{
		{"per user", map[string]string{"X-Session-ID": "c:alice:support"}, "c:alice:support"},
		{"shared", map[string]string{"X-Session-ID": "c:alice:room"}, "c:*:room"},
		{"read-only still reads it", map[string]string{"X-Session-ID": "c:bob:room", "X-History": "read-only"}, "c:*:room"},
		{"agent off keeps nothing", map[string]string{"X-Session-ID": "c:alice:quiet"}, ""},
		{"X-History off keeps nothing", map[string]string{"X-Session-ID": "c:alice:support", "X-History": "off"}, ""},
		{"stateless", nil, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := h.do(t, "/v1/chat/completions", chatBody(user("x")), c.hdr)
			require.Equal(t, http.StatusOK, r.StatusCode)
			require.Equal(t, c.want, r.Header.Get("X-History-Session"))
			require.Len(t, r.Header.Values("X-History-Session"), min(len(c.want), 1))
		})
	}
	require.Len(t, h.stored(t, "c:*:room"), 2, "the shared conversation is under the id the header named")
	require.Empty(t, h.up.LastChat().Header.Get("X-History-Session"))
}

// TestHistoryHeaderAnyCase: X-History takes on, off, read-only and new in any
// case; anything else is a 400 naming the header.
func TestHistoryHeaderAnyCase(t *testing.T) {
	h := newHarness(t)
	for _, c := range []struct {
		value    string
		injected string // X-History-Messages of a second request
		stored   int    // messages stored after both requests
	}{
		{"OFF", "0", 0},
		{"Off", "0", 0},
		{"Read-Only", "0", 0},
		{"READ-ONLY", "0", 0},
		{"ON", "2", 4},
		{"On", "2", 4},
		{" on ", "2", 4},
		// Each request starts a new conversation: the second sees nothing
		// of the first, and the current one holds only its own turn.
		{"NEW", "0", 2},
		{"New", "0", 2},
	} {
		t.Run(c.value, func(t *testing.T) {
			sid := map[string]string{"X-Session-ID": "c:" + strings.NewReplacer(" ", "_", "-", "_").Replace(c.value) + ":a", "X-History": c.value}
			for i := 0; i < 2; i++ {
				r := h.do(t, "/v1/chat/completions", chatBody(user("x")), sid)
				require.Equal(t, http.StatusOK, r.StatusCode, readAll(t, r))
				if i == 1 {
					require.Equal(t, c.injected, r.Header.Get("X-History-Messages"))
				}
			}
			msgs, err := h.store.Messages(context.Background(), sid["X-Session-ID"], "")
			require.NoError(t, err)
			require.Len(t, msgs, c.stored)
		})
	}
	r := h.do(t, "/v1/chat/completions", chatBody(user("x")), map[string]string{"X-Session-ID": "c:u:a", "X-History": "sometimes"})
	require.Equal(t, http.StatusBadRequest, r.StatusCode)
	e := errorBody(t, r)
	require.Equal(t, "invalid_value", e["code"])
	require.Equal(t, "X-History", e["param"])
	require.Contains(t, e["message"], "on, off, read-only or new")
}

// TestDegradedReadQueuesTheTurn: when the history read of a request fails
// (fail_open), its turn goes to the retry queue without a second attempt
// on the same outage, so the request waits for the store at most once
// (store.timeout), not twice.
func TestDegradedReadQueuesTheTurn(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	reg := prometheus.NewRegistry()
	px, srv := redisProxy(t, rs, up, func(o *Options) { o.Metrics = metrics.New(reg, 0) })
	rs.Stop(t)
	resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(
		`{"model":"gpt-4o","user":"u1","messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "degraded", resp.Header.Get("X-History"))
	window, _ := gathered(t, reg, "historyproxy_store_errors_total", map[string]string{"op": "window"})
	appendErrs, _ := gathered(t, reg, "historyproxy_store_errors_total", map[string]string{"op": "append"})
	require.Equal(t, 1.0, window, "the history read failed")
	require.Zero(t, appendErrs, "no write was tried in the request after its read failed")

	rs.Restart(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.True(t, px.retry.drain(ctx, 10*time.Second), "the queue writes the turn once Redis is back")
	n, err := rs.Client(t).Exists(ctx, "hp:{api:u1:default}:session").Result()
	require.NoError(t, err)
	require.EqualValues(t, 1, n)
}

// TestReadmeListsEveryErrorCode: every error code the proxy answers with
// (found in the source of proxy and wire) is in the README.
func TestReadmeListsEveryErrorCode(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	codes := map[string]string{} // code -> where
	fset := token.NewFileSet()
	for _, dir := range []string{".", "../wire"} {
		files, err := filepath.Glob(filepath.Join(dir, "*.go"))
		require.NoError(t, err)
		for _, name := range files {
			if strings.HasSuffix(name, "_test.go") {
				continue
			}
			f, err := parser.ParseFile(fset, name, nil, 0)
			require.NoError(t, err)
			ast.Inspect(f, func(n ast.Node) bool {
				var lit ast.Expr
				switch n := n.(type) {
				case *ast.CallExpr: // badRequest("code", ...), wire.BadRequest("code", ...)
					var fn string
					switch f := n.Fun.(type) {
					case *ast.Ident:
						fn = f.Name
					case *ast.SelectorExpr:
						fn = f.Sel.Name
					}
					if strings.EqualFold(fn, "badRequest") && len(n.Args) > 0 {
						lit = n.Args[0]
					}
				case *ast.KeyValueExpr: // &apiError{Code: "code", ...}
					if k, ok := n.Key.(*ast.Ident); ok && k.Name == "Code" {
						lit = n.Value
					}
				}
				if bl, ok := lit.(*ast.BasicLit); ok && bl.Kind == token.STRING {
					code, err := strconv.Unquote(bl.Value)
					require.NoError(t, err)
					codes[code] = fset.Position(bl.Pos()).String()
				}
				return true
			})
		}
	}
	require.Greater(t, len(codes), 15, "the source scan found too few codes: %v", codes)
	for code, where := range codes {
		if !strings.Contains(string(readme), "`"+code+"`") {
			t.Errorf("README.md does not mention error code %s (%s)", code, where)
		}
	}
}

// TestReadmeHistoryValues: the README's X-History table and its row in the
// errors table list the same values, and they are the ones the proxy
// accepts.
func TestReadmeHistoryValues(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	readme := string(data)
	values := func(text string) []string {
		var vs []string
		for _, m := range regexp.MustCompile("`([a-z-]+)`").FindAllStringSubmatch(text, -1) {
			vs = append(vs, m[1])
		}
		slices.Sort(vs)
		return slices.Compact(vs)
	}
	start := strings.Index(readme, "| `X-History` | meaning |")
	require.Positive(t, start, "README has no X-History table")
	table := readme[start:]
	table = table[:strings.Index(table, "\n\n")]
	var documented []string
	for _, row := range strings.Split(table, "\n")[2:] {
		documented = append(documented, values(strings.Split(row, "|")[1])...)
	}
	slices.Sort(documented)
	for _, v := range documented {
		_, err := historyMode(http.Header{"X-History": {v}})
		require.Nil(t, err, "the README documents X-History: %s, which the proxy refuses", v)
	}
	for _, v := range []string{historyOn, historyOff, historyReadOnly, historyNew} {
		require.Contains(t, documented, v, "the README's X-History table lacks %s", v)
	}
	row := regexp.MustCompile("(?m)^\\| an `X-History` value other than (.*?) \\|").FindStringSubmatch(readme)
	require.NotNil(t, row, "README's errors table has no X-History row")
	require.Equal(t, documented, values(row[1]), "the errors table's X-History row")
}

// TestHistorySessionAbsentWhenNothingKept: X-History-Session is absent
// from an answer that read and recorded nothing (the README), such as a
// turn refused as too large, or a 503 of fail_closed before anything was
// read; X-Session-ID still names the session.
func TestHistorySessionAbsentWhenNothingKept(t *testing.T) {
	t.Run("turn_too_large", func(t *testing.T) {
		h := newHarness(t, func(o *Options) { o.MaxTurnMessages = 1 })
		r := h.do(t, "/v1/chat/completions", chatBody(user("a"), user("b")), map[string]string{"X-Session-ID": "c:u:a"})
		require.Equal(t, http.StatusBadRequest, r.StatusCode)
		require.Equal(t, "turn_too_large", errorBody(t, r)["code"])
		require.Equal(t, "c:u:a", r.Header.Get("X-Session-ID"))
		require.Empty(t, r.Header.Values("X-History-Session"))
	})
	t.Run("fail_closed", func(t *testing.T) {
		rs := redistest.Start(t)
		_, srv := redisProxy(t, rs, fakeai.New(t), func(o *Options) { o.FailClosed = true })
		rs.Stop(t)
		for i := 0; i < 2; i++ { // the history read fails, then the ping before it
			req, err := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user("x"))))
			require.NoError(t, err)
			req.Header.Set("X-Session-ID", "c:u:a")
			r, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			require.Equal(t, http.StatusServiceUnavailable, r.StatusCode)
			require.Equal(t, "history_unavailable", errorBody(t, r)["code"])
			r.Body.Close()
			require.Equal(t, "c:u:a", r.Header.Get("X-Session-ID"))
			require.Empty(t, r.Header.Values("X-History-Session"), "request %d", i)
		}
	})
}

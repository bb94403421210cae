package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// eachStore runs fn on a memory store and on a real redis-server.
func eachStore(t *testing.T, fn func(t *testing.T, s Store)) {
	t.Run("memory", func(t *testing.T) { fn(t, history.NewMemory()) })
	t.Run("redis", func(t *testing.T) {
		rs := redistest.Start(t)
		fn(t, history.NewRedis(rs.Client(t), "rev"))
	})
}

// do sends a request with a JSON body and headers (name, value pairs),
// and decodes the answer into out when not nil.
func do(t *testing.T, method, u string, body any, out any, header ...string) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, u, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, u, err, raw)
		}
	}
	return resp.StatusCode
}

// TestImportRetryIntoNewConversation: an import into a new conversation
// retried with the same Idempotency-Key (its answer was lost) stores
// nothing twice and leaves the imported conversation going: the next
// request reads it.
func TestImportRetryIntoNewConversation(t *testing.T) {
	eachStore(t, func(t *testing.T, s Store) {
		ctx := context.Background()
		const id = "web:kim:support"
		if _, err := s.Append(ctx, id, history.Turn{Messages: []history.Message{{Role: "user", Content: "old"}}}, history.Policy{}); err != nil {
			t.Fatal(err)
		}
		srv := newTestAPI(t, s)
		u := srv.URL + "/admin/v1/sessions/" + url.PathEscape(id) + "/messages"
		body := map[string]any{"messages": []any{map[string]any{"role": "user", "content": "imported"}}, "new_conversation": true}
		var first, again Imported
		if got := do(t, http.MethodPost, u, body, &first, "Idempotency-Key", "imp-1"); got != http.StatusCreated {
			t.Fatalf("import: got %d, want 201", got)
		}
		if got := do(t, http.MethodPost, u, body, &again, "Idempotency-Key", "imp-1"); got != http.StatusOK || !again.Duplicate {
			t.Fatalf("retry: got %d %+v, want 200 duplicate", got, again)
		}
		w, err := s.(interface {
			Window(context.Context, string, int, int64, history.Policy) (history.Window, error)
		}).Window(ctx, id, 10, 0, history.Policy{})
		if err != nil {
			t.Fatal(err)
		}
		if w.ConversationID != first.Conversation || len(w.Messages) != 1 || w.Messages[0].Content != "imported" {
			t.Errorf("window after the retry: got %q %v, want %s with the imported message", w.ConversationID, w.Messages, first.Conversation)
		}
	})
}

// TestNoTokenRefusesBrowsers: without a token the API trusts whoever
// reaches the loopback listener, so a web page the operator opens must
// not reach it: a cross-site request that changes data (CSRF: a form or
// fetch needs no preflight for a bodiless POST) and a request for another
// host name (DNS rebinding: a page whose name now resolves to 127.0.0.1
// reads the answers) are refused, and change nothing.
func TestNoTokenRefusesBrowsers(t *testing.T) {
	ctx := context.Background()
	s := history.NewMemory()
	const id = "web:kim:support"
	if _, err := s.Append(ctx, id, history.Turn{Messages: []history.Message{{Role: "user", Content: "hi"}}}, history.Policy{}); err != nil {
		t.Fatal(err)
	}
	srv := newTestAPI(t, s)
	reset := srv.URL + "/admin/v1/sessions/" + url.PathEscape(id) + "/reset"
	for _, tt := range []struct {
		name        string
		method, u   string
		header      []string
		wantStatus  int
		stillActive bool
	}{
		{name: "cross-site form post", method: http.MethodPost, u: reset, header: []string{"Origin", "https://evil.example", "Sec-Fetch-Site", "cross-site"}, wantStatus: http.StatusForbidden, stillActive: true},
		{name: "cross-site post, Origin only", method: http.MethodPost, u: reset, header: []string{"Origin", "https://evil.example"}, wantStatus: http.StatusForbidden, stillActive: true},
		{name: "rebound host name", method: http.MethodGet, u: srv.URL + "/admin/v1/sessions", header: []string{"Host", "evil.example"}, wantStatus: http.StatusForbidden, stillActive: true},
		{name: "rebound host name, post", method: http.MethodPost, u: reset, header: []string{"Host", "evil.example:80"}, wantStatus: http.StatusForbidden, stillActive: true},
		{name: "localhost by name", method: http.MethodGet, u: srv.URL + "/admin/v1/sessions", header: []string{"Host", "localhost:9090"}, wantStatus: http.StatusOK, stillActive: true},
		{name: "curl", method: http.MethodPost, u: reset, wantStatus: http.StatusOK},
	} {
		var e struct {
			Error *struct{ Code, Message string } `json:"error"`
		}
		var hdr []string
		for i := 0; i+1 < len(tt.header); i += 2 {
			hdr = append(hdr, tt.header[i], tt.header[i+1])
		}
		got := doHost(t, tt.method, tt.u, &e, hdr...)
		if got != tt.wantStatus {
			t.Errorf("%s: got %d, want %d", tt.name, got, tt.wantStatus)
		}
		if got >= 400 && (e.Error == nil || e.Error.Code == "") {
			t.Errorf("%s: got no error in OpenAI's shape", tt.name)
		}
		sess, _, _ := s.Session(ctx, id)
		if sess.Active != tt.stillActive {
			t.Errorf("%s: session active %v, want %v", tt.name, sess.Active, tt.stillActive)
		}
	}
}

// doHost is do, with a Host header honoured (net/http sends req.Host).
func doHost(t *testing.T, method, u string, out any, header ...string) int {
	t.Helper()
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		if header[i] == "Host" {
			req.Host = header[i+1]
			continue
		}
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if out != nil && len(raw) > 0 {
		_ = json.Unmarshal(raw, out)
	}
	return resp.StatusCode
}

// TestTitleOfUnknownSession: an unknown session is 404 session_not_found
// on every route, the title's included.
func TestTitleOfUnknownSession(t *testing.T) {
	eachStore(t, func(t *testing.T, s Store) {
		srv := newTestAPI(t, s)
		var e struct{ Error struct{ Code string } }
		got := do(t, http.MethodPut, srv.URL+"/admin/v1/sessions/web:nobody:support/title", map[string]any{"title": "x"}, &e)
		if got != http.StatusNotFound || e.Error.Code != "session_not_found" {
			t.Errorf("got %d %q, want 404 session_not_found", got, e.Error.Code)
		}
	})
}

// TestBearerSchemeAnyCase: the scheme of Authorization is
// case-insensitive (RFC 9110, 11.1); the token is not.
func TestBearerSchemeAnyCase(t *testing.T) {
	api := New(Options{Store: history.NewMemory(), Token: "0123456789abcdef"})
	for _, tt := range []struct {
		header string
		want   int
	}{
		{"Bearer 0123456789abcdef", http.StatusOK},
		{"bearer 0123456789abcdef", http.StatusOK},
		{"BEARER 0123456789abcdef", http.StatusOK},
		{"Bearer 0123456789ABCDEF", http.StatusUnauthorized},
		{"Basic 0123456789abcdef", http.StatusUnauthorized},
		{"Bearer", http.StatusUnauthorized},
		{"", http.StatusUnauthorized},
	} {
		req := httptest.NewRequest(http.MethodGet, "/admin/v1/sessions", nil)
		req.Header.Set("Authorization", tt.header)
		w := httptest.NewRecorder()
		api.Handler().ServeHTTP(w, req)
		if w.Code != tt.want {
			t.Errorf("Authorization %q: got %d, want %d", tt.header, w.Code, tt.want)
		}
	}
}

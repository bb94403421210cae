package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
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

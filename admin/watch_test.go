package admin

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/tokens"
)

// sseLines reads a watch stream line by line on its own goroutine.
func sseLines(t *testing.T, u string, hdr map[string]string) <-chan string {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: got %s, want 200", u, resp.Status)
	}
	lines := make(chan string, 64)
	go func() { // ends with the stream
		defer close(lines)
		r := bufio.NewReader(resp.Body)
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				return
			}
			lines <- strings.TrimRight(l, "\n")
		}
	}()
	return lines
}

// until reads lines until one starts with prefix and returns it.
func until(t *testing.T, lines <-chan string, prefix string) string {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the stream ended before a line %q", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-deadline:
			t.Fatalf("no line %q in 20s", prefix)
		}
	}
}

// TestWatchHeartbeatAndQueryResume: an idle watch sends heartbeat
// comments; a watch resumed with the last_event_id query parameter (for
// EventSource polyfills) starts with what it missed, not a snapshot; the
// API's Close ends open watches.
func TestWatchHeartbeatAndQueryResume(t *testing.T) {
	s := history.NewMemory()
	t.Cleanup(func() { _ = s.Close() })
	counter, err := tokens.New("o200k_base")
	if err != nil {
		t.Fatal(err)
	}
	api := New(Options{Store: s, Counter: counter, Heartbeat: 50 * time.Millisecond})
	srv := httptest.NewServer(api.Handler())
	t.Cleanup(srv.Close)
	const id = "c:u:a"
	u := srv.URL + "/admin/v1/sessions/" + id + "/watch"

	lines := sseLines(t, u, nil)
	if got := until(t, lines, "event: "); got != "event: snapshot" {
		t.Fatalf("got %q, want the snapshot first", got)
	}
	until(t, lines, ": heartbeat")

	ctx := context.Background()
	w, err := s.Watch(ctx, id, "")
	if err != nil {
		t.Fatal(err)
	}
	last := w.Cursor().String()
	w.Close()
	if _, err := s.Append(ctx, id, history.Turn{Messages: []history.Message{{Role: history.RoleUser, Content: "missed"}}}, history.Policy{}); err != nil {
		t.Fatal(err)
	}
	resumed := sseLines(t, u+"?last_event_id="+last, nil)
	if got := until(t, resumed, "event: "); got != "event: message" {
		t.Fatalf("resumed with last_event_id: got %q, want the message it missed", got)
	}
	if got := until(t, resumed, "data: "); !strings.Contains(got, `"content":"missed"`) {
		t.Errorf("got %s, want the missed message", got)
	}

	api.Close()
	for range resumed { // ends once the API closes its watches
	}
}

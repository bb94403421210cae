package admin

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// watchStores are the stores a watch is tried on.
func watchStores(t *testing.T) map[string]func(t *testing.T) Store {
	return map[string]func(t *testing.T) Store{
		"memory": func(t *testing.T) Store {
			s := history.NewMemory()
			t.Cleanup(func() { _ = s.Close() })
			return s
		},
		"redis": func(t *testing.T) Store {
			s := history.NewRedis(redistest.Start(t).Client(t), "t")
			t.Cleanup(func() { _ = s.Close() })
			return s
		},
	}
}

// TestWatchEventIDs: an id that is not a watch event's gets 400
// invalid_value (header or query), never a store failure; an id of the
// right form whose events this session does not have gets a snapshot; a
// session never seen gets a snapshot with no conversation.
func TestWatchEventIDs(t *testing.T) {
	bad := []string{"abc", "1-0", "1-0_", "_0-0", "1-0_0-0_0-0", "-1-0_0-0", "1-0_0-x", "99999999999999999999-0_0-0", "1-0_-0", "1.5-0_0-0"}
	unknown := []string{"1-0_1-0", "+1-0_0-0", "9223372036854775807-9223372036854775807_0-0", "0-0_1-1"}
	for name, newStore := range watchStores(t) {
		t.Run(name, func(t *testing.T) {
			s := newStore(t)
			srv := newTestAPI(t, s)
			const id = "c:u:a"
			base := srv.URL + "/admin/v1/sessions/" + id + "/watch"
			for _, last := range bad {
				for _, viaQuery := range []bool{false, true} {
					req, _ := http.NewRequest(http.MethodGet, base, nil)
					if viaQuery {
						req.URL.RawQuery = "last_event_id=" + url.QueryEscape(last)
					} else {
						req.Header.Set("Last-Event-ID", last)
					}
					resp, err := http.DefaultClient.Do(req)
					if err != nil {
						t.Fatal(err)
					}
					var e struct {
						Error struct{ Message, Type, Code string }
					}
					_ = json.NewDecoder(resp.Body).Decode(&e)
					resp.Body.Close()
					if resp.StatusCode != http.StatusBadRequest || e.Error.Code != "invalid_value" || e.Error.Message == "" {
						t.Errorf("id %q (query %v): got %d %+v, want 400 invalid_value", last, viaQuery, resp.StatusCode, e.Error)
					}
				}
			}
			for _, last := range unknown {
				lines := sseLines(t, base, map[string]string{"Last-Event-ID": last})
				if got := until(t, lines, "event: "); got != "event: snapshot" {
					t.Errorf("id %q: got %q, want a snapshot", last, got)
				}
				if got := until(t, lines, "data: "); !strings.Contains(got, `"conversation":null`) {
					t.Errorf("id %q: got %s, want no conversation", last, got)
				}
			}
		})
	}
}

// TestWatchSurvivesEraseAndReset: a session erased, then reset, while a
// watch is open: the watch goes on and shows the turns recorded after
// either; a watcher that reconnects with an id from before the erase gets
// a fresh snapshot, without the erased messages.
func TestWatchSurvivesEraseAndReset(t *testing.T) {
	for name, newStore := range watchStores(t) {
		t.Run(name, func(t *testing.T) {
			s := newStore(t)
			srv := newTestAPI(t, s)
			const id = "c:u:a"
			u := srv.URL + "/admin/v1/sessions/" + id + "/watch"
			ctx := context.Background()
			turn := func(text string) {
				t.Helper()
				if _, err := s.Append(ctx, id, history.Turn{NowMs: time.Now().UnixMilli(), Messages: []history.Message{{Role: history.RoleUser, Content: text}}}, history.Policy{}); err != nil {
					t.Fatal(err)
				}
			}
			turn("before")
			lines := sseLines(t, u, nil)
			until(t, lines, "event: snapshot")
			turn("first")
			idLine := until(t, lines, "id: ")
			if got := until(t, lines, "data: "); !strings.Contains(got, `"first"`) {
				t.Fatalf("got %s, want the first message", got)
			}
			old := strings.TrimPrefix(idLine, "id: ")

			if _, err := s.Erase(ctx, id); err != nil {
				t.Fatal(err)
			}
			time.Sleep(5 * time.Millisecond) // a new stream's ids come after the erased one's
			turn("after erase")
			if got := until(t, lines, "data: "); !strings.Contains(got, `"after erase"`) {
				t.Fatalf("got %s, want the message recorded after the erase", got)
			}
			if _, err := s.Reset(ctx, id); err != nil {
				t.Fatal(err)
			}
			turn("after reset")
			if got := until(t, lines, "data: "); !strings.Contains(got, `"after reset"`) {
				t.Fatalf("got %s, want the message recorded after the reset", got)
			}

			again := sseLines(t, u, map[string]string{"Last-Event-ID": old})
			if got := until(t, again, "event: "); got != "event: snapshot" {
				t.Fatalf("reconnect with an id from before the erase: got %q, want a snapshot", got)
			}
			if got := until(t, again, "data: "); strings.Contains(got, `"first"`) || strings.Contains(got, `"before"`) {
				t.Errorf("the snapshot shows erased messages: %s", got)
			}
		})
	}
}

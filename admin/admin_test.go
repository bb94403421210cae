package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"testing"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/tokens"
)

var _ Store = (*history.MemoryStore)(nil)
var _ Store = (*history.RedisStore)(nil)

func newTestAPI(t *testing.T, s Store) *httptest.Server {
	t.Helper()
	counter, err := tokens.New("o200k_base")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(New(Options{Store: s, Counter: counter}).Handler())
	t.Cleanup(srv.Close)
	return srv
}

func getJSON(t *testing.T, u string, out any) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: got %s, want 200", u, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		t.Fatal(err)
	}
}

// TestFlatPagesSkipToolMessages: a page of text messages in a conversation
// made mostly of tool calls takes several reads of the store, forward and
// back, and loses nothing at the edges of those reads.
func TestFlatPagesSkipToolMessages(t *testing.T) {
	ctx := context.Background()
	s := history.NewMemory()
	const id = "c:u:a"
	var want []string
	for i := 0; i < 5; i++ {
		msgs := []history.Message{{Role: history.RoleUser, Content: fmt.Sprintf("q%d", i)}}
		for j := 0; j < 70; j++ { // more than one read of the store
			call := fmt.Sprintf("call_%d_%d", i, j)
			msgs = append(msgs,
				history.Message{Role: history.RoleAssistant, ContentNull: true, ToolCalls: json.RawMessage(`[{"id":"` + call + `","type":"function","function":{"name":"f","arguments":"{}"}}]`)},
				history.Message{Role: history.RoleTool, ToolCallID: call, Content: "r"})
		}
		msgs = append(msgs, history.Message{Role: history.RoleAssistant, Content: fmt.Sprintf("a%d", i)})
		if _, err := s.Append(ctx, id, history.Turn{Messages: msgs, NowMs: int64(1000 + i)}, history.Policy{}); err != nil {
			t.Fatal(err)
		}
		want = append(want, fmt.Sprintf("q%d", i), fmt.Sprintf("a%d", i))
	}
	srv := newTestAPI(t, s)
	base := srv.URL + "/admin/v1/sessions/" + url.PathEscape(id) + "/messages?limit=3"
	for _, dir := range []struct {
		name    string
		first   string
		next    func(Page[Message]) string
		prepend bool
	}{
		{name: "forward", first: base, next: func(p Page[Message]) string { return base + "&after=" + *p.NextAfter }},
		{name: "back", first: base + "&newest=true", next: func(p Page[Message]) string { return base + "&before=" + *p.NextBefore }, prepend: true},
	} {
		var got []string
		u := dir.first
		for pages := 0; ; pages++ {
			var p Page[Message]
			getJSON(t, u, &p)
			var texts []string
			for _, m := range p.Items {
				texts = append(texts, m.Content)
			}
			if dir.prepend {
				got = append(texts, got...)
			} else {
				got = append(got, texts...)
			}
			if !p.HasMore {
				break
			}
			if pages > 10 {
				t.Fatalf("%s: more than 10 pages", dir.name)
			}
			u = dir.next(p)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %q, want %q", dir.name, got, want)
		}
	}
}

func TestFlatView(t *testing.T) {
	tests := []struct {
		name string
		m    history.Message
		want string // "" means left out
	}{
		{name: "user text", m: history.Message{Role: "user", Content: "hi"}, want: "hi"},
		{name: "user parts", m: history.Message{Role: "user", Parts: json.RawMessage(`[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"u"}},{"type":"text","text":"here"}]`)}, want: "look\nhere"},
		{name: "only an image", m: history.Message{Role: "user", Parts: json.RawMessage(`[{"type":"image_url","image_url":{"url":"u"}}]`)}},
		{name: "assistant text with a call", m: history.Message{Role: "assistant", Content: "Let me check.", ToolCalls: json.RawMessage(`[]`), Kind: history.KindToolCall}, want: "Let me check."},
		{name: "call only", m: history.Message{Role: "assistant", ContentNull: true, ToolCalls: json.RawMessage(`[{}]`), Kind: history.KindToolCall}},
		{name: "refusal", m: history.Message{Role: "assistant", Refusal: "I can't."}, want: "I can't."},
		{name: "tool result", m: history.Message{Role: "tool", Content: "21"}},
		{name: "summary", m: history.Message{Role: "system", Kind: history.KindSummary, Content: "earlier"}},
	}
	for _, tt := range tests {
		got, ok := FlatView(tt.m)
		if ok != (tt.want != "") || got.Content != tt.want {
			t.Errorf("%s: got %q (%v), want %q", tt.name, got.Content, ok, tt.want)
		}
	}
}

// TestEraseUserOverManyPages: a user with more sessions than one page of
// the list loses them all.
func TestEraseUserOverManyPages(t *testing.T) {
	ctx := context.Background()
	s := history.NewMemory()
	const n = maxLimit + 120
	for i := 0; i < n; i++ {
		msgs := []history.Message{{Role: history.RoleUser, Content: "hi"}}
		if _, err := s.Append(ctx, fmt.Sprintf("c%d:dan:a", i), history.Turn{Messages: msgs, NowMs: int64(1000 + i%7)}, history.Policy{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Append(ctx, "c:eve:a", history.Turn{Messages: []history.Message{{Role: history.RoleUser, Content: "hi"}}, NowMs: 1}, history.Policy{}); err != nil {
		t.Fatal(err)
	}
	srv := newTestAPI(t, s)
	req, _ := http.NewRequest(http.MethodDelete, srv.URL+"/admin/v1/users/dan", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var out UserErased
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if out.Sessions != n {
		t.Errorf("got %d sessions erased, want %d", out.Sessions, n)
	}
	page, err := s.Sessions(ctx, history.SessionQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if page.Total != 1 || page.Sessions[0].ID != "c:eve:a" {
		t.Errorf("left: got %+v, want only c:eve:a", page)
	}
}

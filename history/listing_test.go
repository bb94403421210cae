package history

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// testAdminConformance runs the behaviour the conversations API needs of
// every store: listing, titles, message ranges, conversation metadata,
// retention of ended conversations, expiry and parity.
func testAdminConformance(t *testing.T, newFixture func(t *testing.T) fixture) {
	ctx := context.Background()

	t.Run("listing filters and totals", func(t *testing.T) {
		s := newFixture(t).store
		ids := []string{"web:ann:support", "web:bob:support", "api:ann:sales", "api:cat:support", "web:ann:sales", "loose"}
		for i, id := range ids {
			appendQA(t, s, id, i, t0+int64(i+1), Policy{})
		}
		_, err := s.Reset(ctx, "api:cat:support")
		mustNoErr(t, err)
		all := []string{"loose", "web:ann:sales", "api:cat:support", "api:ann:sales", "web:bob:support", "web:ann:support"}
		tests := []struct {
			name string
			q    SessionQuery
			want []string
		}{
			{name: "all", q: SessionQuery{}, want: all},
			{name: "channel", q: SessionQuery{Channel: "web"}, want: []string{"web:ann:sales", "web:bob:support", "web:ann:support"}},
			{name: "user", q: SessionQuery{User: "ann"}, want: []string{"web:ann:sales", "api:ann:sales", "web:ann:support"}},
			{name: "agent", q: SessionQuery{Agent: "support"}, want: []string{"api:cat:support", "web:bob:support", "web:ann:support"}},
			{name: "channel and agent", q: SessionQuery{Channel: "web", Agent: "support"}, want: []string{"web:bob:support", "web:ann:support"}},
			{name: "all three parts", q: SessionQuery{Channel: "web", User: "ann", Agent: "sales"}, want: []string{"web:ann:sales"}},
			{name: "no such channel", q: SessionQuery{Channel: "sms"}, want: nil},
			{name: "since", q: SessionQuery{SinceMs: t0 + 4}, want: all[:3]},
			{name: "until", q: SessionQuery{UntilMs: t0 + 2}, want: all[4:]},
			{name: "since and until and channel", q: SessionQuery{SinceMs: t0 + 2, UntilMs: t0 + 5, Channel: "web"}, want: []string{"web:ann:sales", "web:bob:support"}},
			{name: "match on metadata", q: SessionQuery{Match: func(s Session) bool { return !s.Active }}, want: []string{"api:cat:support"}},
			{name: "match on title", q: SessionQuery{Match: func(s Session) bool { return s.Title == "q2" || s.Title == "q4" }}, want: []string{"web:ann:sales", "api:ann:sales"}},
			{name: "match on the id", q: SessionQuery{MatchID: func(id string) bool { return strings.HasSuffix(id, "sales") }}, want: []string{"web:ann:sales", "api:ann:sales"}},
			{name: "match on the id with a part", q: SessionQuery{Channel: "web", MatchID: func(id string) bool { return strings.Contains(id, "ann") }}, want: []string{"web:ann:sales", "web:ann:support"}},
			{name: "match with a part", q: SessionQuery{User: "ann", Match: func(s Session) bool { return s.LastActiveMs > t0+1 }}, want: []string{"web:ann:sales", "api:ann:sales"}},
		}
		for _, tt := range tests {
			if got := sessionIDs(t, s, tt.q); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("%s: got %q, want %q", tt.name, got, tt.want)
			}
			// Paging through the same query gives the same sessions, once
			// each, with the same total on every page.
			for _, limit := range []int{1, 2} {
				q := tt.q
				q.Limit = limit
				pages := pageIDs(t, s, q)
				if got := slices.Concat(pages...); !reflect.DeepEqual(got, tt.want) {
					t.Errorf("%s by %d: got %q, want %q", tt.name, limit, pages, tt.want)
				}
				for i, p := range pages[:len(pages)-1] {
					if len(p) != limit {
						t.Errorf("%s by %d: page %d has %d sessions, want %d", tt.name, limit, i, len(p), limit)
					}
				}
			}
		}
		page, err := s.Sessions(ctx, SessionQuery{Agent: "support", Limit: 1})
		mustNoErr(t, err)
		if page.Total != 3 || len(page.Sessions) != 1 {
			t.Errorf("got %d sessions of total %d, want 1 of 3", len(page.Sessions), page.Total)
		}
		got := page.Sessions[0]
		want := Session{ID: "api:cat:support", ConversationID: "c1", Title: "q3", CreatedMs: t0 + 4, LastActiveMs: t0 + 4, MessageCount: 2}
		if got != want {
			t.Errorf("listed session: got %+v, want %+v", got, want)
		}
		if _, err := s.Sessions(ctx, SessionQuery{Cursor: "not a cursor"}); err == nil || !strings.Contains(err.Error(), ErrBadCursor.Error()) {
			t.Errorf("bad cursor: got %v, want ErrBadCursor", err)
		}
	})

	t.Run("pages stay consistent while turns arrive", func(t *testing.T) {
		s := newFixture(t).store
		for i, id := range []string{"c:a:x", "c:b:x", "c:c:x", "c:d:x", "c:e:x"} {
			appendQA(t, s, id, i, t0+int64(i), Policy{})
		}
		page, err := s.Sessions(ctx, SessionQuery{Limit: 2})
		mustNoErr(t, err)
		seen := map[string]int{}
		for _, ss := range page.Sessions {
			seen[ss.ID]++
		}
		// While the client pages: a session it saw moves to the top, and
		// a new one arrives.
		appendQA(t, s, "c:e:x", 9, t0+100, Policy{})
		appendQA(t, s, "c:f:x", 0, t0+101, Policy{})
		q := SessionQuery{Limit: 2, Cursor: page.NextCursor}
		var rest []string
		for q.Cursor != "" {
			page, err := s.Sessions(ctx, q)
			mustNoErr(t, err)
			if page.Total != 6 {
				t.Errorf("got total %d, want 6 now", page.Total)
			}
			for _, ss := range page.Sessions {
				seen[ss.ID]++
				rest = append(rest, ss.ID)
			}
			q.Cursor = page.NextCursor
		}
		if want := []string{"c:c:x", "c:b:x", "c:a:x"}; !reflect.DeepEqual(rest, want) {
			t.Errorf("later pages: got %q, want %q", rest, want)
		}
		for id, n := range seen {
			if n > 1 {
				t.Errorf("%s listed %d times, want once", id, n)
			}
		}
	})

	t.Run("sessions of equal activity page by id", func(t *testing.T) {
		s := newFixture(t).store
		for _, id := range []string{"c:a:x", "c:b:x", "c:c:x", "c:d:x"} {
			appendQA(t, s, id, 0, t0, Policy{})
		}
		pages := pageIDs(t, s, SessionQuery{Limit: 3})
		if want := [][]string{{"c:d:x", "c:c:x", "c:b:x"}, {"c:a:x"}}; !reflect.DeepEqual(pages, want) {
			t.Errorf("got %q, want %q", pages, want)
		}
	})

	t.Run("sorted by cost", func(t *testing.T) {
		s := newFixture(t).store
		// id: cost in nano-USD, given in two turns to check totals add up.
		costs := []struct {
			id    string
			nanos int64
		}{{"web:a:x", 500}, {"web:b:x", 9000}, {"api:c:x", 0}, {"web:d:y", 9000}, {"web:e:x", 40}, {"api:f:y", 7000}}
		for i, c := range costs {
			for half := range 2 {
				_, err := s.Append(ctx, c.id, Turn{Messages: qa(i), NowMs: t0 + int64(i*2+half), Usage: Usage{Requests: 1, CostNanos: c.nanos / 2}}, Policy{})
				mustNoErr(t, err)
			}
		}
		tests := []struct {
			name string
			q    SessionQuery
			want []string
		}{
			{name: "all", q: SessionQuery{ByCost: true}, want: []string{"web:d:y", "web:b:x", "api:f:y", "web:a:x", "web:e:x", "api:c:x"}},
			{name: "channel", q: SessionQuery{ByCost: true, Channel: "web"}, want: []string{"web:d:y", "web:b:x", "web:a:x", "web:e:x"}},
			{name: "channel and agent", q: SessionQuery{ByCost: true, Channel: "web", Agent: "x"}, want: []string{"web:b:x", "web:a:x", "web:e:x"}},
			{name: "since", q: SessionQuery{ByCost: true, SinceMs: t0 + 6}, want: []string{"web:d:y", "api:f:y", "web:e:x"}},
			{name: "match", q: SessionQuery{ByCost: true, Match: func(s Session) bool { return s.Totals.CostNanos < 8000 }}, want: []string{"api:f:y", "web:a:x", "web:e:x", "api:c:x"}},
		}
		for _, tt := range tests {
			if got := sessionIDs(t, s, tt.q); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("%s: got %q, want %q", tt.name, got, tt.want)
			}
			for _, limit := range []int{1, 2, 4} {
				q := tt.q
				q.Limit = limit
				if got := slices.Concat(pageIDs(t, s, q)...); !reflect.DeepEqual(got, tt.want) {
					t.Errorf("%s by %d: got %q, want %q", tt.name, limit, got, tt.want)
				}
			}
		}
		// Costs only grow: a session seen on the first page that costs more
		// meanwhile is not listed again, and one that passes the cursor
		// from below is not listed after it.
		page, err := s.Sessions(ctx, SessionQuery{ByCost: true, Limit: 2})
		mustNoErr(t, err)
		_, err = s.Append(ctx, "web:b:x", Turn{NowMs: t0 + 50, Usage: Usage{CostNanos: 100}}, Policy{})
		mustNoErr(t, err)
		_, err = s.Append(ctx, "web:e:x", Turn{NowMs: t0 + 51, Usage: Usage{CostNanos: 100000}}, Policy{})
		mustNoErr(t, err)
		rest := slices.Concat(pageIDs(t, s, SessionQuery{ByCost: true, Limit: 2, Cursor: page.NextCursor})...)
		if want := []string{"api:f:y", "web:a:x", "api:c:x"}; !reflect.DeepEqual(rest, want) {
			t.Errorf("after the first page, costs grown: got %q, want %q", rest, want)
		}
		// A cursor of one order is refused by the other.
		if _, err := s.Sessions(ctx, SessionQuery{Cursor: page.NextCursor}); err == nil || !strings.Contains(err.Error(), ErrBadCursor.Error()) {
			t.Errorf("cost cursor in the activity order: got %v, want ErrBadCursor", err)
		}
		byActivity, err := s.Sessions(ctx, SessionQuery{Limit: 1})
		mustNoErr(t, err)
		if _, err := s.Sessions(ctx, SessionQuery{ByCost: true, Cursor: byActivity.NextCursor}); err == nil || !strings.Contains(err.Error(), ErrBadCursor.Error()) {
			t.Errorf("activity cursor in the cost order: got %v, want ErrBadCursor", err)
		}
	})

	t.Run("a turn's usage is on its last message", func(t *testing.T) {
		s := newFixture(t).store
		u := Usage{PromptTokens: 120, CompletionTokens: 30, CachedTokens: 64, HistoryTokens: 90, Requests: 1, CostNanos: 4500}
		_, err := s.Append(ctx, "c:u:a", Turn{Messages: qa(1), NowMs: t0, Usage: u}, Policy{})
		mustNoErr(t, err)
		// A turn that counts no request (imported by hand) carries none.
		_, err = s.Append(ctx, "c:u:a", Turn{Messages: qa(2), NowMs: t0 + 1}, Policy{})
		mustNoErr(t, err)
		_, msgs, err := s.ReadMessages(ctx, "c:u:a", MessageQuery{})
		mustNoErr(t, err)
		if len(msgs) != 4 {
			t.Fatalf("got %d messages, want 4", len(msgs))
		}
		for i, m := range msgs {
			switch {
			case i == 1 && (m.Usage == nil || *m.Usage != u):
				t.Errorf("message %d: got usage %+v, want %+v", i, m.Usage, u)
			case i != 1 && m.Usage != nil:
				t.Errorf("message %d: got usage %+v, want none", i, *m.Usage)
			}
		}
	})

	t.Run("scans over many sessions of equal activity", func(t *testing.T) {
		// More sessions of one time than a batch of the index holds: every
		// read of the index after the first starts among equal scores.
		s := newFixture(t).store
		const n = 1300
		want := make([]string, 0, n)
		for i := range n {
			id := fmt.Sprintf("c:u%04d:x", i)
			appendQA(t, s, id, 0, t0+int64(i/1100), Policy{})
		}
		// Activity descending, then id descending: i descending.
		for i := n - 1; i >= 0; i-- {
			want = append(want, fmt.Sprintf("c:u%04d:x", i))
		}
		all := func(Session) bool { return true }
		for _, tt := range []struct {
			name string
			q    SessionQuery
		}{
			{"one page", SessionQuery{}},
			{"one page with a match", SessionQuery{Match: all}},
			{"pages", SessionQuery{Limit: 97}},
			{"pages with a match", SessionQuery{Limit: 97, Match: all}},
		} {
			got := slices.Concat(pageIDs(t, s, tt.q)...)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%s: got %d sessions, want %d in order", tt.name, len(got), len(want))
			}
		}
	})

	t.Run("titles derived and set", func(t *testing.T) {
		s := newFixture(t).store
		long := "  Hello there,\n\tI would like to know how the quarterly pipeline review went for Acme"
		turn := []Message{
			{Role: RoleTool, ToolCallID: "x", Content: "not a title"},
			{Role: RoleUser, Parts: json.RawMessage(`[{"type":"image_url","image_url":{"url":"u"}},{"type":"text","text":"` + strings.ReplaceAll(strings.ReplaceAll(long, "\n", `\n`), "\t", `\t`) + `"}]`)},
			{Role: RoleAssistant, Content: "sure"},
		}
		_, err := s.Append(ctx, session, Turn{Messages: turn, NowMs: t0}, Policy{})
		mustNoErr(t, err)
		appendQA(t, s, session, 1, t0+1, Policy{})
		const derived = "Hello there, I would like to know how the quarterly pipeline…"
		checkTitle := func(name, want string) {
			t.Helper()
			sess, _, err := s.Session(ctx, session)
			mustNoErr(t, err)
			if sess.Title != want {
				t.Errorf("%s: got session title %q, want %q", name, sess.Title, want)
			}
			page, err := s.Sessions(ctx, SessionQuery{})
			mustNoErr(t, err)
			if len(page.Sessions) != 1 || page.Sessions[0].Title != want {
				t.Errorf("%s: got listed %+v, want title %q", name, page.Sessions, want)
			}
		}
		checkTitle("derived from the first user message", derived)

		conv, err := s.SetTitle(ctx, session, "", "Q3 pipeline review")
		mustNoErr(t, err)
		if conv != "c1" {
			t.Errorf("set title: got conversation %q, want c1", conv)
		}
		checkTitle("set", "Q3 pipeline review")

		_, err = s.Reset(ctx, session)
		mustNoErr(t, err)
		appendQA(t, s, session, 2, t0+2, Policy{})
		checkTitle("a new conversation has its own", "q2")

		conv, err = s.SetTitle(ctx, session, "c1", "")
		mustNoErr(t, err)
		if conv != "c1" {
			t.Errorf("clear title of c1: got %q, want c1", conv)
		}
		for _, tt := range []struct{ conv, title string }{{"c9", "x"}, {"nope", "x"}} {
			if conv, err := s.SetTitle(ctx, session, tt.conv, tt.title); err != nil || conv != "" {
				t.Errorf("title of unknown %s: got %q, %v, want none", tt.conv, conv, err)
			}
		}
		if conv, err := s.SetTitle(ctx, "unknown", "", "x"); err != nil || conv != "" {
			t.Errorf("title of an unknown session: got %q, %v, want none", conv, err)
		}
		_, err = s.SetTitle(ctx, session, "c2", "Second")
		mustNoErr(t, err)
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		got := [][2]any{}
		for _, c := range convs {
			got = append(got, [2]any{c.Title, c.TitleSet})
		}
		if want := [][2]any{{derived, false}, {"Second", true}}; !reflect.DeepEqual(got, want) {
			t.Errorf("conversation titles: got %v, want %v", got, want)
		}
	})

	t.Run("conversation metadata", func(t *testing.T) {
		s := newFixture(t).store
		if convs, err := s.Conversations(ctx, "unknown"); err != nil || convs != nil {
			t.Errorf("unknown session: got %v, %v, want nil", convs, err)
		}
		r1 := appendQA(t, s, session, 0, t0, Policy{})
		r2 := appendQA(t, s, session, 1, t0+5, Policy{})
		_, err := s.Reset(ctx, session)
		mustNoErr(t, err)
		r3 := appendQA(t, s, session, 2, t0+9, Policy{})
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		want := []Conversation{
			{ID: "c1", Title: "q0", StartID: r1.IDs[0], LastID: r2.IDs[1], CreatedMs: t0, LastMs: t0 + 5, MessageCount: 4},
			{ID: "c2", Title: "q2", StartID: r3.IDs[0], LastID: r3.IDs[1], CreatedMs: t0 + 9, LastMs: t0 + 9, MessageCount: 2, Current: true},
		}
		if !reflect.DeepEqual(convs, want) {
			t.Errorf("got %+v\nwant %+v", convs, want)
		}
		_, err = s.Reset(ctx, session)
		mustNoErr(t, err)
		convs, err = s.Conversations(ctx, session)
		mustNoErr(t, err)
		if convs[1].Current {
			t.Errorf("after reset: got c2 current, want not")
		}
	})

	t.Run("read messages by range", func(t *testing.T) {
		s := newFixture(t).store
		var ids []string
		for i := 0; i < 5; i++ {
			ids = append(ids, appendQA(t, s, session, i, t0+int64(i), Policy{}).IDs...)
		}
		read := func(q MessageQuery) (string, []string) {
			t.Helper()
			conv, msgs, err := s.ReadMessages(ctx, session, q)
			mustNoErr(t, err)
			return conv, contents(msgs)
		}
		all := []string{"q0", "a0", "q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"}
		tests := []struct {
			name string
			q    MessageQuery
			want []string
		}{
			{name: "all", q: MessageQuery{}, want: all},
			{name: "first page", q: MessageQuery{Limit: 3}, want: all[:3]},
			{name: "after", q: MessageQuery{After: ids[2], Limit: 3}, want: all[3:6]},
			{name: "after, to the end", q: MessageQuery{After: ids[7]}, want: all[8:]},
			{name: "after the last", q: MessageQuery{After: ids[9]}, want: nil},
			{name: "before", q: MessageQuery{Before: ids[3]}, want: all[:3]},
			{name: "before, oldest of the range", q: MessageQuery{Before: ids[6], Limit: 2}, want: all[:2]},
			{name: "before, newest of the range", q: MessageQuery{Before: ids[6], Limit: 2, Newest: true}, want: all[4:6]},
			{name: "newest", q: MessageQuery{Limit: 3, Newest: true}, want: all[7:]},
			{name: "between", q: MessageQuery{After: ids[1], Before: ids[5]}, want: all[2:5]},
			{name: "empty between", q: MessageQuery{After: ids[5], Before: ids[4]}, want: nil},
			{name: "ids outside the conversation", q: MessageQuery{After: "1-0", Before: "99999999999999-0"}, want: all},
			{name: "named conversation", q: MessageQuery{Conversation: "c1", Limit: 1}, want: all[:1]},
		}
		for _, tt := range tests {
			conv, got := read(tt.q)
			if !reflect.DeepEqual(got, tt.want) || conv != "c1" {
				t.Errorf("%s: got %q in %q, want %q in c1", tt.name, got, conv, tt.want)
			}
		}
		_, err := s.Reset(ctx, session)
		mustNoErr(t, err)
		appendQA(t, s, session, 5, t0+10, Policy{})
		if conv, got := read(MessageQuery{}); conv != "c2" || !reflect.DeepEqual(got, []string{"q5", "a5"}) {
			t.Errorf("current after reset: got %q in %q, want q5 a5 in c2", got, conv)
		}
		if conv, got := read(MessageQuery{Conversation: "c1", After: ids[7]}); conv != "c1" || !reflect.DeepEqual(got, all[8:]) {
			t.Errorf("ended conversation: got %q in %q, want %q in c1", got, conv, all[8:])
		}
		if conv, got := read(MessageQuery{Conversation: "c7"}); conv != "" || got != nil {
			t.Errorf("unknown conversation: got %q in %q, want nothing", got, conv)
		}
		if _, _, err := s.ReadMessages(ctx, session, MessageQuery{After: "x"}); err == nil {
			t.Errorf("malformed id: got no error")
		}
	})

	t.Run("a late turn of an ended conversation stays out of the current one", func(t *testing.T) {
		s := newFixture(t).store
		appendQA(t, s, session, 0, t0, Policy{})
		_, err := s.Reset(ctx, session)
		mustNoErr(t, err)
		appendQA(t, s, session, 1, t0+1, Policy{})
		// Read from c1 before the reset, written after c2 began: the
		// session's stream now interleaves the two.
		_, err = s.Append(ctx, session, Turn{Messages: qa(2), NowMs: t0 + 2, ConversationID: "c1"}, Policy{})
		mustNoErr(t, err)
		appendQA(t, s, session, 3, t0+3, Policy{})
		for _, tt := range []struct {
			conv string
			want []string
		}{{"c1", []string{"q0", "a0", "q2", "a2"}}, {"c2", []string{"q1", "a1", "q3", "a3"}}} {
			msgs, err := s.Messages(ctx, session, tt.conv)
			mustNoErr(t, err)
			if got := contents(msgs); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("%s: got %q, want %q", tt.conv, got, tt.want)
			}
			for _, m := range msgs {
				if m.Conversation != tt.conv {
					t.Errorf("%s: got a message of %q", tt.conv, m.Conversation)
				}
			}
		}
		for n, want := range map[int][]string{1: {"a3"}, 3: {"a1", "q3", "a3"}, 10: {"q1", "a1", "q3", "a3"}} {
			w, err := s.Window(ctx, session, n, t0+4, Policy{})
			mustNoErr(t, err)
			if got := contents(w.Messages); !reflect.DeepEqual(got, want) || w.ConversationID != "c2" {
				t.Errorf("window of %d: got %q in %q, want %q in c2", n, got, w.ConversationID, want)
			}
		}
		_, msgs, err := s.ReadMessages(ctx, session, MessageQuery{Conversation: "c2", Limit: 3})
		mustNoErr(t, err)
		if got, want := contents(msgs), []string{"q1", "a1", "q3"}; !reflect.DeepEqual(got, want) {
			t.Errorf("first 3 of c2: got %q, want %q", got, want)
		}
	})

	t.Run("a turn may start a new conversation", func(t *testing.T) {
		s := newFixture(t).store
		appendQA(t, s, session, 0, t0, Policy{})
		turn := Turn{Messages: qa(1), NowMs: t0 + 1, IdempotencyKey: "new-1", NewConversation: true, ConversationID: "c1"}
		res, err := s.Append(ctx, session, turn, Policy{})
		mustNoErr(t, err)
		if !res.NewConversation || res.ConversationID != "c2" {
			t.Errorf("got %+v, want a new conversation c2 even though c1 was read", res)
		}
		// A retry of the same request starts nothing and ends nothing.
		res, err = s.Append(ctx, session, turn, Policy{})
		mustNoErr(t, err)
		if !res.Duplicate {
			t.Errorf("retry: got %+v, want a duplicate", res)
		}
		// Nor does a turn without messages.
		_, err = s.Append(ctx, session, Turn{NowMs: t0 + 2, NewConversation: true, Usage: Usage{Requests: 1}}, Policy{})
		mustNoErr(t, err)
		w, err := s.Window(ctx, session, 10, t0+3, Policy{})
		mustNoErr(t, err)
		if got, want := contents(w.Messages), []string{"q1", "a1"}; w.ConversationID != "c2" || !reflect.DeepEqual(got, want) {
			t.Errorf("got window %q in %q, want %q in c2", got, w.ConversationID, want)
		}
		old, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if got, want := contents(old), []string{"q0", "a0"}; !reflect.DeepEqual(got, want) {
			t.Errorf("c1: got %q, want %q kept", got, want)
		}
	})

	t.Run("retention trims ended conversations", func(t *testing.T) {
		s := newFixture(t).store
		p := Policy{Retention: time.Hour}
		appendQA(t, s, session, 0, t0, p)
		_, err := s.Reset(ctx, session)
		mustNoErr(t, err)
		appendQA(t, s, session, 1, t0+1, p)
		// c2 goes on; once c1's last turn is older than the retention, the
		// next turn trims it.
		appendQA(t, s, session, 2, t0+time.Hour.Milliseconds(), p)
		msgs, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if len(msgs) != 2 {
			t.Fatalf("within retention: got %q, want c1 kept", contents(msgs))
		}
		appendQA(t, s, session, 3, t0+time.Hour.Milliseconds()+1, p)
		msgs, err = s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if msgs != nil {
			t.Errorf("past retention: got %q, want c1 trimmed (nil)", contents(msgs))
		}
		msgs, err = s.Messages(ctx, session, "")
		mustNoErr(t, err)
		if got, want := contents(msgs), []string{"q1", "a1", "q2", "a2", "q3", "a3"}; !reflect.DeepEqual(got, want) {
			t.Errorf("current conversation: got %q, want %q", got, want)
		}
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		if len(convs) != 2 || !convs[0].Expired || convs[1].Expired || convs[0].MessageCount != 2 {
			t.Errorf("got %+v, want c1 expired with its count, c2 not", convs)
		}
	})

	t.Run("expired conversations and idempotency keys are not kept", func(t *testing.T) {
		f := newFixture(t)
		s := f.store
		p := Policy{Retention: time.Hour}
		const n = 200
		for i := 0; i < n; i++ {
			_, err := s.Append(ctx, "c:u"+strconvI(i)+":a", Turn{Messages: qa(i), NowMs: t0, IdempotencyKey: "k" + strconvI(i)}, p)
			mustNoErr(t, err)
		}
		// Idle sessions are never read or written again: only the store's
		// own expiry can free them.
		f.advance(t, 2*time.Hour)
		for i := 0; i < n; i += 37 {
			msgs, err := s.Messages(ctx, "c:u"+strconvI(i)+":a", "c1")
			mustNoErr(t, err)
			if msgs != nil {
				t.Errorf("session %d after retention: got %q, want nil", i, contents(msgs))
			}
		}
		if msgs, keys := f.held(t); msgs != 0 || keys != n {
			t.Errorf("after retention: got %d messages and %d idempotency keys held, want 0 and %d", msgs, keys, n)
		}
		f.advance(t, IdempotencyWindow)
		if msgs, keys := f.held(t); msgs != 0 || keys != 0 {
			t.Errorf("after the idempotency window: got %d messages and %d keys held, want none", msgs, keys)
		}
		// The sessions and their totals stay, as Redis keeps their hashes.
		if got := sessionIDs(t, s, SessionQuery{}); len(got) != n {
			t.Errorf("got %d sessions listed, want %d", len(got), n)
		}
		// A key may be used again once forgotten.
		res, err := s.Append(ctx, "c:u0:a", Turn{Messages: qa(0), NowMs: t0 + 27*time.Hour.Milliseconds(), IdempotencyKey: "k0"}, p)
		mustNoErr(t, err)
		if res.Duplicate || !res.NewConversation || res.ConversationID != "c2" {
			t.Errorf("after expiry: got %+v, want a new conversation c2", res)
		}
	})

	t.Run("empty and absent read back alike", func(t *testing.T) {
		s := newFixture(t).store
		in := []Message{
			{Role: RoleUser, Content: "hi", Parts: json.RawMessage{}},
			{Role: RoleAssistant, Content: "hello", ToolCalls: json.RawMessage{}},
		}
		_, err := s.Append(ctx, session, Turn{Messages: in, NowMs: t0}, Policy{})
		mustNoErr(t, err)
		w, err := s.Window(ctx, session, 10, t0, Policy{})
		mustNoErr(t, err)
		msgs, err := s.Messages(ctx, session, "")
		mustNoErr(t, err)
		for _, got := range [][]Message{w.Messages, msgs} {
			if len(got) != 2 || got[0].Parts != nil || got[1].ToolCalls != nil || got[1].Kind != KindMessage {
				t.Errorf("got %+v, want nil Parts and ToolCalls, and a plain message", got)
			}
		}
		for _, tt := range []struct {
			name    string
			session string
			conv    string
		}{{"unknown session", "unknown", ""}, {"unknown conversation", session, "c5"}} {
			msgs, err := s.Messages(ctx, tt.session, tt.conv)
			mustNoErr(t, err)
			if msgs != nil {
				t.Errorf("%s: got %#v, want nil", tt.name, msgs)
			}
		}
		_, err = s.Reset(ctx, session)
		mustNoErr(t, err)
		if msgs, err := s.Messages(ctx, session, ""); err != nil || msgs != nil {
			t.Errorf("after reset: got %#v, %v, want nil", msgs, err)
		}
		w, err = s.Window(ctx, session, 10, t0, Policy{})
		mustNoErr(t, err)
		if w.Messages != nil {
			t.Errorf("window after reset: got %#v, want nil", w.Messages)
		}
		page, err := s.Sessions(ctx, SessionQuery{Channel: "none"})
		mustNoErr(t, err)
		if page.Sessions != nil || page.Total != 0 || page.NextCursor != "" {
			t.Errorf("empty listing: got %#v, want nil sessions", page)
		}
	})
}

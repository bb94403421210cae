package history

import (
	"context"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// oldConversation writes a conversation the way the layout before one
// stream per session kept it: its own stream, and an entry in P:{S}:convs.
func oldConversation(t *testing.T, c redis.UniversalClient, prefix, session, conv string, created int64, ids, texts []string, ttl time.Duration) {
	t.Helper()
	ctx := context.Background()
	base := prefix + ":{" + session + "}:"
	mustNoErr(t, c.ZAdd(ctx, base+"convs", redis.Z{Score: float64(created), Member: conv}).Err())
	for i, id := range ids {
		role := RoleUser
		if i%2 == 1 {
			role = RoleAssistant
		}
		mustNoErr(t, c.XAdd(ctx, &redis.XAddArgs{Stream: base + "conv:" + conv, ID: id, Values: []any{
			"role", role, "content", texts[i], "kind", KindMessage, "tokens", "5",
			"created_ms", strconv.FormatInt(created+int64(i), 10), "status", StatusComplete,
		}}).Err())
	}
	if ttl > 0 {
		mustNoErr(t, c.PExpire(ctx, base+"conv:"+conv, ttl).Err())
	}
}

func TestRedisMigrate(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")

	// a: two old conversations whose streams began in the same millisecond.
	const a = "chat:ann:support"
	oldConversation(t, c, "hp", a, "c1", t0, []string{"5000-0", "5000-1"}, []string{"Hello, I am Ann and I like long walks", "hi Ann"}, 30*time.Minute)
	oldConversation(t, c, "hp", a, "c2", t0+10, []string{"5000-0", "5001-0"}, []string{"Still there?", "yes"}, time.Hour)
	mustNoErr(t, c.HSet(ctx, "hp:{"+a+"}:session", "conversation", "c2", "is_active", "1", "created_ms", t0,
		"last_active_ms", t0+11, "messages", 4, "conversations", 2, "requests", 2, "cost_nanos", 300).Err())
	mustNoErr(t, c.ZAdd(ctx, "hp:sessions", redis.Z{Score: float64(t0 + 11), Member: a}).Err())

	// b: an old conversation, then a turn written by this version before
	// the migration, which began c2 in the current layout.
	const b = "web:bob:sales"
	oldConversation(t, c, "hp", b, "c1", t0, []string{"4000-0", "4000-1"}, []string{"old question", "old answer"}, 0)
	mustNoErr(t, c.HSet(ctx, "hp:{"+b+"}:session", "conversation", "c1", "is_active", "1", "created_ms", t0,
		"last_active_ms", t0+1, "messages", 2, "conversations", 1).Err())
	mustNoErr(t, c.ZAdd(ctx, "hp:sessions", redis.Z{Score: float64(t0 + 1), Member: b}).Err())
	res := appendQA(t, s, b, 1, t0+20, Policy{})
	if res.ConversationID != "c2" {
		t.Fatalf("a turn on old data: got %+v, want a new conversation c2", res)
	}

	// c: only the current layout.
	const cur = "api:cat:support"
	appendQA(t, s, cur, 0, t0+30, Policy{})

	var calls int
	got, err := s.Migrate(ctx, func(MigrateResult) { calls++ })
	mustNoErr(t, err)
	if want := (MigrateResult{Sessions: 2, Current: 1, Conversations: 3, Messages: 6}); got != want || calls != 3 {
		t.Errorf("got %+v after %d calls, want %+v after 3", got, calls, want)
	}

	check := func(session, conv string, want []string) []Message {
		t.Helper()
		msgs, err := s.Messages(ctx, session, conv)
		mustNoErr(t, err)
		if got := contents(msgs); !reflect.DeepEqual(got, want) {
			t.Errorf("%s %s: got %q, want %q", session, conv, got, want)
		}
		return msgs
	}
	c1 := check(a, "c1", []string{"Hello, I am Ann and I like long walks", "hi Ann"})
	c2 := check(a, "c2", []string{"Still there?", "yes"})
	ids := []string{c1[0].ID, c1[1].ID, c2[0].ID, c2[1].ID}
	if want := []string{"5000-0", "5000-1", "5000-2", "5001-0"}; !reflect.DeepEqual(ids, want) {
		t.Errorf("ids: got %q, want %q (kept, one moved up a sequence number)", ids, want)
	}
	if c1[0].Tokens != 5 || c1[0].CreatedMs != t0 || c1[0].Kind != KindMessage || c1[0].Conversation != "c1" {
		t.Errorf("fields: got %+v", c1[0])
	}
	convs, err := s.Conversations(ctx, a)
	mustNoErr(t, err)
	wantConvs := []Conversation{
		{ID: "c1", Title: "Hello, I am Ann and I like long walks", StartID: "5000-0", LastID: "5000-1", CreatedMs: t0, LastMs: t0 + 1, MessageCount: 2},
		{ID: "c2", Title: "Still there?", StartID: "5000-2", LastID: "5001-0", CreatedMs: t0 + 10, LastMs: t0 + 11, MessageCount: 2, Current: true},
	}
	if !reflect.DeepEqual(convs, wantConvs) {
		t.Errorf("conversations:\ngot  %+v\nwant %+v", convs, wantConvs)
	}
	if ttl := c.PTTL(ctx, "hp:{"+a+"}:messages").Val(); ttl <= 59*time.Minute || ttl > time.Hour {
		t.Errorf("TTL: got %s, want the longest of the old streams' (1h)", ttl)
	}
	if ttl := c.PTTL(ctx, "hp:{"+b+"}:messages").Val(); ttl != -1 {
		t.Errorf("TTL of b: got %s, want none: its old stream had none", ttl)
	}
	// The next turn goes on in c2, with c2 in its window.
	w, err := s.Window(ctx, a, 10, t0+12, Policy{})
	mustNoErr(t, err)
	if w.ConversationID != "c2" || !reflect.DeepEqual(contents(w.Messages), []string{"Still there?", "yes"}) {
		t.Errorf("window: got %q in %q, want c2's", contents(w.Messages), w.ConversationID)
	}
	if r := appendQA(t, s, a, 7, t0+13, Policy{}); r.NewConversation || r.ConversationID != "c2" {
		t.Errorf("next turn: got %+v, want it in c2", r)
	}

	check(b, "c1", []string{"old question", "old answer"})
	check(b, "c2", []string{"q1", "a1"})
	w, err = s.Window(ctx, b, 10, t0+21, Policy{})
	mustNoErr(t, err)
	if w.ConversationID != "c2" {
		t.Errorf("b's window: got %q, want c2", w.ConversationID)
	}

	// Nothing of the old layout is left, and every session is in the part
	// indexes.
	for _, k := range scanKeys(t, c, "*") {
		for _, suffix := range []string{":convs", ":conv:c1", ":conv:c2", ":migrating"} {
			if len(k) > len(suffix) && k[len(k)-len(suffix):] == suffix {
				t.Errorf("key %s left", k)
			}
		}
	}
	for _, q := range []SessionQuery{{User: "ann"}, {Agent: "sales"}, {Channel: "api"}} {
		if page, err := s.Sessions(ctx, q); err != nil || len(page.Sessions) != 1 {
			t.Errorf("%+v: got %+v, %v, want one session", q, page, err)
		}
	}

	// Again: nothing to move.
	got, err = s.Migrate(ctx, nil)
	mustNoErr(t, err)
	if want := (MigrateResult{Current: 3}); got != want {
		t.Errorf("second run: got %+v, want %+v", got, want)
	}
}

// TestRedisEraseOldLayout: erasing a session not yet migrated deletes its
// old streams too.
func TestRedisEraseOldLayout(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	const a = "chat:ann:support"
	oldConversation(t, c, "hp", a, "c1", t0, []string{"5000-0", "5000-1"}, []string{"q", "a"}, 0)
	oldConversation(t, c, "hp", a, "c2", t0+10, []string{"6000-0"}, []string{"q2"}, 0)
	mustNoErr(t, c.HSet(ctx, "hp:{"+a+"}:session", "conversation", "c2", "is_active", "1", "conversations", 2).Err())
	mustNoErr(t, c.ZAdd(ctx, "hp:sessions", redis.Z{Score: float64(t0), Member: a}).Err())
	e, err := s.Erase(ctx, a)
	mustNoErr(t, err)
	if want := (Erased{Found: true, Conversations: 2, Messages: 3}); e != want {
		t.Errorf("got %+v, want %+v", e, want)
	}
	if keys := scanKeys(t, c, "*"); len(keys) != 0 {
		t.Errorf("got keys %q left, want none", keys)
	}
}

// TestRedisMigrateWhileSessionsMove: sessions that become active while
// migrate walks the index (proxies serve meanwhile) move to its end; none
// of the others is passed over.
func TestRedisMigrateWhileSessionsMove(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	const n = migrateBatch + 20
	pipe := c.Pipeline()
	for i := range n {
		id := "web:u" + strconv.Itoa(i) + ":a"
		base := "hp:{" + id + "}:"
		pipe.ZAdd(ctx, base+"convs", redis.Z{Score: float64(t0), Member: "c1"})
		pipe.XAdd(ctx, &redis.XAddArgs{Stream: base + "conv:c1", ID: "1000-0", Values: []any{"role", RoleUser, "content", "hi"}})
		pipe.HSet(ctx, base+"session", "conversation", "c1", "is_active", "1", "conversations", 1, "messages", 1)
		pipe.ZAdd(ctx, "hp:sessions", redis.Z{Score: float64(t0 + int64(i)), Member: id})
	}
	_, err := pipe.Exec(ctx)
	mustNoErr(t, err)
	moved := 0
	_, err = s.Migrate(ctx, func(MigrateResult) {
		// Each of the first sessions migrated is written again, by a
		// proxy, and becomes the most recently active.
		if moved < 10 {
			id := "web:u" + strconv.Itoa(moved) + ":a"
			mustNoErr(t, c.ZAdd(ctx, "hp:sessions", redis.Z{Score: float64(t0 + n + int64(moved)), Member: id}).Err())
			moved++
		}
	})
	mustNoErr(t, err)
	var left []string
	for i := range n {
		id := "web:u" + strconv.Itoa(i) + ":a"
		if c.Exists(ctx, "hp:{"+id+"}:convs").Val() == 1 {
			left = append(left, id)
		}
	}
	if len(left) > 0 {
		t.Errorf("sessions left in the old layout: %q", left)
	}
}

// TestRedisEraseAfterInterruptedMigrate: a migrate stopped between its
// copy and its swap leaves the copy, P:{S}:migrating, holding the
// session's messages; erasing the session removes it too.
func TestRedisEraseAfterInterruptedMigrate(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	oldConversation(t, c, "hp", session, "c1", t0, []string{"5000-0", "5000-1"}, []string{"my card number is 4111", "noted"}, 0)
	mustNoErr(t, c.ZAdd(ctx, "hp:sessions", redis.Z{Score: float64(t0), Member: session}).Err())
	// What migrateSession writes before its swap.
	mustNoErr(t, c.XAdd(ctx, &redis.XAddArgs{Stream: "hp:{" + session + "}:migrating", ID: "5000-0",
		Values: []any{"conversation", "c1", "role", RoleUser, "content", "my card number is 4111"}}).Err())
	_, err := s.Erase(ctx, session)
	mustNoErr(t, err)
	keys, err := c.Keys(ctx, "*"+session+"*").Result()
	mustNoErr(t, err)
	if len(keys) > 0 {
		t.Errorf("after erase: got keys %q, want none", keys)
	}
}

// TestRedisMigrateKeepsSummaries: a session whose current-layout
// conversation was compacted before the migration (a proxy of this
// version wrote turns and a summary beside old-layout streams) reads the
// same after it, through every reader of its stream. The scripts and
// takeWindow tell a summary by its kind right after its conversation
// (encodeSummary): a migration that moves it leaves the summary in the
// window as a message and the messages it covers with it.
func TestRedisMigrateKeepsSummaries(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	oldConversation(t, c, "hp", session, "c1", t0-1000, []string{"4000-0", "4000-1"}, []string{"old question", "old answer"}, 0)
	mustNoErr(t, c.HSet(ctx, "hp:{"+session+"}:session", "conversation", "c1", "is_active", "0", "created_ms", t0-1000,
		"last_active_ms", t0-999, "messages", 2, "conversations", 1).Err())
	var ids []string
	for i := range 3 {
		res, err := s.Append(ctx, session, Turn{Messages: qa(i), NowMs: t0 + int64(i)}, Policy{})
		mustNoErr(t, err)
		ids = append(ids, res.IDs...)
	}
	tok, err := s.TakeCompaction(ctx, session, time.Minute)
	mustNoErr(t, err)
	_, err = s.StoreSummary(ctx, session, tok, SummaryWrite{Conversation: "c2", Message: Message{Content: "earlier", Tokens: 5, Model: "m"},
		CoversFrom: ids[0], CoversTo: ids[3], Covers: 4})
	mustNoErr(t, err)
	mustNoErr(t, s.ReleaseCompaction(ctx, session, tok))
	appendQA(t, s, session, 3, t0+5, Policy{})

	before, err := s.Window(ctx, session, 20, t0+10, Policy{})
	mustNoErr(t, err)
	if before.Summary == nil || !reflect.DeepEqual(contents(before.Messages), []string{"q2", "a2", "q3", "a3"}) {
		t.Fatalf("before the migration: window %q, summary %v; want the messages after the summary's range", contents(before.Messages), before.Summary)
	}
	_, err = s.Migrate(ctx, nil)
	mustNoErr(t, err)
	for name, read := range map[string]func() (Window, error){
		"window": func() (Window, error) { return s.Window(ctx, session, 20, t0+10, Policy{}) },
		"take": func() (Window, error) {
			w, _, err := s.TakeTurn(ctx, session, 20, t0+10, Policy{}, TurnOptions{Wait: time.Minute})
			w.Waited = 0
			return w, err
		},
	} {
		after, err := read()
		mustNoErr(t, err)
		if !reflect.DeepEqual(after, before) {
			t.Errorf("%s after the migration: messages %q, summary %v; want %q, summary %v as before", name,
				contents(after.Messages), after.Summary, contents(before.Messages), before.Summary)
		}
	}
}

// TestRedisMigrateOldEntriesAfterCurrentOnes: during a rolling upgrade a
// proxy of the old version may write to a session's old stream after
// this version began its conversation in the current layout (a turn of
// the old version's still in flight). The old entries go before the
// current ones, as always; the current conversation keeps its message ids
// (which watches, pages and its conversation's start and last hold), and
// every conversation's start and last name messages that exist.
func TestRedisMigrateOldEntriesAfterCurrentOnes(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "")
	oldConversation(t, c, "hp", session, "c1", t0-1000, []string{"4000-0", "4000-1"}, []string{"old question", "old answer"}, 0)
	mustNoErr(t, c.HSet(ctx, "hp:{"+session+"}:session", "conversation", "c1", "is_active", "1", "created_ms", t0-1000,
		"last_active_ms", t0-999, "messages", 2, "conversations", 1).Err())
	mustNoErr(t, c.ZAdd(ctx, "hp:sessions", redis.Z{Score: float64(t0 - 999), Member: session}).Err())
	cur := appendQA(t, s, session, 1, t0, Policy{})
	if cur.ConversationID != "c2" {
		t.Fatalf("a turn on old data: got %+v, want a new conversation c2", cur)
	}
	// The old version's late turn, a millisecond after this version's.
	ms, _, ok := parseID(cur.IDs[1])
	if !ok {
		t.Fatalf("id %q", cur.IDs[1])
	}
	late := strconv.FormatInt(ms+1, 10)
	for i, text := range []string{"late question", "late answer"} {
		mustNoErr(t, c.XAdd(ctx, &redis.XAddArgs{Stream: "hp:{" + session + "}:conv:c1", ID: late + "-" + strconv.Itoa(i), Values: []any{
			"role", []string{RoleUser, RoleAssistant}[i], "content", text, "kind", KindMessage, "tokens", "5",
			"created_ms", strconv.FormatInt(t0+1, 10), "status", StatusComplete,
		}}).Err())
	}

	checkMigrated := func(run string) {
		t.Helper()
		c2, err := s.Messages(ctx, session, "c2")
		mustNoErr(t, err)
		var ids []string
		for _, m := range c2 {
			ids = append(ids, m.ID)
		}
		if !reflect.DeepEqual(ids, cur.IDs) {
			t.Errorf("%s: c2's ids: got %q, want %q as written", run, ids, cur.IDs)
		}
		c1, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if want := []string{"old question", "old answer", "late question", "late answer"}; !reflect.DeepEqual(contents(c1), want) {
			t.Errorf("%s: c1: got %q, want %q", run, contents(c1), want)
		}
		entries, err := c.XRange(ctx, "hp:{"+session+"}:messages", "-", "+").Result()
		mustNoErr(t, err)
		exists := map[string]bool{}
		for _, e := range entries {
			exists[e.ID] = true
		}
		convs, err := s.Conversations(ctx, session)
		mustNoErr(t, err)
		for _, cv := range convs {
			if !exists[cv.StartID] || !exists[cv.LastID] {
				t.Errorf("%s: conversation %s: start %s, last %s; want ids of its messages (stream: %d entries)", run, cv.ID, cv.StartID, cv.LastID, len(entries))
			}
		}
		w, err := s.Window(ctx, session, 10, t0+2, Policy{})
		mustNoErr(t, err)
		if w.ConversationID != "c2" || !reflect.DeepEqual(contents(w.Messages), []string{"q1", "a1"}) {
			t.Errorf("%s: window: got %q in %q, want c2's q1 a1", run, contents(w.Messages), w.ConversationID)
		}
	}
	_, err := s.Migrate(ctx, nil)
	mustNoErr(t, err)
	checkMigrated("first run")
	got, err := s.Migrate(ctx, nil)
	mustNoErr(t, err)
	if want := (MigrateResult{Current: 1}); got != want {
		t.Errorf("second run: got %+v, want %+v", got, want)
	}
	checkMigrated("second run")
	if r := appendQA(t, s, session, 2, t0+3, Policy{}); r.NewConversation || r.ConversationID != "c2" {
		t.Errorf("next turn: got %+v, want it in c2", r)
	}
}

package history

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestLeanEntries: a message entry leaves out kind when its role and tool
// calls imply it, and status when complete; a summary keeps its kind right
// after its conversation (the scripts tell it from a message by that), and
// any kind or status that is not the default is written.
func TestLeanEntries(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "lean")
	t.Cleanup(func() { _ = s.Close() })
	ids := leanSession(t, s)
	entries, err := c.XRange(ctx, s.streamKey(session), "-", "+").Result()
	mustNoErr(t, err)
	if len(entries) != len(ids) {
		t.Fatalf("got %d entries, want %d", len(entries), len(ids))
	}
	want := []struct{ kind, status string }{
		{"", ""}, {"", ""}, {"", ""}, {"", "incomplete"}, {"message", ""}, {"tool_result", ""},
		{"summary", ""}, {"", ""}, {"", ""},
	}
	for i, e := range entries {
		kind, _ := e.Values["kind"].(string)
		status, _ := e.Values["status"].(string)
		if kind != want[i].kind || status != want[i].status {
			t.Errorf("entry %d %v: got kind %q status %q, want %q %q", i, e.Values, kind, status, want[i].kind, want[i].status)
		}
	}
	raw, err := c.Do(ctx, "XRANGE", s.streamKey(session), ids[6], ids[6]).Slice()
	mustNoErr(t, err)
	if len(raw) != 1 || !entrySummary(raw[0]) {
		t.Errorf("summary entry %v: kind is not its second field", raw)
	}
}

// TestLeanEntriesReadAsFull: every reader of the stream gives the same
// messages for the entries written now as for the same entries in the
// form versions before wrote them, kind and status on every one. The
// session is read through each reader (the window and lease scripts, the
// message query, compaction's read, a watch's XREAD), its stream rewritten
// in the old form with the same ids, and read again.
func TestLeanEntriesReadAsFull(t *testing.T) {
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "lean")
	t.Cleanup(func() { _ = s.Close() })
	ids := leanSession(t, s)
	key := s.streamKey(session)

	lean := readEveryWay(t, s, len(ids))
	// The lean entries read with their defaults filled in.
	kinds := []string{KindMessage, KindToolCall, KindToolResult, KindMessage, KindMessage, KindToolResult, KindSummary, KindMessage, KindMessage}
	all := lean["messages"].([]Message)
	for i, m := range all {
		wantStatus := StatusComplete
		if i == 3 {
			wantStatus = StatusIncomplete
		}
		if m.Kind != kinds[i] || m.Status != wantStatus {
			t.Errorf("message %d: got kind %q status %q, want %q %q", i, m.Kind, m.Status, kinds[i], wantStatus)
		}
	}

	before := fieldCount(t, c, key)
	rewriteFull(t, c, key)
	// Three entries have their kind already, one its status.
	if after := fieldCount(t, c, key); after != before+2*len(ids)-4 {
		t.Fatalf("the rewrite gave %d fields, want %d: a kind and a status on every entry", after, before+2*len(ids)-4)
	}
	full := readEveryWay(t, s, len(ids))
	for name, got := range full {
		if !reflect.DeepEqual(got, lean[name]) {
			t.Errorf("%s: entries in the old form read\n%+v\nlean ones\n%+v", name, got, lean[name])
		}
	}
}

// leanSession writes one of every kind and status to session: a turn
// with a user message, a tool call, its result and an incomplete reply;
// a turn with kinds set against what role and tool calls imply; a summary
// of both; and a turn after it. It returns the entries' ids.
func leanSession(t *testing.T, s *RedisStore) []string {
	t.Helper()
	ctx := context.Background()
	calls := json.RawMessage(`[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]`)
	turns := [][]Message{
		{
			{Role: RoleUser, Content: "weather?", Tokens: 4, User: "john", Model: "m", RequestID: "r1"},
			{Role: RoleAssistant, ContentNull: true, ToolCalls: calls, Tokens: 9, User: "john", Model: "m", RequestID: "r1"},
			{Role: RoleTool, ToolCallID: "call_1", Content: "21", Tokens: 3, User: "john"},
			{Role: RoleAssistant, Content: "It is", Status: StatusIncomplete, Tokens: 2, User: "john", Model: "m", RequestID: "r1"},
		},
		{
			{Role: RoleAssistant, ToolCalls: calls, Kind: KindMessage, Tokens: 9},
			{Role: RoleUser, Content: "odd", Kind: KindToolResult, Tokens: 2},
		},
	}
	var ids []string
	for i, msgs := range turns {
		res, err := s.Append(ctx, session, Turn{Messages: msgs, NowMs: t0 + int64(i), IdempotencyKey: "k" + string(rune('0'+i)),
			Usage: Usage{PromptTokens: 10, Requests: 1}}, Policy{})
		mustNoErr(t, err)
		ids = append(ids, res.IDs...)
	}
	tok, err := s.TakeCompaction(ctx, session, time.Minute)
	mustNoErr(t, err)
	sum, err := s.StoreSummary(ctx, session, tok, SummaryWrite{Conversation: "c1", Message: Message{Content: "weather", Tokens: 5, Model: "m"},
		CoversFrom: ids[0], CoversTo: ids[5], Covers: 6})
	mustNoErr(t, err)
	mustNoErr(t, s.ReleaseCompaction(ctx, session, tok))
	ids = append(ids, sum.ID)
	res, err := s.Append(ctx, session, Turn{Messages: qa(9), NowMs: t0 + 5, IdempotencyKey: "k9"}, Policy{})
	mustNoErr(t, err)
	return append(ids, res.IDs...)
}

// readEveryWay reads session through each reader of its stream, by name.
func readEveryWay(t *testing.T, s *RedisStore, n int) map[string]any {
	t.Helper()
	ctx := context.Background()
	out := map[string]any{}
	w, err := s.Window(ctx, session, 50, t0+10, Policy{})
	mustNoErr(t, err)
	out["window"] = w
	w, _, err = s.TakeTurn(ctx, session, 50, t0+10, Policy{}, TurnOptions{Wait: time.Minute})
	mustNoErr(t, err)
	w.Waited = 0
	out["take"] = w
	_, out["messages"], err = s.ReadMessages(ctx, session, MessageQuery{})
	mustNoErr(t, err)
	_, out["newest"], err = s.ReadMessages(ctx, session, MessageQuery{Limit: 4, Newest: true})
	mustNoErr(t, err)
	in, _, err := s.Compaction(ctx, session, "", 0)
	mustNoErr(t, err)
	out["compaction"] = in
	watch, err := s.Watch(ctx, session, "0-0_0-0")
	mustNoErr(t, err)
	defer watch.Close()
	var events []Message
	for len(events) < n {
		if e := next(t, watch); e.Kind == EventMessage {
			events = append(events, e.Message)
		}
	}
	out["watch"] = events
	return out
}

// fieldCount is how many fields the entries of stream key hold in all.
func fieldCount(t testing.TB, c *redis.Client, key string) int {
	t.Helper()
	es, err := c.XRange(context.Background(), key, "-", "+").Result()
	mustNoErr(t, err)
	n := 0
	for _, e := range es {
		n += len(e.Values)
	}
	return n
}

// order is where encodeMessage writes field k: fieldOrder, and a
// summary's range last.
func order(k string) int {
	if i, ok := fieldOrder[k]; ok {
		return i
	}
	return 1000 + map[string]int{"covers_from": 0, "covers_to": 1, "covers": 2}[k]
}

// rewriteFull writes stream key again, same ids, in the form versions
// before wrote it: every entry with its kind and status, in encodeMessage's
// order (a summary's kind first, after its conversation).
func rewriteFull(t testing.TB, c *redis.Client, key string) {
	t.Helper()
	ctx := context.Background()
	es, err := c.XRange(ctx, key, "-", "+").Result()
	mustNoErr(t, err)
	mustNoErr(t, c.Del(ctx, key).Err())
	for _, e := range es {
		m, err := decodeXMessage(e)
		mustNoErr(t, err)
		v := map[string]any{}
		for k, x := range e.Values {
			v[k] = x
		}
		v["kind"], v["status"] = m.Kind, m.Status
		var keys []string
		for k := range v {
			if k != "conversation" && !(m.Kind == KindSummary && k == "kind") {
				keys = append(keys, k)
			}
		}
		sort.Slice(keys, func(i, j int) bool { return order(keys[i]) < order(keys[j]) })
		fields := []any{"conversation", v["conversation"]}
		if m.Kind == KindSummary {
			fields = append(fields, "kind", KindSummary)
		}
		for _, k := range keys {
			fields = append(fields, k, v[k])
		}
		mustNoErr(t, c.XAdd(ctx, &redis.XAddArgs{Stream: key, ID: e.ID, Values: fields}).Err())
	}
}

// BenchmarkLayout is BenchmarkRedisRequest/take (the turn taken and the
// 20-message window read, the turn passed on at once) on the entries as
// they are written now ("lean") and as versions before wrote them, kind
// and status on each ("full"): the same messages, ids and session, so the
// difference is the layout's. With -count the two alternate, which keeps
// them comparable on a busy machine.
func BenchmarkLayout(b *testing.B) {
	ctx := context.Background()
	c := redistest.Start(b).Client(b)
	user := strings.Repeat("And how do I rotate the API key for staging? ", 4)
	reply := strings.Repeat("Create a second key, switch the workflow to it, then revoke the old one. ", 6)
	for _, full := range []bool{false, true} {
		name := "lean"
		if full {
			name = "full"
		}
		b.Run(name, func(b *testing.B) {
			s := NewRedis(c, fmt.Sprintf("bench-layout-%d", time.Now().UnixNano()))
			defer s.Close()
			for i := 0; i < 10; i++ {
				id := "req_" + strconv.Itoa(i)
				_, err := s.Append(ctx, session, Turn{Messages: []Message{
					{Role: RoleUser, Content: user, Tokens: 40, Model: "gpt-4o-mini", User: "john@example.com", RequestID: id},
					{Role: RoleAssistant, Content: reply, Tokens: 90, Model: "gpt-4o-mini", User: "john@example.com", RequestID: id},
				}, IdempotencyKey: "hp-" + id, Usage: Usage{PromptTokens: 1400, CompletionTokens: 118, Requests: 1, CostNanos: 281000}}, Policy{})
				mustNoErr(b, err)
			}
			if full {
				rewriteFull(b, c, s.streamKey(session))
			}
			o := TurnOptions{Wait: time.Minute}
			cpu0, rcpu0 := processCPU(b), redisCPU(b, c)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				w, _, err := s.TakeTurn(ctx, session, 20, time.Now().UnixMilli(), Policy{}, o)
				if err != nil {
					b.Fatal(err)
				}
				if len(w.Messages) != 20 {
					b.Fatalf("window of %d messages, want 20", len(w.Messages))
				}
			}
			b.StopTimer()
			b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
			b.ReportMetric(float64((redisCPU(b, c)-rcpu0).Microseconds())/float64(b.N), "redis-cpu-us/op")
		})
	}
}

// TestFullFormEmptyToolCallsReadAsMessage: versions before the lean
// layout wrote kind on every entry, tool_call on an assistant message
// sent or answered with "tool_calls": [] (an empty array calls nothing).
// Such an entry reads as kind message, its array as sent.
func TestFullFormEmptyToolCallsReadAsMessage(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "lean")
	t.Cleanup(func() { _ = s.Close() })
	_, err := s.Append(ctx, session, Turn{Messages: []Message{
		{Role: RoleUser, Content: "hi"},
		{Role: RoleAssistant, Content: "hello", ToolCalls: json.RawMessage(`[]`)},
	}, NowMs: t0}, Policy{})
	mustNoErr(t, err)
	key := s.streamKey(session)
	es, err := c.XRange(ctx, key, "-", "+").Result()
	mustNoErr(t, err)
	mustNoErr(t, c.Del(ctx, key).Err())
	for _, e := range es {
		fields := []any{"conversation", e.Values["conversation"]}
		for k, v := range e.Values {
			if k != "conversation" {
				fields = append(fields, k, v)
			}
		}
		if e.Values["role"] == RoleAssistant {
			fields = append(fields, "kind", KindToolCall)
		}
		mustNoErr(t, c.XAdd(ctx, &redis.XAddArgs{Stream: key, ID: e.ID, Values: fields}).Err())
	}
	msgs, err := s.Messages(ctx, session, "")
	mustNoErr(t, err)
	if len(msgs) != 2 || msgs[1].Kind != KindMessage || string(msgs[1].ToolCalls) != "[]" {
		t.Fatalf("got %+v, want the reply of kind message with tool_calls []", msgs)
	}
}

package history

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// The layout before one stream per session kept each conversation in its
// own stream, P:{S}:conv:<id>, listed in the sorted set P:{S}:convs
// (conversation id -> created ms), and indexed sessions only in
// P:sessions. Migrate moves such sessions into the current layout.

// MigrateResult says what Migrate did.
type MigrateResult struct {
	Sessions      int // sessions moved to the current layout
	Current       int // sessions already in it (their part indexes checked)
	Conversations int // conversations moved
	Messages      int // messages moved
}

// errMigrateRace reports that a session was written while it was being
// migrated; the session is tried again.
var errMigrateRace = errors.New("session written during its migration")

// migrateBatch is how many entries one round trip copies.
const migrateBatch = 500

// swapScript ends a session's migration atomically: if the session's
// stream and its old keys are as they were read (the last id of each
// stream, or absent, and the number of old conversations), the copy
// replaces the stream, the conversations' metadata is written, and the old
// keys are deleted. The old keys are checked too because a proxy of the
// old version may still write to them during a rolling upgrade: a turn it
// added after they were read, or a conversation it began, would otherwise
// be deleted with them, never copied.
//
// KEYS: session, conversations, messages, copy, old conversation set, old
// streams... ARGV: last id of messages when read ("" absent), TTL ms of the
// result (0: none), the number of old conversations when read, the last id
// of each old stream when read ("" empty or absent), then field/value pairs
// of the conversations hash. Returns 1, or 0 when the session changed
// meanwhile (nothing is written).
var swapScript = redis.NewScript(`
local function lastID(key)
  local e = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #e > 0 then return e[1][1] end
  return ''
end
if lastID(KEYS[3]) ~= ARGV[1] then return 0 end
if redis.call('ZCARD', KEYS[5]) ~= tonumber(ARGV[3]) then return 0 end
for i = 6, #KEYS do
  if lastID(KEYS[i]) ~= ARGV[i - 2] then return 0 end
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RENAME', KEYS[4], KEYS[3])
  if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
else
  redis.call('DEL', KEYS[3])
end
for i = #KEYS - 1, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSETNX', KEYS[1], 'retained', '1')
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
`)

// Migrate moves every session of the layout before one stream per session
// into the current one, found through the P:sessions index (never by
// scanning keys), and adds every session to the channel, user and agent
// indexes. Message ids are kept (a few old ones may move up a sequence
// number where two conversations' streams began in the same millisecond,
// or just before the session's first message in the current layout, whose
// ids and those after it never change). It is safe to
// run while proxies of the current version serve, and to run again: a
// session already moved is only checked. progress, when not nil, is called
// after each session.
func (s *RedisStore) Migrate(ctx context.Context, progress func(MigrateResult)) (MigrateResult, error) {
	var res MigrateResult
	// ZSCAN, not pages by rank: a session that proxies write meanwhile
	// moves to the end of the index, which shifts every later rank back by
	// one, so a page read by offset would pass over a session. A full ZSCAN
	// returns every member present from its start to its end (some perhaps
	// twice, which only checks a session again).
	var cursor uint64
	for {
		kv, next, err := s.client.ZScan(ctx, s.indexKey(), cursor, "", migrateBatch).Result()
		if err != nil {
			return res, fmt.Errorf("migrate: list sessions: %w", err)
		}
		for i := 0; i+1 < len(kv); i += 2 {
			id := kv[i]
			score, err := strconv.ParseFloat(kv[i+1], 64)
			if id == "" || err != nil {
				continue
			}
			z := redis.Z{Score: score, Member: id}
			moved, convs, msgs, err := s.migrateSession(ctx, id)
			for attempt := 0; errors.Is(err, errMigrateRace) && attempt < 5; attempt++ {
				moved, convs, msgs, err = s.migrateSession(ctx, id)
			}
			if err != nil {
				return res, fmt.Errorf("migrate %s: %w", id, err)
			}
			pipe := s.client.Pipeline()
			for _, k := range s.indexKeys(id)[1:] {
				pipe.ZAddGT(ctx, k, z)
			}
			if _, err := pipe.Exec(ctx); err != nil {
				return res, fmt.Errorf("migrate %s: index: %w", id, err)
			}
			if moved {
				res.Sessions++
				res.Conversations += convs
				res.Messages += msgs
			} else {
				res.Current++
			}
			if progress != nil {
				progress(res)
			}
		}
		if next == 0 {
			return res, nil
		}
		cursor = next
	}
}

// migratingKey is where Migrate copies a session's messages before it
// swaps the copy in; a migrate interrupted in between leaves it.
func (s *RedisStore) migratingKey(id string) string { return s.key(id, "migrating") }

// migEntry is one message on its way into the session's stream.
type migEntry struct {
	id     string
	conv   string
	fields []any // without the conversation field
	ms     int64 // created_ms, when it has one
	m      Message
}

// migrateSession moves one session; moved is false when it has nothing of
// the old layout.
func (s *RedisStore) migrateSession(ctx context.Context, id string) (moved bool, convs, msgs int, err error) {
	oldSet := s.key(id, "convs")
	if typ, err := s.client.Type(ctx, oldSet).Result(); err != nil {
		return false, 0, 0, err
	} else if typ != "zset" {
		return false, 0, 0, nil
	}
	old, err := s.client.ZRangeWithScores(ctx, oldSet, 0, -1).Result()
	if err != nil {
		return false, 0, 0, err
	}
	// The conversations in order of their number, as the old layout
	// numbered them.
	sort.SliceStable(old, func(i, j int) bool {
		return convNumber(old[i].Member.(string)) < convNumber(old[j].Member.(string))
	})
	keys := []string{s.sessionKey(id), s.convsKey(id), s.streamKey(id), s.migratingKey(id), oldSet}
	var entries []migEntry
	var oldLast []any // each old stream's last id when read, for the swap
	ttl := time.Duration(0)
	meta := map[string]map[string]string{}
	for _, z := range old {
		conv := z.Member.(string)
		stream := s.key(id, "conv:"+conv)
		keys = append(keys, stream)
		meta[conv] = map[string]string{"created_ms": strconv.FormatInt(int64(z.Score), 10)}
		es, err := readAll(ctx, s.client, stream)
		if err != nil {
			return false, 0, 0, err
		}
		for _, e := range es {
			entries = append(entries, newMigEntry(e, conv))
		}
		last := ""
		if len(es) > 0 {
			last = es[len(es)-1].ID
		}
		oldLast = append(oldLast, last)
		if len(es) > 0 {
			d, err := s.client.PTTL(ctx, stream).Result()
			if err != nil {
				return false, 0, 0, err
			}
			if d < 0 {
				ttl = -1 // one of them is kept forever
			} else if ttl >= 0 && d > ttl {
				ttl = d
			}
		}
	}
	// Messages the current layout already holds (written by a newer
	// proxy before the migration) come after the old ones.
	current, err := readAll(ctx, s.client, s.streamKey(id))
	if err != nil {
		return false, 0, 0, err
	}
	lastID := ""
	if len(current) > 0 {
		lastID = current[len(current)-1].ID
		d, err := s.client.PTTL(ctx, s.streamKey(id)).Result()
		if err != nil {
			return false, 0, 0, err
		}
		if d < 0 {
			ttl = -1
		} else if ttl >= 0 && d > ttl {
			ttl = d
		}
	}
	// Keep every old id, unless it does not follow the one before: two
	// streams began in the same millisecond.
	prev := ""
	for i := range entries {
		if prev != "" && compareIDs(entries[i].id, prev) <= 0 {
			ms, seq, _ := parseID(prev)
			entries[i].id = strconv.FormatInt(ms, 10) + "-" + strconv.FormatInt(seq+1, 10)
		}
		prev = entries[i].id
	}
	// The current layout's entries keep their ids, for proxies of this
	// version serve them: their conversations' start, last and summary
	// pointers, summaries' ranges, watches and pages name them. Old
	// entries that do not come before the first of them (a turn of the
	// old version still in flight while this one began a conversation,
	// during a rolling upgrade) take the ids just before it instead.
	if len(current) > 0 {
		next := current[0].ID
		for i := len(entries) - 1; i >= 0 && compareIDs(entries[i].id, next) >= 0; i-- {
			entries[i].id = precedingID(next)
			next = entries[i].id
		}
	}
	for _, e := range current {
		conv, _ := e.Values["conversation"].(string)
		entries = append(entries, newMigEntry(e, conv))
	}

	// Copy into a stream of its own, then swap it in at once.
	if err := s.client.Del(ctx, keys[3]).Err(); err != nil {
		return false, 0, 0, err
	}
	for start := 0; start < len(entries); start += migrateBatch {
		pipe := s.client.Pipeline()
		for _, e := range entries[start:min(start+migrateBatch, len(entries))] {
			values := append([]any{"conversation", e.conv}, e.fields...)
			pipe.XAdd(ctx, &redis.XAddArgs{Stream: keys[3], ID: e.id, Values: values})
		}
		if _, err := pipe.Exec(ctx); err != nil {
			return false, 0, 0, fmt.Errorf("copy messages: %w", err)
		}
	}
	for _, e := range entries {
		m := meta[e.conv]
		if m == nil {
			continue // a conversation of the current layout keeps its own
		}
		if m["start"] == "" {
			m["start"] = e.id
		}
		m["last"] = e.id
		n, _ := strconv.Atoi(m["messages"])
		m["messages"] = strconv.Itoa(n + 1)
		if e.ms > 0 {
			if last, _ := strconv.ParseInt(m["last_ms"], 10, 64); e.ms > last {
				m["last_ms"] = strconv.FormatInt(e.ms, 10)
			}
		}
		if m["auto_title"] == "" && e.m.Role == RoleUser {
			m["auto_title"] = DeriveTitle(e.m)
		}
	}
	args := append([]any{lastID, ttl.Milliseconds(), len(old)}, oldLast...)
	for conv, fields := range meta {
		for k, v := range fields {
			if v != "" {
				args = append(args, conv+":"+k, v)
			}
		}
	}
	ok, err := swapScript.Run(ctx, s.client, keys, args...).Int()
	if err != nil {
		return false, 0, 0, err
	}
	if ok != 1 {
		return false, 0, 0, errMigrateRace
	}
	return true, len(old), len(entries) - len(current), nil
}

// precedingID is the greatest stream id below id, which is above 0-0; in the
// millisecond before, the greatest sequence number parseID reads.
func precedingID(id string) string {
	ms, seq, _ := parseID(id)
	if seq > 0 {
		return strconv.FormatInt(ms, 10) + "-" + strconv.FormatInt(seq-1, 10)
	}
	return strconv.FormatInt(ms-1, 10) + "-" + strconv.FormatInt(math.MaxInt64, 10)
}

// fieldOrder is the order encodeMessage writes fields in. The message
// it encodes has a kind and a status that are not the defaults, so that
// both are written.
var fieldOrder = func() map[string]int {
	order := map[string]int{}
	all := encodeMessage(Message{
		Role: "r", Content: "c", Parts: []byte("p"), ContentNull: true, Name: "n", ToolCalls: []byte("t"),
		ToolCallID: "i", Refusal: "f", Kind: "k", User: "u", Model: "m", Tokens: 1, CreatedMs: 1, RequestID: "q",
		Status: "s", IdempotencyKey: "d",
	})
	for i := 0; i < len(all); i += 2 {
		order[all[i]] = i
	}
	return order
}()

// newMigEntry reads an entry of an old stream, its fields in the order
// encodeMessage writes them (fields it does not know last, by name; a
// summary's kind first, as encodeSummary writes it).
func newMigEntry(e redis.XMessage, conv string) migEntry {
	keys := make([]string, 0, len(e.Values))
	for k := range e.Values {
		if k != "conversation" {
			keys = append(keys, k)
		}
	}
	// A summary's kind comes first, as encodeSummary writes it: the
	// scripts and takeWindow tell a summary by it.
	summary := e.Values["kind"] == KindSummary
	sort.Slice(keys, func(i, j int) bool {
		if ki, kj := keys[i] == "kind", keys[j] == "kind"; summary && ki != kj {
			return ki
		}
		oi, iok := fieldOrder[keys[i]]
		oj, jok := fieldOrder[keys[j]]
		switch {
		case iok != jok:
			return iok
		case iok:
			return oi < oj
		}
		return keys[i] < keys[j]
	})
	me := migEntry{id: e.ID, conv: conv, fields: make([]any, 0, 2*len(keys))}
	flat := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		v, _ := e.Values[k].(string)
		me.fields = append(me.fields, k, v)
		flat = append(flat, k, v)
	}
	if m, err := decodeEntry([]any{e.ID, flat}); err == nil {
		me.m, me.ms = m, m.CreatedMs
	}
	return me
}

// readAll reads a whole stream in batches; nil for a missing key.
func readAll(ctx context.Context, c redis.UniversalClient, key string) ([]redis.XMessage, error) {
	var out []redis.XMessage
	start := "-"
	for {
		es, err := c.XRangeN(ctx, key, start, "+", migrateBatch).Result()
		if err != nil {
			return nil, err
		}
		out = append(out, es...)
		if len(es) < migrateBatch {
			return out, nil
		}
		start = "(" + es[len(es)-1].ID
	}
}

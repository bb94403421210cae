package history

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// sessionScript reads a session's hash and its latest conversation's
// titles.
//
// KEYS: session, conversations.
// Returns {} or {hash as field/value pairs, title set, derived title}.
var sessionScript = redis.NewScript(`
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {} end
local conv = redis.call('HGET', KEYS[1], 'conversation')
local t = {false, false}
if conv then t = redis.call('HMGET', KEYS[2], conv .. ':title', conv .. ':auto_title') end
return {h, t[1] or '', t[2] or ''}
`)

// conversationsScript reads every conversation's metadata, and which of
// them have no message left (retention removed them).
//
// KEYS: session, conversations, messages.
// Returns {latest conversation, is_active, metadata pairs, expired ids}.
var conversationsScript = redis.NewScript(`
local h = redis.call('HMGET', KEYS[1], 'conversation', 'is_active')
local meta = redis.call('HGETALL', KEYS[2])
local expired = {}
for i = 1, #meta, 2 do
  local conv = string.match(meta[i], '^(.*):start$')
  if conv then
    local last = redis.call('HGET', KEYS[2], conv .. ':last')
    if #redis.call('XRANGE', KEYS[3], meta[i + 1], last, 'COUNT', 1) == 0 then
      expired[#expired + 1] = conv
    end
  end
end
return {h[1] or '', h[2] or '', meta, expired}
`)

// readScript reads messages of one conversation.
//
// KEYS: session, conversations, messages. ARGV: conversation ("": the
// current one, unless reset), after id, before id, limit (0: all),
// newest (1: the newest of the range).
// Returns {} or {conversation id, entries, oldest first unless newest}.
var readScript = redis.NewScript(luaLib + `
local conv = ARGV[1]
if conv == '' then
  local h = redis.call('HMGET', KEYS[1], 'conversation', 'is_active')
  if not h[1] or h[2] ~= '1' then return {} end
  conv = h[1]
end
local r = redis.call('HMGET', KEYS[2], conv .. ':start', conv .. ':last')
if not r[1] then return {} end
local lo, hi = r[1], r[2]
if ARGV[2] ~= '' and not idlt(ARGV[2], lo) then lo = '(' .. ARGV[2] end
if ARGV[3] ~= '' and not idlt(hi, ARGV[3]) then hi = '(' .. ARGV[3] end
return {conv, collect(KEYS[3], conv, lo, hi, tonumber(ARGV[4]), ARGV[5] == '1')}
`)

// resetScript ends the current conversation.
//
// KEYS: session. Returns the id of the conversation it ended, or "".
var resetScript = redis.NewScript(`
local h = redis.call('HMGET', KEYS[1], 'conversation', 'is_active')
if h[1] and h[2] == '1' then
  redis.call('HSET', KEYS[1], 'is_active', '0')
  return h[1]
end
return ''
`)

// titleScript sets or clears a conversation's title.
//
// KEYS: session, conversations. ARGV: conversation ("": the latest),
// title ("": clear it, so the derived one shows).
// Returns the conversation's id, or "" when there is no such conversation.
var titleScript = redis.NewScript(`
local conv = ARGV[1]
if conv == '' then conv = redis.call('HGET', KEYS[1], 'conversation') or '' end
if conv == '' or redis.call('HEXISTS', KEYS[2], conv .. ':created_ms') == 0 then return '' end
if ARGV[2] == '' then redis.call('HDEL', KEYS[2], conv .. ':title')
else redis.call('HSET', KEYS[2], conv .. ':title', ARGV[2]) end
return conv
`)

// eraseScript deletes every key of a session: the fixed ones, the copy an
// interrupted migrate left, and any key of the layout before one stream
// per session (KEYS[11:]), whose streams' messages it counts.
//
// KEYS: session, conversations, messages, idem, lease, queue, waiters,
// live, watched, migrating, legacy keys...
// Returns {session existed (0|1), conversations, messages stored}.
var eraseScript = redis.NewScript(`
local found = redis.call('EXISTS', KEYS[1])
local convs = tonumber(redis.call('HGET', KEYS[1], 'conversations') or '0')
local n = redis.call('XLEN', KEYS[3])
for i = 11, #KEYS do
  if redis.call('TYPE', KEYS[i]).ok == 'stream' then n = n + redis.call('XLEN', KEYS[i]) end
end
redis.call('DEL', unpack(KEYS))
return {found, convs, n}
`)

// Session returns the session's metadata; false when the session is
// unknown.
func (s *RedisStore) Session(ctx context.Context, session string) (Session, bool, error) {
	if session == "" {
		return Session{}, false, fmt.Errorf("read session: %w", ErrEmptySession)
	}
	res, err := sessionScript.Run(ctx, s.client, s.sessionKeys(session)[:2]).Slice()
	if err != nil {
		return Session{}, false, fmt.Errorf("read session %s: %w", session, err)
	}
	out, ok, err := parseSession(session, res)
	if err != nil {
		return Session{}, false, fmt.Errorf("read session %s: %w", session, err)
	}
	return out, ok, nil
}

// parseSession reads sessionScript's reply.
func parseSession(session string, res []any) (Session, bool, error) {
	if len(res) == 0 {
		return Session{}, false, nil
	}
	if len(res) != 3 {
		return Session{}, false, fmt.Errorf("script reply: got %d elements, want 3", len(res))
	}
	pairs, _ := res[0].([]any)
	h := make(map[string]string, len(pairs)/2)
	for i := 0; i+1 < len(pairs); i += 2 {
		k, _ := pairs[i].(string)
		v, _ := pairs[i+1].(string)
		h[k] = v
	}
	var errs []error
	num := func(k string) int64 {
		v, ok := h[k]
		if !ok {
			return 0
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			errs = append(errs, fmt.Errorf("field %s: %w", k, err))
		}
		return n
	}
	title, _ := res[1].(string)
	if title == "" {
		title, _ = res[2].(string)
	}
	out := Session{
		ID:             session,
		ConversationID: h["conversation"],
		Title:          title,
		CreatedMs:      num("created_ms"),
		LastActiveMs:   num("last_active_ms"),
		Active:         h["is_active"] == "1",
		MessageCount:   num("messages"),
		Totals: Usage{
			PromptTokens:     num("prompt_tokens"),
			CompletionTokens: num("completion_tokens"),
			CachedTokens:     num("cached_tokens"),
			HistoryTokens:    num("history_tokens"),
			Requests:         num("requests"),
			// A session not written since costs moved to nano-USD still
			// has cost_micros; the next append folds it into cost_nanos.
			CostNanos: num("cost_nanos") + 1000*num("cost_micros"),
		},
	}
	if err := errors.Join(errs...); err != nil {
		return Session{}, false, err
	}
	return out, true, nil
}

// Conversations returns the session's conversations, oldest first,
// including those whose messages have expired; nil for an unknown session.
func (s *RedisStore) Conversations(ctx context.Context, session string) ([]Conversation, error) {
	if session == "" {
		return nil, fmt.Errorf("list conversations: %w", ErrEmptySession)
	}
	res, err := conversationsScript.Run(ctx, s.client, s.sessionKeys(session)[:3]).Slice()
	if err != nil {
		return nil, fmt.Errorf("list conversations %s: %w", session, err)
	}
	if len(res) != 4 {
		return nil, fmt.Errorf("list conversations %s: script reply of %d elements, want 4", session, len(res))
	}
	current, _ := res[0].(string)
	active, _ := res[1].(string)
	pairs, _ := res[2].([]any)
	expired := map[string]bool{}
	ids, _ := res[3].([]any)
	for _, id := range ids {
		if s, ok := id.(string); ok {
			expired[s] = true
		}
	}
	byID := map[string]*Conversation{}
	for i := 0; i+1 < len(pairs); i += 2 {
		k, _ := pairs[i].(string)
		v, _ := pairs[i+1].(string)
		id, field, ok := strings.Cut(k, ":")
		if !ok {
			continue
		}
		c := byID[id]
		if c == nil {
			c = &Conversation{ID: id, Current: id == current && active == "1", Expired: expired[id]}
			byID[id] = c
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		switch field {
		case "start":
			c.StartID = v
		case "last":
			c.LastID = v
		case "created_ms":
			c.CreatedMs = n
		case "last_ms":
			c.LastMs = n
		case "messages":
			c.MessageCount = n
		case "title":
			c.Title, c.TitleSet = v, true
		case "auto_title":
			if !c.TitleSet {
				c.Title = v
			}
		}
	}
	return sortedConversations(byID), nil
}

// sortedConversations orders conversations by their number: c2 before
// c10.
func sortedConversations(byID map[string]*Conversation) []Conversation {
	if len(byID) == 0 {
		return nil
	}
	out := make([]Conversation, 0, len(byID))
	for _, c := range byID {
		out = append(out, *c)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := convNumber(out[i].ID), convNumber(out[j].ID)
		if a != b {
			return a < b
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Messages returns a whole conversation, oldest first. An empty
// conversationID means the current conversation; there is none (nil)
// after Reset. Its cost grows with the conversation: it is for audit, not
// for building prompts.
func (s *RedisStore) Messages(ctx context.Context, session, conversationID string) ([]Message, error) {
	_, msgs, err := s.ReadMessages(ctx, session, MessageQuery{Conversation: conversationID})
	return msgs, err
}

// ReadMessages returns the messages of one conversation that q selects,
// oldest first, and the conversation's id; "" and nil when there is no
// such conversation.
func (s *RedisStore) ReadMessages(ctx context.Context, session string, q MessageQuery) (string, []Message, error) {
	if session == "" {
		return "", nil, fmt.Errorf("read messages: %w", ErrEmptySession)
	}
	if err := checkQuery(q); err != nil {
		return "", nil, fmt.Errorf("read messages %s: %w", session, err)
	}
	newest := 0
	if q.Newest {
		newest = 1
	}
	res, err := readScript.Run(ctx, s.client, s.sessionKeys(session)[:3],
		q.Conversation, q.After, q.Before, max(q.Limit, 0), newest).Slice()
	if err != nil {
		return "", nil, fmt.Errorf("read messages %s: %w", session, err)
	}
	conv, entries, err := convEntries(res)
	if err != nil {
		return "", nil, fmt.Errorf("read messages %s: %w", session, err)
	}
	if len(entries) == 0 {
		return conv, nil, nil
	}
	msgs := make([]Message, len(entries))
	for i, e := range entries {
		m, err := decodeEntry(e)
		if err != nil {
			return "", nil, fmt.Errorf("read messages %s: %w", session, err)
		}
		if q.Newest {
			msgs[len(entries)-1-i] = m
		} else {
			msgs[i] = m
		}
	}
	return conv, msgs, nil
}

// Sessions lists sessions, most recently active first, as q selects them.
func (s *RedisStore) Sessions(ctx context.Context, q SessionQuery) (SessionPage, error) {
	page, err := listSessions(ctx, redisIndex{s}, q)
	if err != nil {
		return SessionPage{}, fmt.Errorf("list sessions: %w", err)
	}
	return page, nil
}

// redisIndex serves listSessions from the index sorted sets.
type redisIndex struct{ s *RedisStore }

func (r redisIndex) key(q SessionQuery) string {
	switch {
	case q.User != "":
		return r.s.partIndexKey("user", q.User)
	case q.Agent != "":
		return r.s.partIndexKey("agent", q.Agent)
	case q.Channel != "":
		return r.s.partIndexKey("channel", q.Channel)
	}
	return r.s.indexKey()
}

func scoreArg(v int64) string {
	switch v {
	case math.MinInt64:
		return "-inf"
	case math.MaxInt64:
		return "+inf"
	}
	return strconv.FormatInt(v, 10)
}

// scan reads the index from hi down, each batch from the last score the
// one before ended at, skipping only the entries of that score already
// read: an offset from the top instead costs Redis a walk over every entry
// before it, so a scan of the whole index grew with its square.
func (r redisIndex) scan(ctx context.Context, q SessionQuery, lo, hi int64, batch int, fn func([]indexEntry) bool) error {
	key := r.key(q)
	skip := int64(0) // entries of score hi already read
	for {
		zs, err := r.s.client.ZRangeArgsWithScores(ctx, redis.ZRangeArgs{
			Key: key, Start: scoreArg(hi), Stop: scoreArg(lo), ByScore: true, Rev: true,
			Offset: skip, Count: int64(batch),
		}).Result()
		if err != nil {
			return err
		}
		es := make([]indexEntry, len(zs))
		for i, z := range zs {
			id, _ := z.Member.(string)
			es[i] = indexEntry{id: id, score: int64(z.Score)}
		}
		if !fn(es) || len(zs) < batch {
			return nil
		}
		last := es[len(es)-1].score
		if last == hi {
			// The whole batch had the score it started from.
			skip += int64(len(es))
			continue
		}
		hi, skip = last, 0
		for i := len(es) - 1; i >= 0 && es[i].score == last; i-- {
			skip++
		}
	}
}

func (r redisIndex) count(ctx context.Context, q SessionQuery, lo, hi int64) (int64, error) {
	return r.s.client.ZCount(ctx, r.key(q), scoreArg(lo), scoreArg(hi)).Result()
}

func (r redisIndex) infos(ctx context.Context, ids []string) ([]Session, []bool, error) {
	cmds := make([]*redis.Cmd, len(ids))
	run := func(eval func(pipe redis.Pipeliner, i int) *redis.Cmd) error {
		_, err := r.s.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for i := range ids {
				cmds[i] = eval(pipe, i)
			}
			return nil
		})
		return err
	}
	err := run(func(pipe redis.Pipeliner, i int) *redis.Cmd {
		return sessionScript.EvalSha(ctx, pipe, r.s.sessionKeys(ids[i])[:2])
	})
	if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
		err = run(func(pipe redis.Pipeliner, i int) *redis.Cmd {
			return sessionScript.Eval(ctx, pipe, r.s.sessionKeys(ids[i])[:2])
		})
	}
	if err != nil {
		return nil, nil, err
	}
	out := make([]Session, len(ids))
	found := make([]bool, len(ids))
	for i, c := range cmds {
		res, err := c.Slice()
		if err != nil {
			return nil, nil, fmt.Errorf("read session %s: %w", ids[i], err)
		}
		out[i], found[i], err = parseSession(ids[i], res)
		if err != nil {
			return nil, nil, fmt.Errorf("read session %s: %w", ids[i], err)
		}
	}
	return out, found, nil
}

// Reset ends the session's current conversation; it is kept for audit and
// the next turn starts a new one. It returns the id of the conversation it
// ended, "" when none was going (an unknown session, or one already
// reset).
func (s *RedisStore) Reset(ctx context.Context, session string) (string, error) {
	if session == "" {
		return "", fmt.Errorf("reset session: %w", ErrEmptySession)
	}
	conv, err := resetScript.Run(ctx, s.client, s.sessionKeys(session)[:1]).Text()
	if err != nil {
		return "", fmt.Errorf("reset session %s: %w", session, err)
	}
	return conv, nil
}

// SetTitle sets the title of a conversation ("" means the latest one); an
// empty title clears it, so the derived title shows again. It returns the
// conversation's id, "" when there is no such conversation.
func (s *RedisStore) SetTitle(ctx context.Context, session, conversationID, title string) (string, error) {
	if session == "" {
		return "", fmt.Errorf("set title: %w", ErrEmptySession)
	}
	conv, err := titleScript.Run(ctx, s.client, s.sessionKeys(session)[:2], conversationID, title).Text()
	if err != nil {
		return "", fmt.Errorf("set title %s: %w", session, err)
	}
	return conv, nil
}

// Erase deletes every key of the session and its index entries, and says
// what it removed. Keys of the layout before one stream per session are
// found through the old conversation set and deleted too.
func (s *RedisStore) Erase(ctx context.Context, session string) (Erased, error) {
	if session == "" {
		return Erased{}, fmt.Errorf("erase session: %w", ErrEmptySession)
	}
	// A request holding the lease goes on (its append releases nothing);
	// waiters re-queue when they next check.
	keys := append(s.sessionKeys(session), s.leaseKeys(session)...)
	keys = append(keys, s.migratingKey(session))
	legacy := s.key(session, "convs")
	old, err := s.client.ZRange(ctx, legacy, 0, -1).Result()
	if err != nil && !redis.HasErrorPrefix(err, "WRONGTYPE") {
		return Erased{}, fmt.Errorf("erase session %s: %w", session, err)
	}
	keys = append(keys, legacy)
	for _, c := range old {
		keys = append(keys, s.key(session, "conv:"+c))
	}
	// A compaction that runs on meanwhile finds its lease gone and stores
	// nothing.
	keys = append(keys, s.compactKey(session))
	res, err := s.runPipelined(ctx, eraseScript, keys, nil, func(pipe redis.Pipeliner) {
		for _, k := range s.indexKeys(session) {
			pipe.ZRem(ctx, k, session)
		}
	})
	if err != nil {
		return Erased{}, fmt.Errorf("erase session %s: %w", session, err)
	}
	// Only to free its memory: a tail of the erased stream is not trusted
	// anyway (see windowCache), and other instances keep theirs.
	s.cache.drop(session)
	vals, ok := res.([]any)
	if !ok || len(vals) != 3 {
		return Erased{}, fmt.Errorf("erase session %s: script reply %v, want 3 numbers", session, res)
	}
	found, _ := vals[0].(int64)
	convs, _ := vals[1].(int64)
	n, _ := vals[2].(int64)
	return Erased{Found: found == 1, Conversations: convs, Messages: n}, nil
}

package history

import (
	"context"
	"errors"
	"fmt"

	"time"

	"github.com/redis/go-redis/v9"
)

// compactKey is the session's compaction lease: the holder's token, with
// an expiry.
func (s *RedisStore) compactKey(id string) string { return s.key(id, "compact") }

// compactionScript reads what a compaction starts from.
//
// KEYS: session, conversations, messages. ARGV: conversation ("": the
// latest), limit (0: all).
// Returns {} or {conversation, current (0|1), summary entry or {},
// entries after its range oldest first, unsummarized count, title set
// (0|1)}.
var compactionScript = redis.NewScript(luaLib + `
local h = redis.call('HMGET', KEYS[1], 'conversation', 'is_active')
local conv = ARGV[1]
if conv == '' then conv = h[1] or '' end
if conv == '' then return {} end
local r = redis.call('HMGET', KEYS[2], conv .. ':start', conv .. ':last', conv .. ':summary', conv .. ':summary_to',
  conv .. ':messages', conv .. ':summarized', conv .. ':title')
if not r[1] then return {} end
local sum, lo = latestsum(KEYS[3], r[3], r[4], r[1])
local cur, titled = 0, 0
if h[1] == conv and h[2] == '1' then cur = 1 end
if r[7] then titled = 1 end
return {conv, cur, sum, collect(KEYS[3], conv, lo, r[2], tonumber(ARGV[2]), false, true),
  tonumber(r[5] or '0') - tonumber(r[6] or '0'), titled}
`)

// luaUsage names a session hash's six usage totals, in the order of
// usageArgs and of the append script's usage arguments; every script that
// adds usage reads the names from here.
const luaUsage = `
local usage = {'prompt_tokens', 'completion_tokens', 'cached_tokens', 'history_tokens', 'requests', 'cost_nanos'}
`

// usageLua adds six usage deltas (ARGV[i] to ARGV[i+5]) to a session hash.
const usageLua = luaUsage + `
local function addusage(key, i)
  for k = 1, 6 do redis.call('HINCRBY', key, usage[k], ARGV[i + k - 1]) end
end
`

// summaryScript stores a summary, if the caller still holds the
// compaction lease and the conversation's latest summary is the one it
// built on.
//
// KEYS: session, conversations, messages, compact. ARGV: token,
// conversation, base summary id (or ""), covers_to, covers, six usage
// deltas, then the entry's fields.
// Returns {1, id} or {0, reason}.
var summaryScript = redis.NewScript(usageLua + `
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return {0, 'lease'} end
local conv = ARGV[2]
local r = redis.call('HMGET', KEYS[2], conv .. ':start', conv .. ':summary')
if not r[1] then return {0, 'conversation gone'} end
if (r[2] or '') ~= ARGV[3] then return {0, 'another summary'} end
if #redis.call('XRANGE', KEYS[3], ARGV[4], ARGV[4]) == 0 then return {0, 'messages gone'} end
local fields = {'conversation', conv}
for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('HSET', KEYS[2], conv .. ':summary', id, conv .. ':summary_to', ARGV[4], conv .. ':summarized', ARGV[5], conv .. ':last', id)
addusage(KEYS[1], 6)
return {1, id}
`)

// addUsageScript adds usage to an existing session's totals.
//
// KEYS: session. ARGV: six usage deltas. Returns 1, or 0 for no session.
var addUsageScript = redis.NewScript(usageLua + `
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
addusage(KEYS[1], 1)
return 1
`)

// generatedTitleScript stores a generated title and the usage of the
// call that made it, in one write: a title set meanwhile (by hand, say)
// is kept when only unset, and the usage counts all the same, for the call
// was billed.
//
// KEYS: session, conversations. ARGV: conversation ("": the latest),
// title, only unset (1|0), six usage deltas.
// Returns {conversation or "" when there is none, 1 if stored}.
var generatedTitleScript = redis.NewScript(usageLua + `
if redis.call('EXISTS', KEYS[1]) == 0 then return {'', 0} end
addusage(KEYS[1], 4)
local conv = ARGV[1]
if conv == '' then conv = redis.call('HGET', KEYS[1], 'conversation') or '' end
if conv == '' or redis.call('HEXISTS', KEYS[2], conv .. ':created_ms') == 0 then return {'', 0} end
if ARGV[3] == '1' and redis.call('HEXISTS', KEYS[2], conv .. ':title') == 1 then return {conv, 0} end
redis.call('HSET', KEYS[2], conv .. ':title', ARGV[2])
return {conv, 1}
`)

// releaseCompactionScript deletes the lease if ARGV[1] holds it.
var releaseCompactionScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`)

func usageArgs(u Usage) []any {
	return []any{u.PromptTokens, u.CompletionTokens, u.CachedTokens, u.HistoryTokens, u.Requests, u.CostNanos}
}

// TakeCompaction takes the session's compaction lease for ttl
// (DefaultCompactionTTL when 0), across every process that shares the
// Redis; ErrCompacting while another holds it. The lease expires on its
// own, so a process that dies mid-compaction holds it at most ttl.
func (s *RedisStore) TakeCompaction(ctx context.Context, session string, ttl time.Duration) (string, error) {
	if session == "" {
		return "", fmt.Errorf("take compaction: %w", ErrEmptySession)
	}
	if ttl <= 0 {
		ttl = DefaultCompactionTTL
	}
	token := newToken()
	ok, err := s.client.SetNX(ctx, s.compactKey(session), token, ttl).Result()
	if err != nil {
		return "", fmt.Errorf("take compaction %s: %w", session, err)
	}
	if !ok {
		return "", fmt.Errorf("take compaction %s: %w", session, ErrCompacting)
	}
	return token, nil
}

// ReleaseCompaction gives the lease back if token holds it.
func (s *RedisStore) ReleaseCompaction(ctx context.Context, session, token string) error {
	if err := releaseCompactionScript.Run(ctx, s.client, []string{s.compactKey(session)}, token).Err(); err != nil {
		return fmt.Errorf("release compaction %s: %w", session, err)
	}
	return nil
}

// Compaction reads what a compaction of conversation conv ("": the
// session's latest) starts from, in one round trip; found is false when
// there is no such conversation.
func (s *RedisStore) Compaction(ctx context.Context, session, conv string, limit int) (CompactionInput, bool, error) {
	if session == "" {
		return CompactionInput{}, false, fmt.Errorf("read compaction: %w", ErrEmptySession)
	}
	res, err := compactionScript.Run(ctx, s.client, s.sessionKeys(session)[:3], conv, max(limit, 0)).Slice()
	if err != nil {
		return CompactionInput{}, false, fmt.Errorf("read compaction %s: %w", session, err)
	}
	if len(res) == 0 {
		return CompactionInput{}, false, nil
	}
	if len(res) != 6 {
		return CompactionInput{}, false, fmt.Errorf("read compaction %s: script reply of %d elements, want 6", session, len(res))
	}
	in := CompactionInput{}
	in.Conversation, _ = res[0].(string)
	cur, _ := res[1].(int64)
	in.Current = cur == 1
	in.Unsummarized, _ = res[4].(int64)
	titled, _ := res[5].(int64)
	in.TitleSet = titled == 1
	if e, ok := res[2].([]any); ok && len(e) > 0 {
		m, err := decodeEntry(e)
		if err != nil {
			return CompactionInput{}, false, fmt.Errorf("read compaction %s: %w", session, err)
		}
		in.Summary = &m
	}
	es, _ := res[3].([]any)
	for _, e := range es {
		m, err := decodeEntry(e)
		if err != nil {
			return CompactionInput{}, false, fmt.Errorf("read compaction %s: %w", session, err)
		}
		in.Messages = append(in.Messages, m)
	}
	return in, true, nil
}

// StoreSummary writes a summary in one script, with the usage it cost, if
// token still holds the session's compaction lease and the conversation's
// latest summary is still w.Base; else ErrCompactionLost and nothing is
// written.
func (s *RedisStore) StoreSummary(ctx context.Context, session, token string, w SummaryWrite) (Message, error) {
	if session == "" {
		return Message{}, fmt.Errorf("store summary: %w", ErrEmptySession)
	}
	m := w.summaryMessage(time.Now().UnixMilli())
	args := []any{token, w.Conversation, w.Base, w.CoversTo, w.Covers}
	args = append(args, usageArgs(w.Usage)...)
	for _, f := range encodeSummary(m) {
		args = append(args, f)
	}
	keys := append(s.sessionKeys(session)[:3], s.compactKey(session))
	res, err := summaryScript.Run(ctx, s.client, keys, args...).Slice()
	if err != nil {
		return Message{}, fmt.Errorf("store summary %s: %w", session, err)
	}
	if len(res) != 2 {
		return Message{}, fmt.Errorf("store summary %s: script reply of %d elements, want 2", session, len(res))
	}
	if ok, _ := res[0].(int64); ok != 1 {
		return Message{}, fmt.Errorf("store summary %s: %v: %w", session, res[1], ErrCompactionLost)
	}
	m.ID, _ = res[1].(string)
	m.Conversation = w.Conversation
	return m, nil
}

// AddUsage adds u to the session's totals (a background call made for
// it); nothing for an unknown session.
func (s *RedisStore) AddUsage(ctx context.Context, session string, u Usage) error {
	if err := addUsageScript.Run(ctx, s.client, []string{s.sessionKey(session)}, usageArgs(u)...).Err(); err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("add usage %s: %w", session, err)
	}
	return nil
}

// StoreTitle stores a generated title for conversation conv ("": the
// latest) as a title set by hand, and adds u (what generating it cost) to
// the session's totals, in one write. With onlyUnset a title set
// meanwhile is kept (stored is false). It returns the conversation, ""
// when the session or conversation does not exist; the usage is added
// whenever the session exists.
func (s *RedisStore) StoreTitle(ctx context.Context, session, conv, title string, onlyUnset bool, u Usage) (string, bool, error) {
	if session == "" {
		return "", false, fmt.Errorf("store title: %w", ErrEmptySession)
	}
	args := append([]any{conv, title, boolArg(onlyUnset)}, usageArgs(u)...)
	res, err := generatedTitleScript.Run(ctx, s.client, s.sessionKeys(session)[:2], args...).Slice()
	if err != nil {
		return "", false, fmt.Errorf("store title %s: %w", session, err)
	}
	if len(res) != 2 {
		return "", false, fmt.Errorf("store title %s: script reply of %d elements, want 2", session, len(res))
	}
	id, _ := res[0].(string)
	stored, _ := res[1].(int64)
	return id, stored == 1, nil
}

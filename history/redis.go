package history

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrEmptySession is returned for an empty session id: it would give keys
// an empty hash tag and scatter a session over Cluster slots.
var ErrEmptySession = errors.New("empty session id")

// DefaultPrefix is the key prefix used when NewRedis is given none.
const DefaultPrefix = "hp"

// RedisStore keeps conversations in Redis (standalone or Cluster).
//
// Layout, for prefix P and session S (every key of a session carries the
// hash tag {S}, so a session lives on one Cluster slot):
//
//	P:{S}:session        hash: conversation (the latest), is_active,
//	                     created_ms, last_active_ms, messages, conversations,
//	                     retained, and the usage totals (cost_nanos)
//	P:{S}:messages       stream: every message of every conversation, oldest
//	                     first; each entry's first field is its conversation
//	P:{S}:conversations  hash: per conversation c, c:start and c:last (first
//	                     and last entry ids), c:created_ms, c:last_ms,
//	                     c:messages, c:title (set), c:auto_title (derived)
//	P:{S}:idem           sorted set: idempotency key -> ms
//	P:sessions           sorted set: session id -> last active ms
//	P:sessions:channel:<channel>, P:sessions:user:<user>,
//	P:sessions:agent:<agent>
//	                     the same, per part of the session id
//
// Every key a script touches is one of a session's fixed keys, passed in
// KEYS. The indexes are on other Cluster slots, so they are written in the
// same pipeline as a turn's script, not inside it.
//
// It is safe for concurrent use.
type RedisStore struct {
	client   redis.UniversalClient
	prefix   string
	leaseTTL time.Duration
	obs      LiveObserver
	log      *slog.Logger
	wake     *waker
	blocking redis.UniversalClient // the watches' blocking reads
	hubs     *hubs
	cache    *windowCache // nil: off
	cacheObs WindowCacheObserver
}

// NewRedis returns a store that keeps its keys under prefix (DefaultPrefix
// when empty). Close stops what it starts on its own.
func NewRedis(client redis.UniversalClient, prefix string, opts ...RedisOption) *RedisStore {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	s := &RedisStore{client: client, prefix: prefix, leaseTTL: DefaultLeaseTTL, obs: noObserver{}, log: slog.New(slog.DiscardHandler), blocking: client,
		cache: newWindowCache(DefaultWindowCacheBytes), cacheObs: noCacheObserver{}}
	for _, o := range opts {
		o(s)
	}
	if s.cache != nil {
		// After every option: which of them sets the cache's size and
		// which its observer may come in either order.
		s.cacheObs.WindowCacheOn(s.cache.size)
	}
	s.wake = &waker{client: client, log: s.log, subs: map[string]*wakeSub{}}
	s.hubs = newHubs(redisLive{s}, s.obs)
	return s
}

func (s *RedisStore) key(id, name string) string  { return s.prefix + ":{" + id + "}:" + name }
func (s *RedisStore) sessionKey(id string) string { return s.key(id, "session") }
func (s *RedisStore) streamKey(id string) string  { return s.key(id, "messages") }
func (s *RedisStore) convsKey(id string) string   { return s.key(id, "conversations") }
func (s *RedisStore) idemKey(id string) string    { return s.key(id, "idem") }
func (s *RedisStore) indexKey() string            { return s.prefix + ":sessions" }

// partIndexKey is the index of the sessions whose id has value as its
// part ("channel", "user" or "agent").
func (s *RedisStore) partIndexKey(part, value string) string {
	return s.prefix + ":sessions:" + part + ":" + value
}

// indexKeys are every index a session is listed in: all sessions, and
// those of its channel, user and agent when its id has the three parts.
func (s *RedisStore) indexKeys(session string) []string {
	keys := []string{s.indexKey()}
	if ch, u, a, ok := SplitID(session); ok {
		keys = append(keys, s.partIndexKey("channel", ch), s.partIndexKey("user", u), s.partIndexKey("agent", a))
	}
	return keys
}

// sessionKeys are the keys every script of a session takes, in this order.
func (s *RedisStore) sessionKeys(id string) []string {
	return []string{s.sessionKey(id), s.convsKey(id), s.streamKey(id), s.idemKey(id)}
}

// luaSummary reads a conversation's latest summary, for the scripts that
// read a window (luaLib's and the lease's).
const luaSummary = `
-- latestsum returns the summary entry id of stream (nil: none) and the
-- bound after the range it covers, to (exclusive); when it has none, or
-- it is gone, {} and lo.
local function latestsum(stream, id, to, lo)
  if id then
    local e = redis.call('XRANGE', stream, id, id)
    if #e == 1 then return e[1], '(' .. to end
  end
  return {}, lo
end
`

// luaLib is shared by the scripts that read a conversation. A session's
// conversations follow each other in its stream; collect still checks each
// entry's conversation, because a turn that was read from a conversation
// is written to it even when a newer one began meanwhile.
const luaLib = luaSummary + `
-- issum reports whether stream entry e is a summary: its kind comes right
-- after its conversation (see encodeSummary).
local function issum(e)
  return e[2][3] == 'kind' and e[2][4] == 'summary'
end

-- collect returns up to n (0: all) entries of conversation conv between
-- ids lo and hi (inclusive, or exclusive with a '(' prefix), oldest first,
-- or newest first when rev; summaries left out when nosum.
local function collect(stream, conv, lo, hi, n, rev, nosum)
  local out = {}
  local batch = 256
  if n > 0 and n < batch then batch = n end
  while true do
    local es
    if rev then es = redis.call('XREVRANGE', stream, hi, lo, 'COUNT', batch)
    else es = redis.call('XRANGE', stream, lo, hi, 'COUNT', batch) end
    for _, e in ipairs(es) do
      if e[2][2] == conv and not (nosum and issum(e)) then
        out[#out + 1] = e
        if n > 0 and #out >= n then return out end
      end
    end
    if #es < batch then return out end
    if rev then hi = '(' .. es[#es][1] else lo = '(' .. es[#es][1] end
  end
end

-- win reads the window of conversation conv: its newest n messages after
-- the range its latest summary covers, newest first, and that summary
-- ({} when it has none).
local function win(convs, stream, conv, n)
  local r = redis.call('HMGET', convs, conv .. ':start', conv .. ':last', conv .. ':summary', conv .. ':summary_to')
  if not r[1] then return {{}, {}} end
  local sum, lo = latestsum(stream, r[3], r[4], r[1])
  return {collect(stream, conv, lo, r[2], n, true, true), sum}
end

-- idlt reports whether stream id a is lower than b.
local function idlt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
`

// windowScript reads the newest ARGV[1] messages of the current
// conversation unless it is ended or idle.
//
// KEYS: session, conversations, messages. ARGV: n, now ms, idle timeout ms
// (0: never idle). Returns {} or {conversation id, entries newest first,
// latest summary entry or {}}.
var windowScript = redis.NewScript(luaLib + `
local h = redis.call('HMGET', KEYS[1], 'conversation', 'last_active_ms', 'is_active')
if not h[1] or h[3] ~= '1' then return {} end
local idle = tonumber(ARGV[3])
if idle > 0 and tonumber(ARGV[2]) - tonumber(h[2] or '0') > idle then return {} end
local n = tonumber(ARGV[1])
if n <= 0 then return {h[1], {}, {}} end
local w = win(KEYS[2], KEYS[3], h[1], n)
return {h[1], w[1], w[2]}
`)

// appendScript writes one turn, and gives back the turn lease the
// request held, if any.
//
// KEYS: session, conversations, messages, idem, lease, queue, waiters,
// live, watched.
// ARGV: now ms, idle ms, retention ms, idempotency key, idempotency cutoff
// ms, idempotency window ms, six usage deltas, arrival ms, the conversation
// the turn was read from (or ""), derived title, 1 to start a new
// conversation, message count, write key, lease token (or ""), generation,
// wake channel, the generation's last delta (JSON, or ""), a random
// nonce (the session's created_nonce, when this turn creates it), then per
// message its number of field/value strings followed by them.
// Returns {conversation id, 0 (existing) | 1 (new) | 2 (duplicate),
// messages its latest summary does not cover, ids...}.
var appendScript = redis.NewScript(luaLease + luaUsage + `
-- The script runs on every request, and Redis serves nothing else
-- meanwhile: it reads each hash once (HMGET) and writes what changed in
-- one HSET per hash, rather than a command per field.

-- int writes a count for HSET: a Lua number (a double) as an integer, not
-- as 1e+15.
local function int(x) return string.format('%d', x) end

local function write()
  local now = tonumber(ARGV[1])
  local idle = tonumber(ARGV[2])
  local retention = tonumber(ARGV[3])
  local h = redis.call('HMGET', KEYS[1], 'conversation', 'last_active_ms', 'is_active', 'retained', 'created_ms', 'messages',
    'cost_micros', unpack(usage))
  local conv = h[1] or ''
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[5])
  local dup = false
  if ARGV[4] ~= '' then
    local w = ARGV[18]
    -- This very write, retried after its answer was lost: nothing to do.
    if w ~= '' and redis.call('ZSCORE', KEYS[4], w) then return {conv, 2}, 0, true end
    -- NX: a key already there marks a repeat, and keeps its time.
    dup = redis.call('ZADD', KEYS[4], 'NX', ARGV[1], ARGV[4]) == 0
    -- Another write's repeat, without a write key: nothing either. (A
    -- request whose key the proxy generated has none: this is its own
    -- write, retried.)
    if dup and w == '' then return {conv, 2}, 0, true end
    if w ~= '' then redis.call('ZADD', KEYS[4], ARGV[1], w) end
    redis.call('PEXPIRE', KEYS[4], ARGV[6])
    -- Otherwise a repeat of a recorded request: no second turn, but its
    -- upstream call is billed, so its usage counts (below).
  end
  -- The session hash's changes, written by flush.
  local set = {}
  local function put(f, v)
    set[#set + 1] = f
    set[#set + 1] = v
  end
  local function flush()
    if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
    set = {}
  end
  -- A session written before costs were kept in nano-USD has cost_micros:
  -- fold it into cost_nanos, times 1000 by appending three zeros to the
  -- integer (exact, where a Lua number is not beyond 2^53).
  if h[7] then
    if h[7] ~= '0' then h[13] = redis.call('HINCRBY', KEYS[1], 'cost_nanos', h[7] .. '000') end
    redis.call('HDEL', KEYS[1], 'cost_micros')
  end
  -- Every total is written, 0 included, so HGETALL shows each field the
  -- README lists from a session's first turn on. A sum is exact in Lua's
  -- numbers below 2^53; beyond, Redis adds it (exact to 2^63).
  for i = 1, 6 do
    local t, d = tonumber(h[7 + i] or '0'), tonumber(ARGV[6 + i])
    if t and math.abs(t) < 2^52 and math.abs(d) < 2^52 then put(usage[i], int(t + d))
    else redis.call('HINCRBY', KEYS[1], usage[i], ARGV[6 + i]) end
  end
  if not h[5] then
    put('created_ms', ARGV[1])
    -- Tells this session from one erased and written again within the
    -- same millisecond, whose stream may reuse the erased one's ids: a
    -- window cache's tail of the erased stream is then not trusted.
    put('created_nonce', ARGV[23])
  end
  local n = tonumber(ARGV[17])
  if dup then n = 0 end
  if n == 0 then
    flush()
    -- A turn that records no message (read-only, or a repeat's usage) may
    -- be the session's first: its fields still all exist.
    if not h[1] then
      redis.call('HSETNX', KEYS[1], 'conversation', '')
      redis.call('HSETNX', KEYS[1], 'is_active', '0')
      redis.call('HSETNX', KEYS[1], 'last_active_ms', '0')
      redis.call('HINCRBY', KEYS[1], 'messages', 0)
      redis.call('HINCRBY', KEYS[1], 'conversations', 0)
      redis.call('HSETNX', KEYS[1], 'retained', '1')
    end
    if dup then return {conv, 2}, 0 end
    return {conv, 0}, 0
  end
  local last = tonumber(h[2] or '0')
  local arrived = tonumber(ARGV[13])
  local read = ARGV[14]
  -- meta reads conversation c's fields the turn reads or changes.
  local function meta(c)
    return redis.call('HMGET', KEYS[2], c .. ':start', c .. ':last', c .. ':messages', c .. ':last_ms', c .. ':auto_title',
      c .. ':summarized')
  end
  -- kept reports whether the conversation of meta m still has messages:
  -- retention removes them, and one written by an older layout is not in
  -- the stream.
  local function kept(m)
    return m[1] and #redis.call('XRANGE', KEYS[3], m[1], m[2], 'COUNT', 1) > 0
  end
  if ARGV[16] == '1' then
    -- A new conversation asked for: the read one does not matter.
    read = ''
    h[3] = '0'
  end
  local m = false -- the meta of the conversation the turn goes to
  if read ~= '' then
    local r = meta(read)
    -- The turn was answered from this conversation: it belongs there,
    -- however long the reply took or the tool ran, and even when a newer
    -- one began meanwhile (without making it current again).
    if kept(r) then conv, m = read, r end
  end
  if not m and conv ~= '' and h[3] == '1' and not (idle > 0 and arrived - last > idle) then
    local r = meta(conv)
    if kept(r) then m = r end
  end
  local new = 0
  if not m then
    -- An expired conversation is not refilled: a new turn starts a new one.
    conv = 'c' .. redis.call('HINCRBY', KEYS[1], 'conversations', 1)
    put('conversation', conv)
    put('is_active', '1')
    m = {}
    new = 1
  end
  if now > last then put('last_active_ms', ARGV[1]) end
  local res = {conv, new}
  local i = 24
  for k = 1, n do
    local c = tonumber(ARGV[i])
    local fields = {'conversation', conv}
    for j = 1, c do fields[j + 2] = ARGV[i + j] end
    res[k + 2] = redis.call('XADD', KEYS[3], '*', unpack(fields))
    i = i + c + 1
  end
  local count = tonumber(m[3] or '0') + n
  local cset = {conv .. ':last', res[n + 2], conv .. ':messages', int(count)}
  if new == 1 then
    cset[#cset + 1] = conv .. ':created_ms'
    cset[#cset + 1] = ARGV[1]
    cset[#cset + 1] = conv .. ':start'
    cset[#cset + 1] = res[3]
  end
  if now > tonumber(m[4] or '0') then
    cset[#cset + 1] = conv .. ':last_ms'
    cset[#cset + 1] = ARGV[1]
  end
  if ARGV[15] ~= '' and not m[5] then
    cset[#cset + 1] = conv .. ':auto_title'
    cset[#cset + 1] = ARGV[15]
  end
  redis.call('HSET', KEYS[2], unpack(cset))
  put('messages', int(tonumber(h[6] or '0') + n))
  if not h[4] then put('retained', '1') end
  flush()
  if retention > 0 then
    -- The stream expires with the session's last activity; before that,
    -- ended conversations whose last turn is older than the retention are
    -- trimmed from its start, oldest first.
    redis.call('PEXPIRE', KEYS[3], retention)
    local cur = tonumber(string.sub(h[1] or conv, 2))
    if new == 1 then cur = tonumber(string.sub(conv, 2)) end
    local k = tonumber(h[4] or '1')
    local k0 = k
    while k < cur do
      local lm = redis.call('HGET', KEYS[2], 'c' .. k .. ':last_ms')
      if lm and tonumber(lm) >= now - retention then break end
      k = k + 1
    end
    if k > k0 then
      local s = redis.call('HGET', KEYS[2], 'c' .. k .. ':start')
      if s then redis.call('XTRIM', KEYS[3], 'MINID', s) end
      redis.call('HSET', KEYS[1], 'retained', k)
    end
  end
  -- What the conversation's latest summary does not cover: compaction is
  -- queued on it.
  return res, count - tonumber(m[6] or '0')
end
-- again: this very write ran before (its answer was lost, go-redis sent
-- it again), and released the lease or ended the generation then.
local res, pending, again = write()
if ARGV[19] ~= '' then
  -- The turn is written: the next waiting request reads it.
  local last = ''
  if #res > 2 then last = res[#res] end
  if not release(KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], ARGV[21], ARGV[19], ARGV[20], last, ARGV[22])
    and not again and redis.call('EXISTS', KEYS[5]) == 0 then
    -- The lease was lost (its TTL passed) and no one holds it: no
    -- generation is active, so this one's end is said with its turn,
    -- not a hub's block later by the dead-holder check (settle). Not
    -- by a retry of the write: its first run said it, or another
    -- generation was active then and its end followed the turn.
    endmark(KEYS[8], KEYS[9], ARGV[20], last)
  end
end
table.insert(res, 3, pending)
return res
`)

// Window returns up to n newest messages of the session's current
// conversation, oldest first, in one round trip. It returns an empty Window
// when there is no active conversation or it has been idle for longer than
// p.IdleTimeout at nowMs. Its cost does not depend on the conversation's
// length.
func (s *RedisStore) Window(ctx context.Context, session string, n int, nowMs int64, p Policy) (Window, error) {
	if session == "" {
		return Window{}, fmt.Errorf("read window: %w", ErrEmptySession)
	}
	keys := s.sessionKeys(session)[:3]
	res, err := windowScript.Run(ctx, s.client, keys, n, nowMs, p.IdleTimeout.Milliseconds()).Slice()
	if err != nil {
		return Window{}, fmt.Errorf("read window %s: %w", session, err)
	}
	if len(res) == 0 {
		return Window{}, nil
	}
	if len(res) != 3 {
		return Window{}, fmt.Errorf("read window %s: script reply of %d elements, want 3", session, len(res))
	}
	w, err := windowOf(res[0], res[1], res[2])
	if err != nil {
		return Window{}, fmt.Errorf("read window %s: %w", session, err)
	}
	return w, nil
}

// windowOf builds a Window from a script's conversation id, entries
// (newest first) and summary entry ({} or nil when none).
func windowOf(conv, entries, summary any) (Window, error) {
	id, _ := conv.(string)
	w := Window{ConversationID: id}
	es, ok := entries.([]any)
	if !ok {
		return Window{}, fmt.Errorf("script reply entries: got %T, want array", entries)
	}
	if len(es) > 0 {
		w.Messages = make([]Message, len(es))
		// XREVRANGE gives newest first; the window is oldest first.
		for i, e := range es {
			m, err := decodeEntry(e)
			if err != nil {
				return Window{}, err
			}
			w.Messages[len(es)-1-i] = m
		}
	}
	if s, ok := summary.([]any); ok && len(s) > 0 {
		m, err := decodeEntry(s)
		if err != nil {
			return Window{}, err
		}
		w.Summary = &m
	}
	return w, nil
}

// Append writes a turn atomically in one round trip: the session's keys in
// a Lua script, and the session indexes in the same pipeline (outside the
// script, because the indexes are on other Cluster slots).
//
// The indexes are updated even when the turn is a duplicate; they only
// move forward (ZADD GT), so a retried turn cannot make a session look
// older.
func (s *RedisStore) Append(ctx context.Context, session string, t Turn, p Policy) (AppendResult, error) {
	if session == "" {
		return AppendResult{}, fmt.Errorf("append turn: %w", ErrEmptySession)
	}
	t = prepareTurn(t, time.Now())
	keys, args := s.appendCall(ctx, session, t, p)
	res, err := s.runPipelined(ctx, appendScript, keys, args, func(pipe redis.Pipeliner) {
		s.queueIndex(ctx, pipe, session, t)
	})
	if err != nil {
		// The lease stays with the request: it may release it, or let it
		// expire; a write that landed although its answer was lost
		// released it already.
		return AppendResult{}, fmt.Errorf("append turn %s: %w", session, err)
	}
	t.Lease.ended()
	r, err := parseAppend(res)
	if err != nil {
		return AppendResult{}, fmt.Errorf("append turn %s: %w", session, err)
	}
	return r, nil
}

// queueIndex records the session's activity in its indexes. A turn
// without messages is not activity, but it still makes the session known.
func (s *RedisStore) queueIndex(ctx context.Context, pipe redis.Pipeliner, session string, t Turn) {
	z := redis.Z{Score: float64(t.NowMs), Member: session}
	for _, k := range s.indexKeys(session) {
		if len(t.Messages) == 0 {
			pipe.ZAddNX(ctx, k, z)
		} else {
			pipe.ZAddGT(ctx, k, z)
		}
	}
}

// runPipelined runs script by EVALSHA together with the commands extra
// queues, in one pipeline. When the server does not have the script cached
// (a pipelined EVALSHA cannot fall back by itself), the pipeline is sent
// again with EVAL; the extra commands must therefore be idempotent.
func (s *RedisStore) runPipelined(ctx context.Context, script *redis.Script, keys []string, args []any, extra func(redis.Pipeliner)) (any, error) {
	send := func(eval func(redis.Pipeliner) *redis.Cmd) (*redis.Cmd, error) {
		var cmd *redis.Cmd
		_, err := s.client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			cmd = eval(pipe)
			extra(pipe)
			return nil
		})
		return cmd, err
	}
	cmd, err := send(func(pipe redis.Pipeliner) *redis.Cmd { return script.EvalSha(ctx, pipe, keys, args...) })
	if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
		cmd, err = send(func(pipe redis.Pipeliner) *redis.Cmd { return script.Eval(ctx, pipe, keys, args...) })
	}
	if cmd.Err() != nil {
		return nil, cmd.Err()
	}
	if err != nil {
		return nil, err
	}
	return cmd.Val(), nil
}

// prepareTurn fills the defaults Append promises, on a copy of the turn's
// messages so the caller's slice is not changed.
func prepareTurn(t Turn, now time.Time) Turn {
	if t.NowMs == 0 {
		t.NowMs = now.UnixMilli()
	}
	if t.ArrivedMs == 0 {
		t.ArrivedMs = t.NowMs
	}
	msgs := make([]Message, len(t.Messages))
	for i, m := range t.Messages {
		m.ID, m.Conversation = "", ""
		m.IdempotencyKey = t.IdempotencyKey
		if len(m.Parts) == 0 {
			m.Parts = nil
		}
		if len(m.ToolCalls) == 0 {
			m.ToolCalls = nil
		}
		if m.CreatedMs == 0 {
			m.CreatedMs = t.NowMs
		}
		if m.Kind == "" {
			m.Kind = impliedKind(m)
		}
		if m.Status == "" {
			m.Status = StatusComplete
		}
		msgs[i] = m
	}
	if n := len(msgs); n > 0 && t.Usage.Requests > 0 {
		u := t.Usage
		msgs[n-1].Usage = &u
	}
	t.Messages = msgs
	return t
}

// appendCall is appendScript's keys and arguments for a turn.
func (s *RedisStore) appendCall(ctx context.Context, session string, t Turn, p Policy) (keys []string, args []any) {
	token, gen := t.Lease.args()
	final := ""
	if d := t.Lease.flush(ctx); d != nil {
		// The fragments not written yet go before the generation's end.
		final = d.json()
	}
	return append(s.sessionKeys(session), s.leaseKeys(session)...), appendArgs(t, p, token, gen, s.wakeChannel(session), final)
}

func appendArgs(t Turn, p Policy, token, gen, channel, final string) []any {
	retention := p.Retention.Milliseconds()
	if p.Retention > 0 && retention == 0 {
		retention = 1
	}
	args := []any{
		t.NowMs,
		p.IdleTimeout.Milliseconds(),
		retention,
		t.IdempotencyKey,
		t.NowMs - IdempotencyWindow.Milliseconds(),
		IdempotencyWindow.Milliseconds(),
		t.Usage.PromptTokens,
		t.Usage.CompletionTokens,
		t.Usage.CachedTokens,
		t.Usage.HistoryTokens,
		t.Usage.Requests,
		t.Usage.CostNanos,
		t.ArrivedMs,
		t.ConversationID,
		turnTitle(t.Messages),
		boolArg(t.NewConversation),
		len(t.Messages),
		t.WriteKey,
		token,
		gen,
		channel,
		final,
		// A new session's created_nonce; 64 random bits tell two
		// sessions of one id apart, where created_ms (the proxy's clock)
		// may not.
		strconv.FormatUint(rand.Uint64(), 36),
	}
	for _, m := range t.Messages {
		fields := encodeMessage(m)
		args = append(args, len(fields))
		for _, f := range fields {
			args = append(args, f)
		}
	}
	return args
}

func boolArg(b bool) int {
	if b {
		return 1
	}
	return 0
}

// impliedKind is the kind a message's role and tool calls imply: what
// Append gives a message without one, and what an entry without a kind
// field is read as. An empty tool_calls array implies no call.
func impliedKind(m Message) string {
	switch {
	case HasToolCalls(m.ToolCalls):
		return KindToolCall
	case m.Role == RoleTool:
		return KindToolResult
	default:
		return KindMessage
	}
}

// encodeMessage gives a message's stream fields, omitting empty ones, and
// two that hold their default: kind when it is the one role and tool calls
// imply, and status when complete. Those two are on almost every message,
// and each field costs Redis and the proxy on every window read (20
// entries, newest first): decodeEntry gives both back. The script puts the
// conversation's id first.
func encodeMessage(m Message) []string {
	f := make([]string, 0, 30)
	add := func(k, v string) {
		if v != "" {
			f = append(f, k, v)
		}
	}
	add("role", m.Role)
	add("content", m.Content)
	add("content_parts", string(m.Parts))
	if m.ContentNull {
		add("content_null", "1")
	}
	add("name", m.Name)
	add("tool_calls", string(m.ToolCalls))
	add("tool_call_id", m.ToolCallID)
	add("refusal", m.Refusal)
	if m.Kind != impliedKind(m) {
		add("kind", m.Kind)
	}
	add("user", m.User)
	add("model", m.Model)
	if m.Tokens != 0 {
		add("tokens", strconv.Itoa(m.Tokens))
	}
	if m.CreatedMs != 0 {
		add("created_ms", strconv.FormatInt(m.CreatedMs, 10))
	}
	add("request_id", m.RequestID)
	if m.Usage != nil {
		add("usage", encodeUsage(*m.Usage))
	}
	if m.Status != StatusComplete {
		add("status", m.Status)
	}
	add("idem", m.IdempotencyKey)
	add("covers_from", m.CoversFrom)
	add("covers_to", m.CoversTo)
	if m.Covers != 0 {
		add("covers", strconv.FormatInt(m.Covers, 10))
	}
	return f
}

// encodeSummary gives a summary's stream fields: its kind first (right
// after the conversation the script puts before it), so that the scripts
// that read a window tell it from a message without reading every field.
func encodeSummary(m Message) []string {
	m.Kind = ""
	return append([]string{"kind", KindSummary}, encodeMessage(m)...)
}

// decodeEntry turns a stream entry, {id, {field, value, ...}}, into a
// Message. Unknown fields are ignored so that older code reads newer data.
// A missing kind is the one role and tool calls imply, a missing status is
// complete (see encodeMessage); entries written before these were left
// out carry both, and read the same.
func decodeEntry(e any) (Message, error) {
	m, _, err := decodeEntryOf(e)
	return m, err
}

// decodeEntryOf is decodeEntry, and tells which of the message's kind and
// status the entry left out (a lean entry's): those are the constants,
// not strings read from Redis (see entryBytes).
func decodeEntryOf(e any) (m Message, implied impliedFields, err error) {
	pair, ok := e.([]any)
	if !ok || len(pair) != 2 {
		return Message{}, implied, fmt.Errorf("stream entry: got %T, want [id fields]", e)
	}
	id, ok := pair[0].(string)
	if !ok {
		return Message{}, implied, fmt.Errorf("stream entry id: got %T, want string", pair[0])
	}
	fields, ok := pair[1].([]any)
	if !ok || len(fields)%2 != 0 {
		return Message{}, implied, fmt.Errorf("stream entry %s fields: got %T of odd length or wrong type", id, pair[1])
	}
	m = Message{ID: id}
	for i := 0; i < len(fields); i += 2 {
		k, _ := fields[i].(string)
		v, _ := fields[i+1].(string)
		switch k {
		case "conversation":
			m.Conversation = v
		case "role":
			m.Role = v
		case "content":
			m.Content = v
		case "content_parts":
			m.Parts = json.RawMessage(v)
		case "content_null":
			m.ContentNull = v == "1"
		case "name":
			m.Name = v
		case "tool_calls":
			m.ToolCalls = json.RawMessage(v)
		case "tool_call_id":
			m.ToolCallID = v
		case "refusal":
			m.Refusal = v
		case "kind":
			m.Kind = v
		case "user":
			m.User = v
		case "model":
			m.Model = v
		case "tokens":
			m.Tokens, err = strconv.Atoi(v)
		case "created_ms":
			m.CreatedMs, err = strconv.ParseInt(v, 10, 64)
		case "request_id":
			m.RequestID = v
		case "usage":
			var u Usage
			u, err = decodeUsage(v)
			m.Usage = &u
		case "status":
			m.Status = v
		case "idem":
			m.IdempotencyKey = v
		case "covers_from":
			m.CoversFrom = v
		case "covers_to":
			m.CoversTo = v
		case "covers":
			m.Covers, err = strconv.ParseInt(v, 10, 64)
		}
		if err != nil {
			return Message{}, implied, fmt.Errorf("stream entry %s field %s: %w", id, k, err)
		}
	}
	// Versions before this one wrote kind tool_call on a message whose
	// tool_calls was an empty array: it calls nothing. (The kind read is
	// then dropped for the constant.)
	if m.Kind == "" || (m.Kind == KindToolCall && !HasToolCalls(m.ToolCalls)) {
		m.Kind, implied.kind = impliedKind(m), true
	}
	if m.Status == "" {
		m.Status, implied.status = StatusComplete, true
	}
	return m, implied, nil
}

// convEntries splits a script's {conversation id, entries} reply; an empty
// reply means no conversation.
func convEntries(res []any) (string, []any, error) {
	if len(res) == 0 {
		return "", nil, nil
	}
	if len(res) != 2 {
		return "", nil, fmt.Errorf("script reply: got %d elements, want 2", len(res))
	}
	conv, ok := res[0].(string)
	if !ok {
		return "", nil, fmt.Errorf("script reply conversation: got %T, want string", res[0])
	}
	entries, ok := res[1].([]any)
	if !ok {
		return "", nil, fmt.Errorf("script reply entries: got %T, want array", res[1])
	}
	return conv, entries, nil
}

func parseAppend(v any) (AppendResult, error) {
	res, ok := v.([]any)
	if !ok || len(res) < 3 {
		return AppendResult{}, fmt.Errorf("script reply: got %v, want [conversation status unsummarized ids...]", v)
	}
	conv, _ := res[0].(string)
	status, _ := res[1].(int64)
	pending, _ := res[2].(int64)
	r := AppendResult{ConversationID: conv, Duplicate: status == 2, NewConversation: status == 1, Unsummarized: pending}
	for _, id := range res[3:] {
		s, ok := id.(string)
		if !ok {
			return AppendResult{}, fmt.Errorf("script reply id: got %T, want string", id)
		}
		r.IDs = append(r.IDs, s)
	}
	return r, nil
}

// Ping checks that Redis answers.
func (s *RedisStore) Ping(ctx context.Context) error {
	if err := s.client.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("ping redis: %w", err)
	}
	return nil
}

// encodeUsage writes a turn's usage as a stream field: its six counts,
// comma-separated, in the order of Usage's fields.
func encodeUsage(u Usage) string {
	return fmt.Sprintf("%d,%d,%d,%d,%d,%d", u.PromptTokens, u.CompletionTokens, u.CachedTokens, u.HistoryTokens, u.Requests, u.CostNanos)
}

func decodeUsage(s string) (Usage, error) {
	var u Usage
	dst := []*int64{&u.PromptTokens, &u.CompletionTokens, &u.CachedTokens, &u.HistoryTokens, &u.Requests, &u.CostNanos}
	parts := strings.Split(s, ",")
	if len(parts) != len(dst) {
		return Usage{}, fmt.Errorf("usage %q: want %d numbers", s, len(dst))
	}
	for i, p := range parts {
		n, err := strconv.ParseInt(p, 10, 64)
		if err != nil {
			return Usage{}, fmt.Errorf("usage %q: %w", s, err)
		}
		*dst[i] = n
	}
	return u, nil
}

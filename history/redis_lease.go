package history

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// The turn lease in Redis, for session S (all keys carry S's hash tag):
//
//	P:{S}:lease    string: the holder's token, expiring with the lease's TTL
//	P:{S}:queue    list: tokens of the requests waiting, oldest first
//	P:{S}:waiters  hash: token -> the Redis time (ms) until which that
//	               waiter counts as alive; it re-checks before then
//	P:{S}:wake     pub/sub channel: the token of the waiter whose turn it is
//
// A request takes the lease in the script that reads its window, and
// gives it back in the script that appends its turn, so a session that is
// not busy costs no extra round trip. One that is busy queues its token
// and waits for its wake-up on one pub/sub connection per process (shared
// by every waiting request), re-checking only when woken, when the lease
// would expire (its holder died) or every half TTL (to stay alive in the
// queue). Waiters whose time ran out (a request that gave up, a process
// that died) are skipped by whoever looks at the queue next.

// RedisOption configures a RedisStore.
type RedisOption func(*RedisStore)

// WithLeaseTTL sets how long a turn lease lasts without renewal
// (DefaultLeaseTTL when 0 or less): the longest a session waits for a
// holder that died.
func WithLeaseTTL(d time.Duration) RedisOption {
	return func(s *RedisStore) {
		if d > 0 {
			s.leaseTTL = d
		}
	}
}

// WithWindowCacheBytes bounds the store's window cache (see windowCache)
// to about n bytes; 0 or less turns it off. DefaultWindowCacheBytes when
// not set.
func WithWindowCacheBytes(n int64) RedisOption {
	return func(s *RedisStore) { s.cache = newWindowCache(n) }
}

// WithWindowCacheObserver counts the takes that read a window with the
// store's window cache on, and reports what the cache holds (see
// WindowCacheObserver).
func WithWindowCacheObserver(o WindowCacheObserver) RedisOption {
	return func(s *RedisStore) {
		if o != nil {
			s.cacheObs = o
		}
	}
}

// WithLiveObserver counts the store's leases and deltas.
func WithLiveObserver(o LiveObserver) RedisOption {
	return func(s *RedisStore) {
		if o != nil {
			s.obs = o
		}
	}
}

// WithRedisLogger sets where the store logs what goes wrong on its own
// goroutines (lease renewals, pub/sub).
func WithRedisLogger(l *slog.Logger) RedisOption {
	return func(s *RedisStore) {
		if l != nil {
			s.log = l
		}
	}
}

func (s *RedisStore) leaseKey(id string) string   { return s.key(id, "lease") }
func (s *RedisStore) queueKey(id string) string   { return s.key(id, "queue") }
func (s *RedisStore) waitersKey(id string) string { return s.key(id, "waiters") }
func (s *RedisStore) liveKey(id string) string    { return s.key(id, "live") }
func (s *RedisStore) watchedKey(id string) string { return s.key(id, "watched") }
func (s *RedisStore) wakeChannel(id string) string {
	return s.key(id, "wake")
}

// leaseKeys are the keys the lease scripts take after a session's own,
// in this order.
func (s *RedisStore) leaseKeys(id string) []string {
	return []string{s.leaseKey(id), s.queueKey(id), s.waitersKey(id), s.liveKey(id), s.watchedKey(id)}
}

// Bounds of the live stream P:{S}:live, where a watched session's deltas
// and generation ends go (see Watch).
const (
	liveCap = 1000             // entries, approximately (XADD MAXLEN ~)
	liveTTL = 10 * time.Minute // after its last entry
)

// luaLease is shared by the scripts that take, renew and release a lease.
var luaLease = fmt.Sprintf(`
local LIVE_CAP, LIVE_TTL = %d, %d

-- nowms is Redis's own clock: every proxy instance judges waiters by it.
local function nowms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- head returns the first waiter still alive, dropping those whose time ran
-- out (a request that gave up, a process that died). now (nowms) is read
-- here when nil: an empty queue, the usual case, needs no TIME.
local function head(queue, waiters, now)
  while true do
    local h = redis.call('LINDEX', queue, 0)
    if not h then return false end
    now = now or nowms()
    local d = redis.call('HGET', waiters, h)
    if d and tonumber(d) >= now then return h end
    redis.call('LPOP', queue)
    redis.call('HDEL', waiters, h)
  end
end

-- wake tells the first waiter still alive that the lease is free.
local function wake(queue, waiters, channel)
  local h = head(queue, waiters, nil)
  if h then redis.call('PUBLISH', channel, h) end
end

-- shown reports whether generation gen's delta is the live stream's last
-- entry: its deltas were written and its end not yet. A watcher that saw
-- them and comes back, also after the session stopped counting as
-- watched, must learn that it ended.
local function shown(live, gen)
  if gen == '' then return false end
  local e = redis.call('XREVRANGE', live, '+', '-', 'COUNT', 1)
  return #e == 1 and e[1][2][2] == 'delta' and e[1][2][4] == gen
end

-- endmark notes in the live stream that a generation ended, after the
-- message with id last ('' when it recorded none), if anyone watches.
local function endmark(live, watched, gen, last)
  if redis.call('EXISTS', watched) == 1 or shown(live, gen) then
    redis.call('XADD', live, 'MAXLEN', '~', LIVE_CAP, '*', 't', 'end', 'gen', gen, 'last', last)
    redis.call('PEXPIRE', live, LIVE_TTL)
  end
end

-- release frees the lease if token holds it, wakes the next waiter and
-- marks the generation's end, after its last delta (JSON, or ''). It
-- reports whether token held it.
local function release(lease, queue, waiters, live, watched, channel, token, gen, last, delta)
  if token == '' or redis.call('GET', lease) ~= token then return false end
  redis.call('DEL', lease)
  wake(queue, waiters, channel)
  if delta ~= '' and redis.call('EXISTS', watched) == 1 then
    redis.call('XADD', live, 'MAXLEN', '~', LIVE_CAP, '*', 't', 'delta', 'gen', gen, 'd', delta)
  end
  endmark(live, watched, gen, last)
  return true
end
`, liveCap, liveTTL.Milliseconds())

// takeScript takes the session's turn lease and finds its window: the
// conversation to read, as windowScript does. The messages themselves are
// read by an XREVRANGE in the same transaction (see takeRead).
//
// KEYS: session, conversations, messages, lease, queue, waiters, watched.
// ARGV: n, now ms, idle timeout ms, token, lease TTL ms, hold (1: keep
// the lease; 0: only wait for the turn, then pass it on), reject (1: do
// not queue), wake channel.
// Returns {0, ms until the lease or the first waiter's place runs out}
// when busy, else {1, conversation or ”, its first entry's id or ”,
// watch mark or ”, latest summary entry or {}, and the window's lower
// bound as XRANGE takes it: '(' and the last id that summary covers, or
// the first entry's id, its last entry's id or ”, and the session's
// created_ms and created_nonce, as "ms:nonce" (which tell a session erased
// and written again; ” without a created_ms)}.
var takeScript = redis.NewScript(luaLease + luaSummary + `
local token, ttl = ARGV[4], tonumber(ARGV[5])
local mark = ''
local holder = redis.call('GET', KEYS[4])
if holder == token then
  redis.call('PEXPIRE', KEYS[4], ttl)
else
  local h = false
  if not holder then h = head(KEYS[5], KEYS[6], nil) end
  if holder or (h and h ~= token) then
    local now = nowms()
    if ARGV[7] ~= '1' then
      -- Queued once, in arrival order; a waiter that comes back only
      -- renews its time.
      if redis.call('HSET', KEYS[6], token, now + ttl) == 1 then redis.call('RPUSH', KEYS[5], token) end
      redis.call('PEXPIRE', KEYS[5], 2 * ttl)
      redis.call('PEXPIRE', KEYS[6], 2 * ttl)
    end
    -- When the next change may come unannounced: the holder's lease runs
    -- out, or (the lease free) the place of the waiter first in line, which
    -- may have died with its process.
    if holder then return {0, redis.call('PTTL', KEYS[4])} end
    return {0, math.max(tonumber(redis.call('HGET', KEYS[6], h)) - now, 1)}
  end
  if h == token then
    redis.call('LPOP', KEYS[5])
    redis.call('HDEL', KEYS[6], token)
  end
  if ARGV[6] == '1' then
    redis.call('SET', KEYS[4], token, 'PX', ttl)
  else
    wake(KEYS[5], KEYS[6], ARGV[8])
  end
end
mark = redis.call('GET', KEYS[7]) or ''
local s = redis.call('HMGET', KEYS[1], 'conversation', 'last_active_ms', 'is_active', 'created_ms', 'created_nonce')
if not s[1] or s[3] ~= '1' then return {1, '', '', mark} end
local idle = tonumber(ARGV[3])
if idle > 0 and tonumber(ARGV[2]) - tonumber(s[2] or '0') > idle then return {1, '', '', mark} end
if tonumber(ARGV[1]) <= 0 then return {1, s[1], '', mark} end
local r = redis.call('HMGET', KEYS[2], s[1] .. ':start', s[1] .. ':summary', s[1] .. ':summary_to', s[1] .. ':last')
local sum, lo = latestsum(KEYS[3], r[2], r[3], r[1] or '')
local created = ''
if s[4] then created = s[4] .. ':' .. (s[5] or '') end
return {1, s[1], r[1] or '', mark, sum, lo, r[4] or '', created}
`)

// releaseScript gives a lease up without a turn, or takes a waiter that
// gave up out of the queue (it may have been granted the lease unawares,
// by a script whose answer it never got).
//
// KEYS: lease, queue, waiters, live, watched. ARGV: token, generation,
// wake channel. Returns 1 when the token held the lease.
var releaseScript = redis.NewScript(luaLease + `
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then redis.call('LREM', KEYS[2], 1, ARGV[1]) end
if release(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[1], ARGV[2], '', '') then return 1 end
if redis.call('EXISTS', KEYS[1]) == 0 then
  wake(KEYS[2], KEYS[3], ARGV[3])
  -- The lease was lost (its TTL passed) and no one holds it: a generation
  -- whose deltas were written ends here, as a lost holder's turn does
  -- (appendScript). Nothing else would end it once its watchers left: a
  -- watcher that comes back finds the lease free and runs no dead-holder
  -- check. Only after its own delta, so a release sent again, or one that
  -- comes after its turn's write, says nothing more.
  if ARGV[2] ~= '' and shown(KEYS[4], ARGV[2]) then endmark(KEYS[4], KEYS[5], ARGV[2], '') end
end
return 0
`)

// beatScript renews a lease and, while the session is watched, adds a
// reply's delta to its live stream.
//
// KEYS: lease, live, watched. ARGV: token, TTL ms, generation, delta JSON
// (” none). Returns {1 if held, watch mark or ”}.
var beatScript = redis.NewScript(luaLease + `
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, ''} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local m = redis.call('GET', KEYS[3]) or ''
if ARGV[4] ~= '' and m ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', LIVE_CAP, '*', 't', 'delta', 'gen', ARGV[3], 'd', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], LIVE_TTL)
end
return {1, m}
`)

// TakeTurn takes the session's turn lease and reads up to n newest
// messages of its current conversation (as Window does) in one round
// trip when the session is not busy. When another request holds the
// lease, it waits in arrival order, up to o.Wait, for its turn, then
// reads the history that now holds the turns before it; with o.Wait 0 it
// returns ErrBusy at once. With o.Hold the lease is returned, to be given
// back by the turn's Append (Turn.Lease) or Release; otherwise the turn
// passes on as soon as the window is read, and the lease is nil.
//
// Waiting costs a goroutine and a timer, one subscription on the process's
// shared pub/sub connection, and one script per half lease TTL.
func (s *RedisStore) TakeTurn(ctx context.Context, session string, n int, nowMs int64, p Policy, o TurnOptions) (Window, *Lease, error) {
	if session == "" {
		return Window{}, nil, fmt.Errorf("take turn: %w", ErrEmptySession)
	}
	l := newLease(session, redisLeaseBackend{s}, "", s.leaseTTL, o.opTimeout(), s.obs, s.log)
	keys := append(s.sessionKeys(session)[:3], s.leaseKey(session), s.queueKey(session), s.waitersKey(session), s.watchedKey(session))
	channel := s.wakeChannel(session)
	ttl := s.leaseTTL.Milliseconds()
	start := time.Now()
	deadline := start.Add(o.Wait)
	var wk *wakeup
	defer func() { wk.close() }()
	for first := true; ; first = false {
		var waited time.Duration
		if !first {
			waited = time.Since(start)
		}
		opCtx, cancel := context.WithTimeout(ctx, o.opTimeout())
		var tail *streamTail
		if n > 0 {
			// A take of no messages reads nothing of the stream, and the
			// script tells it nothing of the session: it neither uses nor
			// forgets the session's tail.
			if tail = s.cache.get(session); tail != nil && !tail.covers(n) {
				tail = nil
			}
		}
		res, newest, err := s.takeRead(opCtx, keys, n, tail, []any{n, nowMs, p.IdleTimeout.Milliseconds(), l.token, ttl,
			boolArg(o.Hold), boolArg(o.Wait <= 0), channel})
		var w Window
		if err == nil && len(res) >= 4 {
			w, err = s.takeWindow(opCtx, session, keys, n, res, tail, newest)
		}
		cancel()
		if err != nil {
			// The script may have run (and queued the request, or granted
			// it the lease) although its answer was lost.
			s.abandon(l)
			return Window{}, nil, fmt.Errorf("take turn %s: %w", session, err)
		}
		if len(res) >= 4 {
			w.Waited = waited
			if !o.Hold {
				return w, nil, nil
			}
			l.mark, _ = res[3].(string)
			l.start()
			return w, l, nil
		}
		if o.Wait <= 0 {
			return Window{}, nil, fmt.Errorf("take turn %s: %w", session, ErrBusy)
		}
		left := time.Until(deadline)
		if left <= 0 {
			s.abandon(l)
			return Window{}, nil, fmt.Errorf("take turn %s: waited %s: %w", session, o.Wait, ErrBusy)
		}
		if wk == nil {
			// Subscribed before the next check, so that a release between
			// the two cannot go unheard.
			if wk, err = s.waker().wait(ctx, channel, l.token, o.opTimeout()); err != nil {
				s.abandon(l)
				return Window{}, nil, fmt.Errorf("take turn %s: %w", session, err)
			}
			continue
		}
		// Re-check when woken, when the lease or the place of the waiter
		// first in line would run out (its process may have died: no
		// wake-up comes then), and every half TTL so the queue keeps this
		// waiter.
		pause := s.leaseTTL / 2
		if next, _ := res[1].(int64); next > 0 {
			pause = min(pause, time.Duration(next)*time.Millisecond+5*time.Millisecond)
		}
		t := time.NewTimer(min(pause, left))
		select {
		case <-wk.ch:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			s.abandon(l)
			return Window{}, nil, fmt.Errorf("take turn %s: %w", session, ctx.Err())
		}
		t.Stop()
	}
}

// abandon takes a request that gives up out of the session's queue, and
// releases the lease if a script granted it unawares. It does not hold up
// the request: the release runs on its own goroutine, until Redis answers
// it twice (see releaseAnswered: a take script sent before Redis stalled
// may run after a single release, and grant a lease no one holds).
func (s *RedisStore) abandon(l *Lease) {
	go releaseAnswered(redisLeaseBackend{s}, l) // ends within releaseRetryFor
}

// takeRead runs takeScript and, in the same transaction, reads the newest
// n entries of the session's stream, newest first (nothing when n <= 0):
// with a cached tail, only those after its newest entry, and the stream's
// length, to tell whether the tail still holds (streamTail.extend).
// The window is picked from them here (takeWindow) rather than inside the
// script: handing a window through Lua cost Redis about four times what
// reading it does, and Redis serves every session on one thread.
func (s *RedisStore) takeRead(ctx context.Context, keys []string, n int, tail *streamTail, args []any) (res []any, newest streamRead, err error) {
	from := "+"
	to := "-"
	if tail != nil {
		to = "(" + tail.newest()
	}
	send := func(eval func(redis.Pipeliner) *redis.Cmd) (cmd, read *redis.Cmd, length *redis.IntCmd, err error) {
		_, err = s.client.TxPipelined(ctx, func(pipe redis.Pipeliner) error {
			cmd = eval(pipe)
			if n > 0 {
				read = pipe.Do(ctx, "XREVRANGE", keys[2], from, to, "COUNT", n)
				if s.cache != nil {
					length = pipe.XLen(ctx, keys[2])
				}
			}
			return nil
		})
		return cmd, read, length, err
	}
	cmd, read, length, err := send(func(pipe redis.Pipeliner) *redis.Cmd { return takeScript.EvalSha(ctx, pipe, keys, args...) })
	if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
		cmd, read, length, err = send(func(pipe redis.Pipeliner) *redis.Cmd { return takeScript.Eval(ctx, pipe, keys, args...) })
	}
	if cmd.Err() != nil {
		return nil, streamRead{}, cmd.Err()
	}
	if err != nil {
		return nil, streamRead{}, err
	}
	if res, err = cmd.Slice(); err != nil {
		return nil, streamRead{}, err
	}
	if read != nil {
		raw, err := read.Slice()
		if err != nil {
			return nil, streamRead{}, err
		}
		newest.entries = make([]*streamEntry, len(raw))
		for i, e := range raw {
			if newest.entries[i], err = decodeStreamEntry(e); err != nil {
				return nil, streamRead{}, err
			}
		}
	}
	if length != nil {
		newest.length = length.Val()
	}
	return res, newest, nil
}

// streamRead is what takeRead read of a session's stream: its newest
// entries (after a cached tail's, when it had one), newest first, and its
// length (when the store caches windows).
type streamRead struct {
	entries []*streamEntry
	length  int64
}

// decodeStreamEntry decodes a stream entry as XREVRANGE gives it.
func decodeStreamEntry(e any) (*streamEntry, error) {
	m, implied, err := decodeEntryOf(e)
	if err != nil {
		return nil, err
	}
	return &streamEntry{conv: entryConversation(e), summary: entrySummary(e), implied: implied, msg: m}, nil
}

// takeWindow makes the window of takeScript's {1, conversation, first
// entry id, mark, summary, summary's last id, last entry id, created} out
// of the stream's newest n entries: read, or, with a cached tail, the tail
// extended by read. It picks the entries of the conversation after the
// range its latest summary covers, summaries left out. They hold all of
// its window unless fewer than n are such while the stream goes on past
// them into that range (turns written late to an older conversation, which
// a reply that outlasted a new one's start does; summaries among them):
// then the window is read by a script of its own, a second round trip. So
// it is when the tail turns out stale (the stream changed other than by
// appends, or the conversation's last entry is not among the newest n):
// the cache forgets it.
func (s *RedisStore) takeWindow(ctx context.Context, session string, keys []string, n int, res []any, tail *streamTail, read streamRead) (Window, error) {
	conv, _ := res[1].(string)
	first, _ := res[2].(string)
	var last, created string
	if len(res) >= 8 {
		last, _ = res[6].(string)
		created, _ = res[7].(string)
	}
	w := Window{ConversationID: conv}
	if n <= 0 {
		return w, nil // nothing read (see TakeTurn)
	}
	if conv == "" {
		// No current conversation (idle past its timeout, or reset): the
		// window is empty, and the script told nothing of the session to
		// check the tail by (no created_ms), though the stream has not
		// changed. The tail is left as it is, neither used nor counted:
		// the new conversation's first turn checks and extends it.
		return w, nil
	}
	newest, fresh := s.cacheTail(session, n, tail, read, created, last)
	if first == "" {
		return w, nil
	}
	lo, inclusive := first, true
	if len(res) >= 6 {
		if e, ok := res[4].([]any); ok && len(e) > 0 {
			m, err := decodeEntry(e)
			if err != nil {
				return Window{}, err
			}
			w.Summary = &m
			bound, _ := res[5].(string)
			if to, ok := strings.CutPrefix(bound, "("); ok {
				lo, inclusive = to, false
			}
		}
	}
	var entries []*streamEntry
	for _, e := range newest {
		id := e.id()
		if e.conv == conv && !e.summary && (compareIDs(id, lo) > 0 || (inclusive && id == lo)) {
			entries = append(entries, e)
		}
	}
	if !fresh || len(entries) < n && len(newest) == n && compareIDs(newest[n-1].id(), lo) > 0 {
		return s.readWindow(ctx, keys, n, w)
	}
	if len(entries) > 0 {
		// A slice of copies: the caller may change its messages, not the
		// cached entries.
		w.Messages = make([]Message, len(entries))
		for i, e := range entries {
			w.Messages[len(entries)-1-i] = e.msg
		}
	}
	return w, nil
}

// cacheTail returns the stream's newest n entries, newest first: those
// read, or with a tail, the tail extended by them. It keeps the result in
// the cache for the session's next take. false when the tail turns out
// stale: the stream changed other than by appends (see extend), the
// session is not the one the tail was read from (its created_ms and
// created_nonce), or its conversation's last entry, last, is not among the
// newest n though it was written after the tail's newest entry. The cache
// then forgets the tail. A session without a created_ms (one written before it was kept)
// has nothing to tell the session by: nothing is cached then, nor when the
// cache is off. (A take that found no current conversation does not come
// here: see takeWindow.)
func (s *RedisStore) cacheTail(session string, n int, tail *streamTail, read streamRead, created, last string) ([]*streamEntry, bool) {
	if s.cache == nil {
		// Off: there is no tail (TakeTurn found none), and building one
		// to keep would only cost its allocation and its count.
		return read.entries[:min(n, len(read.entries))], true
	}
	if tail == nil {
		s.cacheObs.WindowCacheMiss()
	}
	if created == "" {
		if tail != nil {
			s.dropStale(session)
			return nil, false
		}
		return read.entries[:min(n, len(read.entries))], true
	}
	next := newTail(read.entries, read.length, created)
	if tail != nil {
		var ok bool
		if next, ok = tail.extend(read.entries, read.length, created, n); !ok {
			s.dropStale(session)
			return nil, false
		}
	}
	newest := next.entries[:min(n, len(next.entries))]
	if tail != nil && len(read.entries) < n && last != "" && !slices.ContainsFunc(newest, func(e *streamEntry) bool { return e.id() == last }) {
		s.dropStale(session)
		return nil, false
	}
	if tail != nil {
		s.cacheObs.WindowCacheHit()
	}
	if len(next.entries) > 0 {
		s.cache.put(session, next)
	}
	return newest, true
}

// dropStale forgets the session's tail, which a take found no longer
// holds (see cacheTail), and counts the take as stale.
func (s *RedisStore) dropStale(session string) {
	s.cache.drop(session)
	s.cacheObs.WindowCacheStale()
}

// readWindow reads the window of w's conversation by windowScript, when
// the take's own read cannot give it (see takeWindow).
func (s *RedisStore) readWindow(ctx context.Context, keys []string, n int, w Window) (Window, error) {
	read, err := windowScript.Run(ctx, s.client, keys[:3], n, 0, 0).Slice()
	if err != nil {
		return Window{}, fmt.Errorf("read window: %w", err)
	}
	if len(read) == 0 {
		return w, nil // reset between the two reads
	}
	if len(read) != 3 {
		return Window{}, fmt.Errorf("read window: script reply of %d elements, want 3", len(read))
	}
	if id, _ := read[0].(string); id != w.ConversationID {
		// A new conversation began between the two reads: the turn
		// belongs to the one read first, which is this one.
		return w, nil
	}
	// The messages start after the range of the summary this read found,
	// which may be newer than the first read's (one stored between the
	// two): the window carries that one, or the messages between the two
	// ranges would be in neither.
	return windowOf(read[0], read[1], read[2])
}

// entrySummary reports whether a stream entry is a summary: its kind comes
// right after its conversation (see encodeSummary).
func entrySummary(e any) bool {
	pair, _ := e.([]any)
	if len(pair) != 2 {
		return false
	}
	fields, _ := pair[1].([]any)
	return len(fields) >= 4 && fields[2] == "kind" && fields[3] == KindSummary
}

// entryConversation is the conversation a stream entry belongs to: its
// first field's value (the append script writes it first).
func entryConversation(e any) string {
	pair, _ := e.([]any)
	if len(pair) != 2 {
		return ""
	}
	fields, _ := pair[1].([]any)
	if len(fields) < 2 {
		return ""
	}
	if k, _ := fields[0].(string); k != "conversation" {
		return ""
	}
	v, _ := fields[1].(string)
	return v
}

// redisLeaseBackend renews, publishes and releases a lease in Redis.
type redisLeaseBackend struct{ s *RedisStore }

func (b redisLeaseBackend) beat(ctx context.Context, l *Lease, d *Delta) (bool, string, error) {
	s := b.s
	payload := ""
	if d != nil {
		payload = d.json()
	}
	res, err := beatScript.Run(ctx, s.client, []string{s.leaseKey(l.session), s.liveKey(l.session), s.watchedKey(l.session)},
		l.token, s.leaseTTL.Milliseconds(), l.gen, payload).Slice()
	if err != nil {
		return false, "", fmt.Errorf("renew lease %s: %w", l.session, err)
	}
	if len(res) != 2 {
		return false, "", fmt.Errorf("renew lease %s: script reply of %d elements, want 2", l.session, len(res))
	}
	held, _ := res[0].(int64)
	mark, _ := res[1].(string)
	return held == 1, mark, nil
}

func (b redisLeaseBackend) release(ctx context.Context, l *Lease) error {
	s := b.s
	err := releaseScript.Run(ctx, s.client, s.leaseKeys(l.session), l.token, l.gen, s.wakeChannel(l.session)).Err()
	if err != nil {
		return fmt.Errorf("release lease %s: %w", l.session, err)
	}
	return nil
}

// Busy reports whether a request holds the session's turn lease: a
// generation is active.
func (s *RedisStore) Busy(ctx context.Context, session string) (bool, error) {
	n, err := s.client.Exists(ctx, s.leaseKey(session)).Result()
	if err != nil {
		return false, fmt.Errorf("read lease %s: %w", session, err)
	}
	return n == 1, nil
}

// waker is a process's wake-ups for waiting requests: one pub/sub
// connection, subscribed to the wake channel of each session that has a
// request waiting here, handing each message to the waiter it names.
type waker struct {
	client redis.UniversalClient
	log    *slog.Logger

	mu     sync.Mutex
	ps     *redis.PubSub // nil until the first wait, and after Close
	subs   map[string]*wakeSub
	closed bool
}

// wakeSub is one channel's subscription and the waiters it serves.
type wakeSub struct {
	waiters   map[string]chan struct{} // token -> its wake-up
	ready     chan struct{}            // closed once Redis confirmed the subscription
	confirmed bool
}

// wakeup is one waiter's registration; ch receives its wake-ups.
type wakeup struct {
	k       *waker
	channel string
	token   string
	ch      chan struct{}
}

func (s *RedisStore) waker() *waker { return s.wake }

// wait registers token for wake-ups on channel and returns once Redis has
// confirmed the subscription, or fails after timeout.
func (k *waker) wait(ctx context.Context, channel, token string, timeout time.Duration) (*wakeup, error) {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return nil, errors.New("wait for turn: store closed")
	}
	if k.ps == nil {
		k.ps = k.client.Subscribe(context.Background())
		go k.read(k.ps) // ends when the pub/sub is closed
	}
	sub := k.subs[channel]
	if sub == nil {
		sub = &wakeSub{waiters: map[string]chan struct{}{}, ready: make(chan struct{})}
		k.subs[channel] = sub
		sctx, cancel := context.WithTimeout(ctx, timeout)
		err := k.ps.Subscribe(sctx, channel)
		cancel()
		if err != nil {
			delete(k.subs, channel)
			k.mu.Unlock()
			return nil, fmt.Errorf("subscribe %s: %w", channel, err)
		}
	}
	w := &wakeup{k: k, channel: channel, token: token, ch: make(chan struct{}, 1)}
	sub.waiters[token] = w.ch
	ready := sub.ready
	k.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ready:
		return w, nil
	case <-t.C:
		w.close()
		return nil, fmt.Errorf("subscribe %s: no confirmation within %s", channel, timeout)
	case <-ctx.Done():
		w.close()
		return nil, ctx.Err()
	}
}

// close ends the registration; the channel is unsubscribed when no one
// waits on it any more.
func (w *wakeup) close() {
	if w == nil {
		return
	}
	k := w.k
	k.mu.Lock()
	defer k.mu.Unlock()
	sub := k.subs[w.channel]
	if sub == nil || sub.waiters[w.token] != w.ch {
		return
	}
	delete(sub.waiters, w.token)
	if len(sub.waiters) == 0 && !k.closed {
		delete(k.subs, w.channel)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		// A failed unsubscribe only leaves messages no one is waiting for.
		_ = k.ps.Unsubscribe(ctx, w.channel)
		cancel()
	}
}

// read hands each wake-up to its waiter. When the connection comes back
// after a failure, go-redis subscribes again; wake-ups sent meanwhile are
// lost, so every waiter of the channel is woken to check for itself.
func (k *waker) read(ps *redis.PubSub) {
	for msg := range ps.ChannelWithSubscriptions() {
		k.mu.Lock()
		switch m := msg.(type) {
		case *redis.Subscription:
			if sub := k.subs[m.Channel]; sub != nil && m.Kind == "subscribe" {
				if !sub.confirmed {
					sub.confirmed = true
					close(sub.ready)
				} else {
					for _, ch := range sub.waiters {
						notify(ch)
					}
				}
			}
		case *redis.Message:
			if sub := k.subs[m.Channel]; sub != nil {
				if ch := sub.waiters[m.Payload]; ch != nil {
					notify(ch)
				}
			}
		}
		k.mu.Unlock()
	}
}

func (k *waker) close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closed = true
	if k.ps != nil {
		_ = k.ps.Close()
	}
}

// notify signals ch without blocking: one pending wake-up is enough.
func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Close stops the store's own goroutines and connections (the pub/sub
// connection of waiting requests, the watches' readers); the client
// passed to NewRedis is the caller's to close.
func (s *RedisStore) Close() error {
	s.wake.close()
	s.hubs.close()
	return nil
}

package history

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// The live side of a RedisStore, for session S:
//
//	P:{S}:live     stream: while S is watched, each reply's deltas (t=delta,
//	               gen, d: the fragment as JSON) and each generation's end
//	               (t=end, gen, last: the id of its last message), capped at
//	               about liveCap entries and expiring liveTTL after the last
//	               one
//	P:{S}:watched  string: a counter bumped by each watch that starts from a
//	               snapshot (a generation then sends its reply so far), kept
//	               alive watchTTL by the hubs of the processes watching S
//
// Nothing is written to P:{S}:live while no one watches S.

// WithBlockingClient sets the client the watches' blocking reads use
// (XREAD BLOCK, one connection per session watched from this process).
// Give it its own pool, so that watches never take the connections turns
// need; without it they use the store's client.
func WithBlockingClient(c redis.UniversalClient) RedisOption {
	return func(s *RedisStore) {
		if c != nil {
			s.blocking = c
		}
	}
}

// watchScript starts a watch: from a snapshot (it bumps the watch mark, so
// that a generation going on sends its reply so far, and gives the
// streams' last ids), or from a cursor, when nothing after it is gone.
//
// KEYS: messages, live, lease, watched. ARGV: 1 to resume, the cursor's
// message id and live id, watch TTL ms.
// Returns {fresh (0|1), message id, live id, generating (0|1)}.
var watchScript = redis.NewScript(luaLib + `
local function lastid(k)
  local e = redis.call('XREVRANGE', k, '+', '-', 'COUNT', 1)
  if #e == 0 then return '0-0' end
  return e[1][1]
end
-- gone reports whether entries of stream k after id may be gone: the
-- entry id itself was trimmed (entries go oldest first), or, for a reader
-- who had seen none ('0-0'), any entry was.
local function gone(k, id)
  if id == '0-0' then
    if redis.call('EXISTS', k) == 0 then return false end
    local info = redis.call('XINFO', 'STREAM', k)
    local f = {}
    for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
    return f['entries-added'] ~= nil and tonumber(f['entries-added']) > tonumber(f['length'])
  end
  return #redis.call('XRANGE', k, id, id) == 0
end
local busy = redis.call('EXISTS', KEYS[3])
if ARGV[1] == '1' and not gone(KEYS[1], ARGV[2]) and not gone(KEYS[2], ARGV[3]) then
  redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
  return {0, ARGV[2], ARGV[3], busy}
end
redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
return {1, lastid(KEYS[1]), lastid(KEYS[2]), busy}
`)

// keepScript keeps a session's watch mark alive.
//
// KEYS: watched, messages. ARGV: TTL ms, the hub's message id ('0-0':
// none). Returns 1 when that message is gone.
var keepScript = redis.NewScript(`
redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if ARGV[2] ~= '0-0' and #redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2]) == 0 then return 1 end
return 0
`)

// settleScript ends a generation whose holder died: no lease, and the live
// stream does not end in a generation's end.
//
// KEYS: lease, live. Returns 1 when a generation is active.
var settleScript = redis.NewScript(luaLease + `
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
local e = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #e == 0 or e[1][2][2] ~= 'end' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', LIVE_CAP, '*', 't', 'end', 'gen', '', 'last', '')
  redis.call('PEXPIRE', KEYS[2], LIVE_TTL)
end
return 0
`)

// Watch starts following a session live (see LiveEvent): from a snapshot
// when from is "" or too old to resume from (Watch.Fresh), else from the
// event id from. The events come from one blocking read per session in
// this process, whatever the number of watches. Close the watch when done.
func (s *RedisStore) Watch(ctx context.Context, session, from string) (*Watch, error) {
	c, resume, err := watchFrom(session, from)
	if err != nil {
		return nil, err
	}
	res, err := watchScript.Run(ctx, s.client, []string{s.streamKey(session), s.liveKey(session), s.leaseKey(session), s.watchedKey(session)},
		boolArg(resume), c.Messages, c.Live, watchTTL.Milliseconds()).Slice()
	if err != nil {
		return nil, fmt.Errorf("watch %s: %w", session, err)
	}
	if len(res) != 4 {
		return nil, fmt.Errorf("watch %s: script reply of %d elements, want 4", session, len(res))
	}
	fresh, _ := res[0].(int64)
	c.Messages, _ = res[1].(string)
	c.Live, _ = res[2].(string)
	busy, _ := res[3].(int64)
	return startWatch(s.hubs, session, c, fresh == 1, busy == 1)
}

// redisLive is the RedisStore's liveSource.
type redisLive struct{ s *RedisStore }

// readBatch bounds the entries one read takes from each stream.
const readBatch = 256

func (r redisLive) read(ctx context.Context, session string, c Cursor, block time.Duration) ([]LiveEvent, Cursor, error) {
	s := r.s
	msgKey, liveKey := s.streamKey(session), s.liveKey(session)
	keys := []string{msgKey, liveKey, c.Messages, c.Live}
	if block > 0 {
		// The blocking read only waits: a blocked XREAD of two streams is
		// answered with the one written first (before Redis 7.2), which
		// would split a turn's messages from its generation's end. What
		// there is, is read next, from both at once.
		err := s.blocking.XRead(ctx, &redis.XReadArgs{Streams: keys, Count: 1, Block: block}).Err()
		if errors.Is(err, redis.Nil) {
			return nil, c, nil
		}
		if err != nil {
			return nil, c, fmt.Errorf("wait for live %s: %w", session, err)
		}
	}
	streams, err := s.client.XRead(ctx, &redis.XReadArgs{Streams: keys, Count: readBatch, Block: -1}).Result()
	if errors.Is(err, redis.Nil) {
		return nil, c, nil
	}
	if err != nil {
		return nil, c, fmt.Errorf("read live %s: %w", session, err)
	}
	var msgs []Message
	var live []liveEntry
	for _, st := range streams {
		for _, xm := range st.Messages {
			if st.Stream == msgKey {
				m, err := decodeXMessage(xm)
				if err != nil {
					return nil, c, fmt.Errorf("read live %s: %w", session, err)
				}
				msgs = append(msgs, m)
			} else {
				live = append(live, decodeLive(xm))
			}
		}
	}
	evs, next := merge(c, msgs, live, true)
	return evs, next, nil
}

func (r redisLive) keep(ctx context.Context, session, id string) (bool, error) {
	gone, err := keepScript.Run(ctx, r.s.client, []string{r.s.watchedKey(session), r.s.streamKey(session)}, watchTTL.Milliseconds(), id).Int()
	if err != nil {
		return false, fmt.Errorf("keep watch %s: %w", session, err)
	}
	return gone == 1, nil
}

func (r redisLive) settle(ctx context.Context, session string) (bool, error) {
	n, err := settleScript.Run(ctx, r.s.client, []string{r.s.leaseKey(session), r.s.liveKey(session)}).Int()
	if err != nil {
		return false, fmt.Errorf("settle generation %s: %w", session, err)
	}
	return n == 1, nil
}

// decodeXMessage reads a message stream entry as go-redis returns it.
func decodeXMessage(xm redis.XMessage) (Message, error) {
	fields := make([]any, 0, 2*len(xm.Values))
	for k, v := range xm.Values {
		fields = append(fields, k, v)
	}
	return decodeEntry([]any{xm.ID, fields})
}

// decodeLive reads a live stream entry; a delta it cannot read becomes an
// empty one.
func decodeLive(xm redis.XMessage) liveEntry {
	str := func(k string) string { v, _ := xm.Values[k].(string); return v }
	e := liveEntry{id: xm.ID, gen: str("gen")}
	switch str("t") {
	case "end":
		e.kind, e.last = EventComplete, str("last")
	default:
		e.kind = EventDelta
		_ = json.Unmarshal([]byte(str("d")), &e.delta)
	}
	return e
}

package history

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
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
//	P:{S}:session     hash: conversation, created_ms, last_active_ms,
//	                  is_active, messages, conversations, prompt_tokens,
//	                  completion_tokens, cached_tokens, history_tokens,
//	                  requests, cost_nanos
//	P:{S}:conv:<id>   stream, one entry per message (ids c1, c2, ...)
//	P:{S}:convs       sorted set: conversation id -> created ms
//	P:{S}:idem        sorted set: idempotency key -> ms
//	P:sessions        sorted set: session id -> last active ms
//
// It is safe for concurrent use.
type RedisStore struct {
	client redis.UniversalClient
	prefix string
}

// NewRedis returns a store that keeps its keys under prefix (DefaultPrefix
// when empty).
func NewRedis(client redis.UniversalClient, prefix string) *RedisStore {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &RedisStore{client: client, prefix: prefix}
}

func (s *RedisStore) sessionKey(id string) string { return s.prefix + ":{" + id + "}:session" }
func (s *RedisStore) convKey(id, conv string) string {
	return s.prefix + ":{" + id + "}:conv:" + conv
}
func (s *RedisStore) convsKey(id string) string { return s.prefix + ":{" + id + "}:convs" }
func (s *RedisStore) idemKey(id string) string  { return s.prefix + ":{" + id + "}:idem" }
func (s *RedisStore) indexKey() string          { return s.prefix + ":sessions" }

// The scripts find a conversation's stream from the session key: they
// strip "session" from KEYS[1] and add "conv:<id>". The stream is not
// declared in KEYS because its id is only known inside the script; it
// shares the session's hash tag, so it is on the same Cluster slot.

// windowScript reads the newest ARGV[1] entries of the active conversation
// unless it is ended or idle.
//
// KEYS: session. ARGV: n, now ms, idle timeout ms (0: never idle).
// Returns {} or {conversation id, entries newest first}.
var windowScript = redis.NewScript(`
local h = redis.call('HMGET', KEYS[1], 'conversation', 'last_active_ms', 'is_active')
if not h[1] or h[3] ~= '1' then return {} end
local idle = tonumber(ARGV[3])
if idle > 0 and tonumber(ARGV[2]) - tonumber(h[2] or '0') > idle then return {} end
local n = tonumber(ARGV[1])
if n <= 0 then return {h[1], {}} end
local stream = string.sub(KEYS[1], 1, -8) .. 'conv:' .. h[1]
return {h[1], redis.call('XREVRANGE', stream, '+', '-', 'COUNT', n)}
`)

// appendScript writes one turn.
//
// KEYS: session, convs, idem.
// ARGV: now ms, idle ms, retention ms, idempotency key, idempotency cutoff
// ms, idempotency window ms, six usage deltas, arrival ms, the conversation
// the turn was read from (or ""), message count, then per message its
// number of field/value strings followed by them.
// Returns {conversation id, 0 (existing) | 1 (new) | 2 (duplicate), ids...}.
var appendScript = redis.NewScript(`
local now = tonumber(ARGV[1])
local idle = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'conversation', 'last_active_ms', 'is_active')
local conv = h[1] or ''
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[5])
if ARGV[4] ~= '' then
  if redis.call('ZSCORE', KEYS[3], ARGV[4]) then return {conv, 2} end
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
local usage = {'prompt_tokens', 'completion_tokens', 'cached_tokens', 'history_tokens', 'requests', 'cost_nanos'}
for i = 1, 6 do
  if ARGV[6 + i] ~= '0' then redis.call('HINCRBY', KEYS[1], usage[i], ARGV[6 + i]) end
end
-- A session written before costs were kept in nano-USD has cost_micros:
-- fold it into cost_nanos, times 1000 by appending three zeros to the
-- integer (exact, where a Lua number is not beyond 2^53).
local micros = redis.call('HGET', KEYS[1], 'cost_micros')
if micros then
  if micros ~= '0' then redis.call('HINCRBY', KEYS[1], 'cost_nanos', micros .. '000') end
  redis.call('HDEL', KEYS[1], 'cost_micros')
end
redis.call('HSETNX', KEYS[1], 'created_ms', ARGV[1])
local n = tonumber(ARGV[15])
if n == 0 then return {conv, 0} end
local last = tonumber(h[2] or '0')
local arrived = tonumber(ARGV[13])
local read = ARGV[14]
local new = 0
local prefix = string.sub(KEYS[1], 1, -8) .. 'conv:'
-- A conversation whose stream is gone expired by retention: a new turn
-- starts a new conversation instead of refilling its id.
if read ~= '' and redis.call('ZSCORE', KEYS[2], read) and redis.call('EXISTS', prefix .. read) == 1 then
  -- The turn was answered from this conversation: it belongs there,
  -- however long the reply took or the tool ran.
  conv = read
elseif conv == '' or h[3] ~= '1' or (idle > 0 and arrived - last > idle) or redis.call('EXISTS', prefix .. conv) == 0 then
  conv = 'c' .. redis.call('HINCRBY', KEYS[1], 'conversations', 1)
  redis.call('HSET', KEYS[1], 'conversation', conv, 'is_active', '1')
  redis.call('ZADD', KEYS[2], ARGV[1], conv)
  new = 1
end
if now > last then redis.call('HSET', KEYS[1], 'last_active_ms', ARGV[1]) end
local stream = prefix .. conv
local res = {conv, new}
local i = 16
for m = 1, n do
  local k = tonumber(ARGV[i])
  local fields = {}
  for j = 1, k do fields[j] = ARGV[i + j] end
  res[m + 2] = redis.call('XADD', stream, '*', unpack(fields))
  i = i + k + 1
end
redis.call('HINCRBY', KEYS[1], 'messages', n)
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', stream, ARGV[3]) end
return res
`)

// messagesScript reads a whole conversation; an empty ARGV[1] means the
// active one.
//
// KEYS: session. ARGV: conversation id or "".
// Returns {} or {conversation id, entries oldest first}.
var messagesScript = redis.NewScript(`
local conv = ARGV[1]
if conv == '' then
  local h = redis.call('HMGET', KEYS[1], 'conversation', 'is_active')
  if not h[1] or h[2] ~= '1' then return {} end
  conv = h[1]
end
local stream = string.sub(KEYS[1], 1, -8) .. 'conv:' .. conv
return {conv, redis.call('XRANGE', stream, '-', '+')}
`)

// resetScript ends the active conversation of a known session.
//
// KEYS: session.
var resetScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'is_active', '0') end
return 0
`)

// eraseScript deletes every key of a session.
//
// KEYS: session, convs, idem.
var eraseScript = redis.NewScript(`
local base = string.sub(KEYS[1], 1, -8)
for _, c in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  redis.call('DEL', base .. 'conv:' .. c)
end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
`)

// Window returns up to n newest messages of the session's active
// conversation, oldest first, in one round trip. It returns an empty Window
// when there is no active conversation or it has been idle for longer than
// p.IdleTimeout at nowMs. Its cost does not depend on the conversation's
// length.
func (s *RedisStore) Window(ctx context.Context, session string, n int, nowMs int64, p Policy) (Window, error) {
	if session == "" {
		return Window{}, fmt.Errorf("read window: %w", ErrEmptySession)
	}
	res, err := windowScript.Run(ctx, s.client, []string{s.sessionKey(session)},
		n, nowMs, p.IdleTimeout.Milliseconds()).Slice()
	if err != nil {
		return Window{}, fmt.Errorf("read window %s: %w", session, err)
	}
	conv, entries, err := convEntries(res)
	if err != nil {
		return Window{}, fmt.Errorf("read window %s: %w", session, err)
	}
	w := Window{ConversationID: conv}
	if len(entries) > 0 {
		w.Messages = make([]Message, len(entries))
		// XREVRANGE gives newest first; the window is oldest first.
		for i, e := range entries {
			m, err := decodeEntry(e)
			if err != nil {
				return Window{}, fmt.Errorf("read window %s: %w", session, err)
			}
			w.Messages[len(entries)-1-i] = m
		}
	}
	return w, nil
}

// Append writes a turn atomically in one round trip: the session's keys in
// a Lua script, and the global session index in the same pipeline (outside
// the script, because the index is on another Cluster slot).
//
// The index is updated even when the turn is a duplicate; it only moves
// forward (ZADD GT), so a retried turn cannot make a session look older.
func (s *RedisStore) Append(ctx context.Context, session string, t Turn, p Policy) (AppendResult, error) {
	if session == "" {
		return AppendResult{}, fmt.Errorf("append turn: %w", ErrEmptySession)
	}
	t = prepareTurn(t, time.Now())
	res, err := s.runPipelined(ctx, appendScript, s.appendKeys(session), appendArgs(t, p), func(pipe redis.Pipeliner) {
		s.queueIndex(ctx, pipe, session, t)
	})
	if err != nil {
		return AppendResult{}, fmt.Errorf("append turn %s: %w", session, err)
	}
	r, err := parseAppend(res)
	if err != nil {
		return AppendResult{}, fmt.Errorf("append turn %s: %w", session, err)
	}
	return r, nil
}

func (s *RedisStore) appendKeys(session string) []string {
	return []string{s.sessionKey(session), s.convsKey(session), s.idemKey(session)}
}

// queueIndex records the session's activity in the global index. A turn
// without messages is not activity, but it still makes the session known.
func (s *RedisStore) queueIndex(ctx context.Context, pipe redis.Pipeliner, session string, t Turn) {
	z := redis.Z{Score: float64(t.NowMs), Member: session}
	if len(t.Messages) == 0 {
		pipe.ZAddNX(ctx, s.indexKey(), z)
		return
	}
	pipe.ZAddGT(ctx, s.indexKey(), z)
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
		m.ID = ""
		m.IdempotencyKey = t.IdempotencyKey
		if m.CreatedMs == 0 {
			m.CreatedMs = t.NowMs
		}
		if m.Kind == "" {
			switch {
			case len(m.ToolCalls) > 0:
				m.Kind = KindToolCall
			case m.Role == RoleTool:
				m.Kind = KindToolResult
			default:
				m.Kind = KindMessage
			}
		}
		if m.Status == "" {
			m.Status = StatusComplete
		}
		msgs[i] = m
	}
	t.Messages = msgs
	return t
}

func appendArgs(t Turn, p Policy) []any {
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
		len(t.Messages),
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

// encodeMessage gives a message's stream fields, omitting empty ones.
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
	add("kind", m.Kind)
	add("user", m.User)
	add("model", m.Model)
	if m.Tokens != 0 {
		add("tokens", strconv.Itoa(m.Tokens))
	}
	if m.CreatedMs != 0 {
		add("created_ms", strconv.FormatInt(m.CreatedMs, 10))
	}
	add("request_id", m.RequestID)
	add("status", m.Status)
	add("idem", m.IdempotencyKey)
	return f
}

// decodeEntry turns a stream entry, {id, {field, value, ...}}, into a
// Message. Unknown fields are ignored so that older code reads newer data.
func decodeEntry(e any) (Message, error) {
	pair, ok := e.([]any)
	if !ok || len(pair) != 2 {
		return Message{}, fmt.Errorf("stream entry: got %T, want [id fields]", e)
	}
	id, ok := pair[0].(string)
	if !ok {
		return Message{}, fmt.Errorf("stream entry id: got %T, want string", pair[0])
	}
	fields, ok := pair[1].([]any)
	if !ok || len(fields)%2 != 0 {
		return Message{}, fmt.Errorf("stream entry %s fields: got %T of odd length or wrong type", id, pair[1])
	}
	m := Message{ID: id}
	for i := 0; i < len(fields); i += 2 {
		k, _ := fields[i].(string)
		v, _ := fields[i+1].(string)
		var err error
		switch k {
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
		case "status":
			m.Status = v
		case "idem":
			m.IdempotencyKey = v
		}
		if err != nil {
			return Message{}, fmt.Errorf("stream entry %s field %s: %w", id, k, err)
		}
	}
	return m, nil
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
	if !ok || len(res) < 2 {
		return AppendResult{}, fmt.Errorf("script reply: got %v, want [conversation status ids...]", v)
	}
	conv, _ := res[0].(string)
	status, _ := res[1].(int64)
	r := AppendResult{ConversationID: conv, Duplicate: status == 2, NewConversation: status == 1}
	for _, id := range res[2:] {
		s, ok := id.(string)
		if !ok {
			return AppendResult{}, fmt.Errorf("script reply id: got %T, want string", id)
		}
		r.IDs = append(r.IDs, s)
	}
	return r, nil
}

// Session returns the session's metadata; false when the session is
// unknown. ConversationID is the latest conversation, which Active says
// has not been reset (idleness depends on a Policy and is not applied).
func (s *RedisStore) Session(ctx context.Context, session string) (Session, bool, error) {
	if session == "" {
		return Session{}, false, fmt.Errorf("read session: %w", ErrEmptySession)
	}
	h, err := s.client.HGetAll(ctx, s.sessionKey(session)).Result()
	if err != nil {
		return Session{}, false, fmt.Errorf("read session %s: %w", session, err)
	}
	if len(h) == 0 {
		return Session{}, false, nil
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
	out := Session{
		ID:             session,
		ConversationID: h["conversation"],
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
		return Session{}, false, fmt.Errorf("read session %s: %w", session, err)
	}
	return out, true, nil
}

// Messages returns a whole conversation, oldest first. An empty
// conversationID means the active conversation; there is none (nil) after
// Reset. Its cost grows with the conversation: it is for audit, not for
// building prompts.
func (s *RedisStore) Messages(ctx context.Context, session, conversationID string) ([]Message, error) {
	if session == "" {
		return nil, fmt.Errorf("read messages: %w", ErrEmptySession)
	}
	res, err := messagesScript.Run(ctx, s.client, []string{s.sessionKey(session)}, conversationID).Slice()
	if err != nil {
		return nil, fmt.Errorf("read messages %s: %w", session, err)
	}
	_, entries, err := convEntries(res)
	if err != nil {
		return nil, fmt.Errorf("read messages %s: %w", session, err)
	}
	var msgs []Message
	for _, e := range entries {
		m, err := decodeEntry(e)
		if err != nil {
			return nil, fmt.Errorf("read messages %s: %w", session, err)
		}
		msgs = append(msgs, m)
	}
	return msgs, nil
}

// Conversations returns the ids of the session's conversations, oldest
// first, including those whose messages have expired.
func (s *RedisStore) Conversations(ctx context.Context, session string) ([]string, error) {
	if session == "" {
		return nil, fmt.Errorf("list conversations: %w", ErrEmptySession)
	}
	ids, err := s.client.ZRange(ctx, s.convsKey(session), 0, -1).Result()
	if err != nil {
		return nil, fmt.Errorf("list conversations %s: %w", session, err)
	}
	sortConversations(ids)
	if len(ids) == 0 {
		return nil, nil
	}
	return ids, nil
}

// sortConversations orders ids by their number: c2 before c10, which the
// sorted set's lexical tie-break gets wrong for equal creation times.
func sortConversations(ids []string) {
	num := func(id string) int {
		n, _ := strconv.Atoi(strings.TrimPrefix(id, "c"))
		return n
	}
	sort.SliceStable(ids, func(i, j int) bool { return num(ids[i]) < num(ids[j]) })
}

// Sessions returns session ids, most recently active first, skipping
// offset; limit <= 0 means all of them.
func (s *RedisStore) Sessions(ctx context.Context, offset, limit int) ([]string, error) {
	if offset < 0 {
		offset = 0
	}
	stop := int64(-1)
	if limit > 0 {
		stop = int64(offset + limit - 1)
	}
	ids, err := s.client.ZRevRange(ctx, s.indexKey(), int64(offset), stop).Result()
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", err)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	return ids, nil
}

// Reset ends the session's active conversation; it is kept for audit and
// the next turn starts a new one. Resetting an unknown session does nothing.
func (s *RedisStore) Reset(ctx context.Context, session string) error {
	if session == "" {
		return fmt.Errorf("reset session: %w", ErrEmptySession)
	}
	if err := resetScript.Run(ctx, s.client, []string{s.sessionKey(session)}).Err(); err != nil {
		return fmt.Errorf("reset session %s: %w", session, err)
	}
	return nil
}

// Erase deletes every key of the session and its index entry, in one
// round trip.
func (s *RedisStore) Erase(ctx context.Context, session string) error {
	if session == "" {
		return fmt.Errorf("erase session: %w", ErrEmptySession)
	}
	_, err := s.runPipelined(ctx, eraseScript, s.appendKeys(session), nil, func(pipe redis.Pipeliner) {
		pipe.ZRem(ctx, s.indexKey(), session)
	})
	if err != nil {
		return fmt.Errorf("erase session %s: %w", session, err)
	}
	return nil
}

// Ping checks that Redis answers.
func (s *RedisStore) Ping(ctx context.Context) error {
	if err := s.client.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("ping redis: %w", err)
	}
	return nil
}

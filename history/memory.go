package history

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"
)

// MemoryStore keeps conversations in process memory, with the same
// behaviour as RedisStore: for development, tests, and running without
// Redis. Everything is lost when the process exits. It is safe for
// concurrent use.
type MemoryStore struct {
	mu       sync.Mutex
	sessions map[string]*memSession
	index    map[string]int64 // session -> last active ms, like P:sessions
	// now is the wall clock, used where Redis uses its own clock: message
	// ids and retention expiry. Tests replace it.
	now func() time.Time
}

// memSession mirrors the keys of one session in Redis.
type memSession struct {
	conversation  string
	createdMs     int64
	lastActiveMs  int64
	active        bool
	messages      int64
	conversations int64
	totals        Usage
	convs         map[string]*memConv
	order         []string         // conversation ids, oldest first
	idem          map[string]int64 // idempotency key -> ms
	// idemOrder holds the keys in arrival order, so pruning expired keys
	// costs only the expired ones, not a scan of a day's keys per turn.
	idemOrder []idemEntry
}

type idemEntry struct {
	key string
	ms  int64
}

// memConv mirrors a conversation stream.
type memConv struct {
	msgs      []Message
	expiresAt time.Time // zero: never
	lastMs    int64     // last id, as a stream keeps it
	lastSeq   int64
	gone      bool // expired by retention
}

// NewMemory returns an empty in-memory store.
func NewMemory() *MemoryStore {
	return &MemoryStore{
		sessions: map[string]*memSession{},
		index:    map[string]int64{},
		now:      time.Now,
	}
}

// expire drops the conversation's messages once its retention has passed,
// as Redis drops an expired stream, and reports whether they are gone.
func (c *memConv) expire(now time.Time) bool {
	if !c.expiresAt.IsZero() && !now.Before(c.expiresAt) {
		c.msgs = nil
		c.expiresAt = time.Time{}
		c.gone = true
	}
	return c.gone
}

// expired reports whether retention removed the conversation: its stream
// is gone in Redis, and a new turn starts a new conversation rather than
// refilling an id whose start was lost.
func (c *memConv) expired() bool { return c.gone }

// nextID gives a stream-like "ms-seq" id that always grows.
func (c *memConv) nextID(now time.Time) string {
	ms := now.UnixMilli()
	if ms > c.lastMs {
		c.lastMs, c.lastSeq = ms, 0
	} else {
		c.lastSeq++
	}
	return strconv.FormatInt(c.lastMs, 10) + "-" + strconv.FormatInt(c.lastSeq, 10)
}

// Window returns up to n newest messages of the session's active
// conversation, oldest first; empty when there is none or it has been idle
// for longer than p.IdleTimeout at nowMs.
func (s *MemoryStore) Window(ctx context.Context, session string, n int, nowMs int64, p Policy) (Window, error) {
	if session == "" {
		return Window{}, fmt.Errorf("read window: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil || ss.conversation == "" || !ss.active {
		return Window{}, nil
	}
	if idle := p.IdleTimeout.Milliseconds(); idle > 0 && nowMs-ss.lastActiveMs > idle {
		return Window{}, nil
	}
	w := Window{ConversationID: ss.conversation}
	c := ss.convs[ss.conversation]
	c.expire(s.now())
	if n <= 0 || len(c.msgs) == 0 {
		return w, nil
	}
	from := max(len(c.msgs)-n, 0)
	w.Messages = cloneMessages(c.msgs[from:])
	return w, nil
}

// Append writes a turn atomically; see RedisStore.Append.
func (s *MemoryStore) Append(ctx context.Context, session string, t Turn, p Policy) (AppendResult, error) {
	if session == "" {
		return AppendResult{}, fmt.Errorf("append turn: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	t = prepareTurn(t, now)

	// The index moves forward even for a duplicate, as in Redis, where it
	// is written outside the script.
	if len(t.Messages) == 0 {
		if _, ok := s.index[session]; !ok {
			s.index[session] = t.NowMs
		}
	} else if old, ok := s.index[session]; !ok || t.NowMs > old {
		s.index[session] = t.NowMs
	}

	ss := s.sessions[session]
	if ss == nil {
		ss = &memSession{convs: map[string]*memConv{}, idem: map[string]int64{}}
	}
	cutoff := t.NowMs - IdempotencyWindow.Milliseconds()
	for len(ss.idemOrder) > 0 && ss.idemOrder[0].ms < cutoff {
		e := ss.idemOrder[0]
		if ss.idem[e.key] == e.ms {
			delete(ss.idem, e.key)
		}
		ss.idemOrder = ss.idemOrder[1:]
	}
	if t.IdempotencyKey != "" {
		if ms, ok := ss.idem[t.IdempotencyKey]; ok && ms >= cutoff {
			return AppendResult{ConversationID: ss.conversation, Duplicate: true}, nil
		}
		ss.idem[t.IdempotencyKey] = t.NowMs
		ss.idemOrder = append(ss.idemOrder, idemEntry{t.IdempotencyKey, t.NowMs})
	}
	s.sessions[session] = ss

	ss.totals = ss.totals.Add(t.Usage)
	if ss.createdMs == 0 {
		ss.createdMs = t.NowMs
	}
	r := AppendResult{ConversationID: ss.conversation}
	if len(t.Messages) == 0 {
		return r, nil
	}

	idle := p.IdleTimeout.Milliseconds()
	if cur := ss.convs[ss.conversation]; cur != nil {
		cur.expire(now)
	}
	target := ss.conversation
	if read := ss.convs[t.ConversationID]; read != nil && !read.expire(now) {
		// The turn was answered from this conversation: it belongs there,
		// however long the reply took or the tool ran.
		target = t.ConversationID
		r.ConversationID = target
	} else if ss.conversation == "" || !ss.active || (idle > 0 && t.ArrivedMs-ss.lastActiveMs > idle) || ss.convs[ss.conversation].expired() {
		ss.conversations++
		ss.conversation = "c" + strconv.FormatInt(ss.conversations, 10)
		ss.active = true
		ss.convs[ss.conversation] = &memConv{}
		ss.order = append(ss.order, ss.conversation)
		target = ss.conversation
		r.ConversationID = target
		r.NewConversation = true
	}
	if t.NowMs > ss.lastActiveMs {
		ss.lastActiveMs = t.NowMs
	}
	c := ss.convs[target]
	for _, m := range t.Messages {
		m = cloneMessage(m)
		m.ID = c.nextID(now)
		c.msgs = append(c.msgs, m)
		r.IDs = append(r.IDs, m.ID)
	}
	ss.messages += int64(len(t.Messages))
	if p.Retention > 0 {
		c.expiresAt = now.Add(p.Retention)
	}
	return r, nil
}

// Session returns the session's metadata; false when the session is
// unknown. See RedisStore.Session.
func (s *MemoryStore) Session(ctx context.Context, session string) (Session, bool, error) {
	if session == "" {
		return Session{}, false, fmt.Errorf("read session: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil {
		return Session{}, false, nil
	}
	return Session{
		ID:             session,
		ConversationID: ss.conversation,
		CreatedMs:      ss.createdMs,
		LastActiveMs:   ss.lastActiveMs,
		Active:         ss.active,
		MessageCount:   ss.messages,
		Totals:         ss.totals,
	}, true, nil
}

// Messages returns a whole conversation, oldest first; an empty
// conversationID means the active conversation (nil after Reset).
func (s *MemoryStore) Messages(ctx context.Context, session, conversationID string) ([]Message, error) {
	if session == "" {
		return nil, fmt.Errorf("read messages: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil {
		return nil, nil
	}
	if conversationID == "" {
		if !ss.active {
			return nil, nil
		}
		conversationID = ss.conversation
	}
	c := ss.convs[conversationID]
	if c == nil {
		return nil, nil
	}
	c.expire(s.now())
	return cloneMessages(c.msgs), nil
}

// Conversations returns the ids of the session's conversations, oldest
// first, including those whose messages have expired.
func (s *MemoryStore) Conversations(ctx context.Context, session string) ([]string, error) {
	if session == "" {
		return nil, fmt.Errorf("list conversations: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil || len(ss.order) == 0 {
		return nil, nil
	}
	return append([]string(nil), ss.order...), nil
}

// Sessions returns session ids, most recently active first, skipping
// offset; limit <= 0 means all of them. Ties are broken as Redis does in
// ZREVRANGE: by id, descending.
func (s *MemoryStore) Sessions(ctx context.Context, offset, limit int) ([]string, error) {
	s.mu.Lock()
	ids := make([]string, 0, len(s.index))
	for id := range s.index {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool {
		a, b := s.index[ids[i]], s.index[ids[j]]
		if a != b {
			return a > b
		}
		return ids[i] > ids[j]
	})
	s.mu.Unlock()
	offset = max(offset, 0)
	if offset >= len(ids) {
		return nil, nil
	}
	ids = ids[offset:]
	if limit > 0 && limit < len(ids) {
		ids = ids[:limit]
	}
	return ids, nil
}

// Reset ends the session's active conversation; it is kept and the next
// turn starts a new one.
func (s *MemoryStore) Reset(ctx context.Context, session string) error {
	if session == "" {
		return fmt.Errorf("reset session: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ss := s.sessions[session]; ss != nil {
		ss.active = false
	}
	return nil
}

// Erase forgets the session entirely.
func (s *MemoryStore) Erase(ctx context.Context, session string) error {
	if session == "" {
		return fmt.Errorf("erase session: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.sessions, session)
	delete(s.index, session)
	return nil
}

// Ping always succeeds: memory is always there.
func (s *MemoryStore) Ping(ctx context.Context) error { return nil }

// cloneMessage copies the JSON fields so that neither the caller nor the
// store can change the other's bytes.
func cloneMessage(m Message) Message {
	m.Parts = bytes.Clone(m.Parts)
	m.ToolCalls = bytes.Clone(m.ToolCalls)
	return m
}

func cloneMessages(ms []Message) []Message {
	out := make([]Message, len(ms))
	for i, m := range ms {
		out[i] = cloneMessage(m)
	}
	return out
}

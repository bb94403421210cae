package history

import (
	"context"
	"fmt"
	"time"
)

// memCompaction is a session's compaction lease in memory.
type memCompaction struct {
	token   string
	expires time.Time
}

// entry returns the stream entry with this id.
func (ss *memSession) entry(id string) (Message, bool) {
	if id == "" {
		return Message{}, false
	}
	i := ss.search(id, false)
	if i < len(ss.stream) && ss.stream[i].ID == id {
		return cloneMessage(ss.stream[i]), true
	}
	return Message{}, false
}

// TakeCompaction takes the session's compaction lease for ttl
// (DefaultCompactionTTL when 0); ErrCompacting while another holds it.
func (s *MemoryStore) TakeCompaction(ctx context.Context, session string, ttl time.Duration) (string, error) {
	if session == "" {
		return "", fmt.Errorf("take compaction: %w", ErrEmptySession)
	}
	if ttl <= 0 {
		ttl = DefaultCompactionTTL
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if c, ok := s.compacting[session]; ok && now.Before(c.expires) {
		return "", fmt.Errorf("take compaction %s: %w", session, ErrCompacting)
	}
	token := newToken()
	s.compacting[session] = memCompaction{token: token, expires: now.Add(ttl)}
	return token, nil
}

// ReleaseCompaction gives the lease back if token holds it.
func (s *MemoryStore) ReleaseCompaction(ctx context.Context, session, token string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.compacting[session]; ok && c.token == token {
		delete(s.compacting, session)
	}
	return nil
}

// Compaction reads what a compaction of conversation conv ("": the
// session's latest) starts from; found is false when there is no such
// conversation.
func (s *MemoryStore) Compaction(ctx context.Context, session, conv string, limit int) (CompactionInput, bool, error) {
	if session == "" {
		return CompactionInput{}, false, fmt.Errorf("read compaction: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil {
		return CompactionInput{}, false, nil
	}
	s.expire(ss, s.now())
	if conv == "" {
		conv = ss.conversation
	}
	c := ss.convs[conv]
	if c == nil || c.start == "" {
		return CompactionInput{}, false, nil
	}
	in := CompactionInput{Conversation: conv, Current: conv == ss.conversation && ss.active, TitleSet: c.titleSet,
		Unsummarized: c.messages - c.summarized}
	from := ss.search(c.start, false)
	if m, ok := ss.entry(c.summary); ok {
		in.Summary = &m
		from = ss.search(c.summaryTo, true)
	}
	in.Messages = ss.collect(conv, from, ss.search(c.last, true), max(limit, 0), false, true)
	return in, true, nil
}

// StoreSummary writes a summary atomically, with the usage it cost, if
// token still holds the session's compaction lease and the conversation's
// latest summary is still w.Base; else ErrCompactionLost and nothing is
// written.
func (s *MemoryStore) StoreSummary(ctx context.Context, session, token string, w SummaryWrite) (Message, error) {
	if session == "" {
		return Message{}, fmt.Errorf("store summary: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if c, ok := s.compacting[session]; !ok || c.token != token || !now.Before(c.expires) {
		return Message{}, fmt.Errorf("store summary %s: lease: %w", session, ErrCompactionLost)
	}
	ss := s.sessions[session]
	if ss == nil {
		return Message{}, fmt.Errorf("store summary %s: session gone: %w", session, ErrCompactionLost)
	}
	s.expire(ss, now)
	c := ss.convs[w.Conversation]
	if c == nil || c.summary != w.Base {
		return Message{}, fmt.Errorf("store summary %s: conversation changed: %w", session, ErrCompactionLost)
	}
	if _, ok := ss.entry(w.CoversTo); !ok {
		return Message{}, fmt.Errorf("store summary %s: covered messages gone: %w", session, ErrCompactionLost)
	}
	m := w.summaryMessage(now.UnixMilli())
	m.ID, m.Conversation = ss.nextID(now), w.Conversation
	ss.stream = append(ss.stream, cloneMessage(m))
	s.grow(ss, messageBytes(m))
	c.summary, c.summaryTo, c.summarized, c.last = m.ID, w.CoversTo, w.Covers, m.ID
	ss.totals = ss.totals.Add(w.Usage)
	s.liveChanged(session)
	return m, nil
}

// AddUsage adds u to the session's totals (a background call made for
// it); nothing for an unknown session.
func (s *MemoryStore) AddUsage(ctx context.Context, session string, u Usage) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ss := s.sessions[session]; ss != nil {
		ss.totals = ss.totals.Add(u)
	}
	return nil
}

// StoreTitle stores a generated title for conversation conv ("": the
// latest) as a title set by hand, and adds u (what generating it cost) to
// the session's totals, atomically. With onlyUnset a title set meanwhile
// is kept (stored is false). It returns the conversation, "" when the
// session or conversation does not exist; the usage is added whenever the
// session exists.
func (s *MemoryStore) StoreTitle(ctx context.Context, session, conv, title string, onlyUnset bool, u Usage) (string, bool, error) {
	if session == "" {
		return "", false, fmt.Errorf("store title: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil {
		return "", false, nil
	}
	ss.totals = ss.totals.Add(u)
	if conv == "" {
		conv = ss.conversation
	}
	c := ss.convs[conv]
	if c == nil {
		return "", false, nil
	}
	if onlyUnset && c.titleSet {
		return conv, false, nil
	}
	s.grow(ss, int64(len(title)-len(c.title)))
	c.title, c.titleSet = title, true
	return conv, true, nil
}

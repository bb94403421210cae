package history

import (
	"context"
	"sort"
	"strconv"
	"time"
)

// memLive is a session's live stream in a MemoryStore, as P:{S}:live is in
// Redis: the deltas and generation ends written while it is watched, the
// last liveCap of them. It lives apart from the session's data, like the
// lease.
type memLive struct {
	entries         []liveEntry
	added           int64 // entries ever added
	lastMs, lastSeq int64
	mark            int64         // bumped by each watch from a snapshot
	changed         chan struct{} // closed when a message or an entry is added
	// keptUntil is when the session stops counting as watched once its
	// last watch closed: as the mark's TTL in Redis, so that a client that
	// reconnects at once has missed nothing.
	keptUntil time.Time
}

// live returns the session's live stream, creating it. s.mu must be held.
func (s *MemoryStore) live(session string) *memLive {
	l := s.lives[session]
	if l == nil {
		l = &memLive{changed: make(chan struct{})}
		s.lives[session] = l
	}
	return l
}

// liveChanged wakes the session's readers. s.mu must be held.
func (s *MemoryStore) liveChanged(session string) {
	if l := s.lives[session]; l != nil {
		close(l.changed)
		l.changed = make(chan struct{})
	}
}

// watchMark is the session's watch mark: "" when no watch of it is open.
// s.mu must be held.
func (s *MemoryStore) watchMark(session string) string {
	l := s.lives[session]
	if l == nil || (!s.hubs.watched(session) && !s.now().Before(l.keptUntil)) {
		return ""
	}
	return strconv.FormatInt(max(l.mark, 1), 10)
}

// addLive appends an entry to the session's live stream if it is watched.
// s.mu must be held.
func (s *MemoryStore) addLive(session string, e liveEntry) {
	if s.watchMark(session) == "" && !s.shownLast(session, e) {
		return
	}
	l := s.live(session)
	ms := s.now().UnixMilli()
	if ms > l.lastMs {
		l.lastMs, l.lastSeq = ms, 0
	} else {
		l.lastSeq++
	}
	e.id = strconv.FormatInt(l.lastMs, 10) + "-" + strconv.FormatInt(l.lastSeq, 10)
	l.entries = append(l.entries, e)
	l.added++
	if n := len(l.entries) - liveCap; n > 0 {
		l.entries = append(l.entries[:0:0], l.entries[n:]...)
	}
	s.liveChanged(session)
}

// shownLast reports whether e ends a generation whose delta is the live
// stream's last entry: no longer watched, but a watcher that saw the
// delta and comes back learns that the generation ended. s.mu must be held.
func (s *MemoryStore) shownLast(session string, e liveEntry) bool {
	l := s.lives[session]
	if e.kind != EventComplete || e.gen == "" || l == nil || len(l.entries) == 0 {
		return false
	}
	last := l.entries[len(l.entries)-1]
	return last.kind == EventDelta && last.gen == e.gen
}

// publishDelta and publishEnd write a generation's delta and end. s.mu
// must be held.
func (s *MemoryStore) publishDelta(session, gen string, d Delta) {
	s.addLive(session, liveEntry{kind: EventDelta, gen: gen, delta: d})
}

func (s *MemoryStore) publishEnd(session, gen, last string) {
	s.addLive(session, liveEntry{kind: EventComplete, gen: gen, last: last})
}

// Watch starts following a session live; see RedisStore.Watch.
func (s *MemoryStore) Watch(ctx context.Context, session, from string) (*Watch, error) {
	c, resume, err := watchFrom(session, from)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	l := s.live(session)
	l.keptUntil = s.now().Add(watchTTL)
	ss := s.sessions[session]
	if ss != nil {
		s.expire(ss, s.now())
	}
	fresh := !resume || s.messageGone(ss, c.Messages) || liveGone(l, c.Live)
	if fresh {
		l.mark++
		c = zeroCursor
		if ss != nil && len(ss.stream) > 0 {
			c.Messages = ss.stream[len(ss.stream)-1].ID
		}
		if len(l.entries) > 0 {
			c.Live = l.entries[len(l.entries)-1].id
		}
	}
	busy := s.busy(session)
	s.mu.Unlock()
	return startWatch(s.hubs, session, c, fresh, busy)
}

// messageGone reports whether messages after id may be gone from the
// session's stream (see watchScript's gone).
func (s *MemoryStore) messageGone(ss *memSession, id string) bool {
	if id == "0-0" {
		return ss != nil && ss.messages > int64(len(ss.stream))
	}
	if ss == nil {
		return true
	}
	i := ss.search(id, false)
	return i == len(ss.stream) || ss.stream[i].ID != id
}

func liveGone(l *memLive, id string) bool {
	if id == "0-0" {
		return l.added > int64(len(l.entries))
	}
	i := sort.Search(len(l.entries), func(i int) bool { return compareIDs(l.entries[i].id, id) >= 0 })
	return i == len(l.entries) || l.entries[i].id != id
}

// memLiveSource is the MemoryStore's liveSource.
type memLiveSource struct{ s *MemoryStore }

func (m memLiveSource) read(ctx context.Context, session string, c Cursor, block time.Duration) ([]LiveEvent, Cursor, error) {
	s := m.s
	var deadline <-chan time.Time
	if block > 0 {
		t := time.NewTimer(block)
		defer t.Stop()
		deadline = t.C
	}
	for {
		s.mu.Lock()
		var msgs []Message
		if ss := s.sessions[session]; ss != nil {
			for i := ss.search(c.Messages, true); i < len(ss.stream) && len(msgs) < readBatch; i++ {
				msgs = append(msgs, cloneMessage(ss.stream[i]))
			}
		}
		l := s.live(session)
		var live []liveEntry
		i := sort.Search(len(l.entries), func(i int) bool { return compareIDs(l.entries[i].id, c.Live) > 0 })
		for ; i < len(l.entries) && len(live) < readBatch; i++ {
			live = append(live, l.entries[i])
		}
		changed := l.changed
		s.mu.Unlock()
		if len(msgs)+len(live) > 0 || deadline == nil {
			evs, next := merge(c, msgs, live, true)
			return evs, next, nil
		}
		select {
		case <-changed:
		case <-deadline:
			return nil, c, nil
		case <-ctx.Done():
			return nil, c, ctx.Err()
		}
	}
}

func (m memLiveSource) keep(ctx context.Context, session, id string) (bool, error) {
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	m.s.live(session).keptUntil = m.s.now().Add(watchTTL)
	ss := m.s.sessions[session]
	if ss != nil {
		// Retention's expiry is due now, as Redis drops the key on time;
		// the store applies it only when the session is used or swept.
		m.s.expire(ss, m.s.now())
	}
	return id != "0-0" && m.s.messageGone(ss, id), nil
}

// settle reports whether a generation is active; an in-process holder
// cannot die without its process, so none is ever left unended.
func (m memLiveSource) settle(ctx context.Context, session string) (bool, error) {
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	return m.s.busy(session), nil
}

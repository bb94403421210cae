package history

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"sync"
	"time"
)

// MemoryStore keeps conversations in process memory, with the same
// behaviour as RedisStore: for development, tests, and running without
// Redis. Everything is lost when the process exits. It is safe for
// concurrent use.
//
// Like Redis, it bounds itself: a conversation stream expires with its
// retention and idempotency keys after IdempotencyWindow, when read or
// written and in Sweep (Run calls it on a timer); and with WithMaxBytes,
// the least recently active sessions are erased when the store grows past
// its cap, as Redis evicts keys under maxmemory.
type MemoryStore struct {
	mu       sync.Mutex
	sessions map[string]*memSession
	index    map[string]int64 // session -> last active ms, like P:sessions
	// now is the wall clock, used where Redis uses its own clock: message
	// ids and expiry. Tests replace it.
	now      func() time.Time
	maxBytes int64 // 0: no cap
	bytes    int64 // estimated size of everything held
	log      *slog.Logger
	// turns are the sessions' turn leases (see TakeTurn), lives their live
	// streams (see Watch).
	turns map[string]*memTurn
	lives map[string]*memLive
	// compacting holds the sessions' compaction leases.
	compacting map[string]memCompaction
	obs        LiveObserver
	hubs       *hubs
}

// MemoryOption configures a MemoryStore.
type MemoryOption func(*MemoryStore)

// WithMaxBytes caps the store's estimated size; 0 means no cap. When an
// append takes the store past it, the least recently active sessions are
// erased until it is back under nine tenths of the cap, and a warning is
// logged.
func WithMaxBytes(n int64) MemoryOption {
	return func(s *MemoryStore) { s.maxBytes = max(n, 0) }
}

// WithLogger sets where the store logs when its cap bites.
func WithLogger(l *slog.Logger) MemoryOption {
	return func(s *MemoryStore) { s.log = l }
}

// WithMemoryLiveObserver counts the store's leases and deltas.
func WithMemoryLiveObserver(o LiveObserver) MemoryOption {
	return func(s *MemoryStore) { s.obs = o }
}

// memSession mirrors the keys of one session in Redis.
type memSession struct {
	conversation  string
	createdMs     int64
	lastActiveMs  int64
	active        bool
	messages      int64
	conversations int64
	retained      int64
	totals        Usage

	// stream is P:{S}:messages: ids ascending, each with its conversation.
	stream        []Message
	lastMs        int64 // the stream's last id, as Redis keeps it
	lastSeq       int64
	streamExpires time.Time // zero: no expiry

	convs map[string]*memConv // P:{S}:conversations

	idem map[string]int64 // idempotency key -> ms
	// idemOrder holds the keys in arrival order, so pruning expired keys
	// costs only the expired ones, not a scan of a day's keys per turn.
	idemOrder   []idemEntry
	idemExpires time.Time

	bytes int64 // estimated size, part of MemoryStore.bytes
}

type idemEntry struct {
	key string
	ms  int64
}

// memConv mirrors one conversation's fields in P:{S}:conversations.
type memConv struct {
	start, last       string
	createdMs, lastMs int64
	messages          int64
	title, autoTitle  string
	titleSet          bool
	// summary is the id of the latest summary, summaryTo the last id it
	// covers, summarized how many messages it covers.
	summary, summaryTo string
	summarized         int64
}

// Size estimates, in bytes: what a message, a session, a conversation's
// metadata and an idempotency key hold beyond their strings.
const (
	memMessageOverhead = 160
	memSessionOverhead = 512
	memConvOverhead    = 160
	memIdemOverhead    = 48
)

func messageBytes(m Message) int64 {
	return int64(memMessageOverhead + len(m.ID) + len(m.Conversation) + len(m.Role) + len(m.Content) + len(m.Parts) +
		len(m.Name) + len(m.ToolCalls) + len(m.ToolCallID) + len(m.Refusal) + len(m.Kind) + len(m.User) +
		len(m.Model) + len(m.RequestID) + len(m.Status))
}

// NewMemory returns an empty in-memory store.
func NewMemory(opts ...MemoryOption) *MemoryStore {
	s := &MemoryStore{
		sessions:   map[string]*memSession{},
		index:      map[string]int64{},
		now:        time.Now,
		log:        slog.New(slog.DiscardHandler),
		turns:      map[string]*memTurn{},
		lives:      map[string]*memLive{},
		compacting: map[string]memCompaction{},
		obs:        noObserver{},
	}
	for _, o := range opts {
		o(s)
	}
	s.hubs = newHubs(memLiveSource{s}, s.obs)
	return s
}

// grow adds d bytes to the session's estimate and the store's.
func (s *MemoryStore) grow(ss *memSession, d int64) {
	ss.bytes += d
	s.bytes += d
}

// expire applies the expiries Redis applies on its own: the stream's and
// the idempotency set's. s.mu must be held.
func (s *MemoryStore) expire(ss *memSession, now time.Time) {
	if !ss.streamExpires.IsZero() && !now.Before(ss.streamExpires) {
		s.dropStream(ss, len(ss.stream))
		ss.streamExpires = time.Time{}
	}
	if !ss.idemExpires.IsZero() && !now.Before(ss.idemExpires) {
		for _, e := range ss.idemOrder {
			if ss.idem[e.key] == e.ms {
				delete(ss.idem, e.key)
				s.grow(ss, -int64(memIdemOverhead+len(e.key)))
			}
		}
		ss.idemOrder, ss.idemExpires = nil, time.Time{}
	}
}

// dropStream removes the stream's first n entries.
func (s *MemoryStore) dropStream(ss *memSession, n int) {
	var freed int64
	for _, m := range ss.stream[:n] {
		freed += messageBytes(m)
	}
	ss.stream = append([]Message(nil), ss.stream[n:]...)
	if len(ss.stream) == 0 {
		ss.stream = nil
	}
	s.grow(ss, -freed)
}

// kept reports whether a conversation still has messages in the stream:
// retention removes them.
func (ss *memSession) kept(c *memConv) bool {
	return c.start != "" && ss.search(c.start, false) < ss.search(c.last, true)
}

// nextID gives a stream-like "ms-seq" id that always grows.
func (ss *memSession) nextID(now time.Time) string {
	ms := now.UnixMilli()
	if ms > ss.lastMs {
		ss.lastMs, ss.lastSeq = ms, 0
	} else {
		ss.lastSeq++
	}
	return strconv.FormatInt(ss.lastMs, 10) + "-" + strconv.FormatInt(ss.lastSeq, 10)
}

// search is the index of the first stream entry whose id is at least id
// (after it, when exclusive).
func (ss *memSession) search(id string, exclusive bool) int {
	return sort.Search(len(ss.stream), func(i int) bool {
		c := compareIDs(ss.stream[i].ID, id)
		return c > 0 || (c == 0 && !exclusive)
	})
}

// collect mirrors the scripts' collect: up to n (0: all) entries of conv
// within stream positions [i, j), oldest first or, with rev, newest first;
// summaries left out when nosum.
func (ss *memSession) collect(conv string, i, j, n int, rev, nosum bool) []Message {
	var out []Message
	take := func(k int) bool {
		if ss.stream[k].Conversation == conv && !(nosum && ss.stream[k].Kind == KindSummary) {
			out = append(out, cloneMessage(ss.stream[k]))
		}
		return n > 0 && len(out) >= n
	}
	if rev {
		for k := j - 1; k >= i; k-- {
			if take(k) {
				break
			}
		}
	} else {
		for k := i; k < j; k++ {
			if take(k) {
				break
			}
		}
	}
	return out
}

// Window returns up to n newest messages of the session's current
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
	if n <= 0 || c == nil {
		return w, nil
	}
	s.expire(ss, s.now())
	from := ss.search(c.start, false)
	if m, ok := ss.entry(c.summary); ok {
		w.Summary = &m
		from = ss.search(c.summaryTo, true)
	}
	msgs := ss.collect(ss.conversation, from, ss.search(c.last, true), n, true, true)
	if len(msgs) > 0 {
		w.Messages = make([]Message, len(msgs))
		for i, m := range msgs {
			w.Messages[len(msgs)-1-i] = m
		}
	}
	return w, nil
}

// Append writes a turn atomically; see RedisStore.Append. A turn with a
// Lease releases it, handing it to the next waiting request.
func (s *MemoryStore) Append(ctx context.Context, session string, t Turn, p Policy) (AppendResult, error) {
	if session == "" {
		return AppendResult{}, fmt.Errorf("append turn: %w", ErrEmptySession)
	}
	// Before s.mu: a delta write in flight, which flush waits for, takes it.
	final := t.Lease.flush(ctx)
	s.mu.Lock()
	r := s.appendTurn(session, t, p)
	if len(r.IDs) > 0 {
		s.liveChanged(session)
	}
	if t.Lease != nil && s.handOff(session, t.Lease.token) {
		last := ""
		if len(r.IDs) > 0 {
			last = r.IDs[len(r.IDs)-1]
		}
		if final != nil {
			s.publishDelta(session, t.Lease.gen, *final)
		}
		s.publishEnd(session, t.Lease.gen, last)
	}
	s.mu.Unlock()
	if t.Lease != nil {
		t.Lease.ended()
	}
	return r, nil
}

// appendTurn is Append's write. s.mu must be held.
func (s *MemoryStore) appendTurn(session string, t Turn, p Policy) AppendResult {
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
		s.grow(ss, int64(memSessionOverhead+len(session)))
	}
	s.expire(ss, now)
	cutoff := t.NowMs - IdempotencyWindow.Milliseconds()
	for len(ss.idemOrder) > 0 && ss.idemOrder[0].ms < cutoff {
		e := ss.idemOrder[0]
		if ss.idem[e.key] == e.ms {
			delete(ss.idem, e.key)
			s.grow(ss, -int64(memIdemOverhead+len(e.key)))
		}
		ss.idemOrder = ss.idemOrder[1:]
	}
	seen := func(key string) bool {
		ms, ok := ss.idem[key]
		return ok && ms >= cutoff
	}
	remember := func(key string) {
		ss.idem[key] = t.NowMs
		ss.idemOrder = append(ss.idemOrder, idemEntry{key, t.NowMs})
		ss.idemExpires = now.Add(IdempotencyWindow)
		s.grow(ss, int64(memIdemOverhead+len(key)))
	}
	dup := false
	if t.IdempotencyKey != "" {
		if t.WriteKey != "" && seen(t.WriteKey) || t.WriteKey == "" && seen(t.IdempotencyKey) {
			// This very write retried, or a repeat that counts nothing.
			s.sessions[session] = ss
			return AppendResult{ConversationID: ss.conversation, Duplicate: true}
		}
		// A repeat of a recorded request with a write key: no second
		// turn, but its upstream call is billed, so its usage counts.
		dup = seen(t.IdempotencyKey)
		if !dup {
			remember(t.IdempotencyKey)
		}
		if t.WriteKey != "" {
			remember(t.WriteKey)
		}
	}
	s.sessions[session] = ss

	ss.totals = ss.totals.Add(t.Usage)
	if ss.createdMs == 0 {
		ss.createdMs = t.NowMs
	}
	r := AppendResult{ConversationID: ss.conversation, Duplicate: dup}
	if len(t.Messages) == 0 || dup {
		return r
	}

	idle := p.IdleTimeout.Milliseconds()
	target := ss.conversation
	if read := ss.convs[t.ConversationID]; read != nil && !t.NewConversation && ss.kept(read) {
		// The turn was answered from this conversation: it belongs there,
		// however long the reply took or the tool ran, and even when a
		// newer one began meanwhile (without making it current again).
		target = t.ConversationID
		r.ConversationID = target
	} else if cur := ss.convs[ss.conversation]; t.NewConversation || !ss.active || (idle > 0 && t.ArrivedMs-ss.lastActiveMs > idle) || cur == nil || !ss.kept(cur) {
		// An expired conversation is not refilled: a new turn starts a
		// new one.
		ss.conversations++
		ss.conversation = "c" + strconv.FormatInt(ss.conversations, 10)
		ss.active = true
		ss.convs[ss.conversation] = &memConv{createdMs: t.NowMs}
		s.grow(ss, int64(memConvOverhead+len(ss.conversation)))
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
		m.ID, m.Conversation = ss.nextID(now), target
		ss.stream = append(ss.stream, m)
		s.grow(ss, messageBytes(m))
		r.IDs = append(r.IDs, m.ID)
	}
	if r.NewConversation {
		c.start = r.IDs[0]
	}
	c.last = r.IDs[len(r.IDs)-1]
	c.messages += int64(len(t.Messages))
	r.Unsummarized = c.messages - c.summarized
	c.lastMs = max(c.lastMs, t.NowMs)
	if title := turnTitle(t.Messages); title != "" && c.autoTitle == "" {
		c.autoTitle = title
		s.grow(ss, int64(len(title)))
	}
	ss.messages += int64(len(t.Messages))
	if p.Retention > 0 {
		ss.streamExpires = now.Add(p.Retention)
		s.trim(ss, t.NowMs-max(p.Retention.Milliseconds(), 1))
	}
	s.enforceCap(session)
	return r
}

// trim drops ended conversations whose last turn is before cutoff from the
// start of the stream, as the append script does.
func (s *MemoryStore) trim(ss *memSession, cutoff int64) {
	cur := convNumber(ss.conversation)
	k := max(ss.retained, 1)
	k0 := k
	for k < cur {
		c := ss.convs["c"+strconv.FormatInt(k, 10)]
		if c != nil && c.lastMs >= cutoff {
			break
		}
		k++
	}
	if k > k0 {
		if c := ss.convs["c"+strconv.FormatInt(k, 10)]; c != nil && c.start != "" {
			s.dropStream(ss, ss.search(c.start, false))
		}
		ss.retained = k
	}
}

// enforceCap erases the least recently active sessions, except keep, while
// the store is over its cap, down to nine tenths of it. s.mu must be held.
func (s *MemoryStore) enforceCap(keep string) {
	if s.maxBytes == 0 || s.bytes <= s.maxBytes {
		return
	}
	ids := make([]string, 0, len(s.sessions))
	for id := range s.sessions {
		if id != keep {
			ids = append(ids, id)
		}
	}
	sort.Slice(ids, func(i, j int) bool {
		a, b := s.index[ids[i]], s.index[ids[j]]
		if a != b {
			return a < b
		}
		return ids[i] < ids[j]
	})
	target := s.maxBytes / 10 * 9
	before, erased := s.bytes, 0
	for _, id := range ids {
		if s.bytes <= target {
			break
		}
		s.erase(id)
		erased++
	}
	s.log.Warn("memory store over its size cap: erased the least recently active sessions (set store.memory_max_bytes, or use Redis)",
		"max_bytes", s.maxBytes, "erased_sessions", erased, "freed_bytes", before-s.bytes, "bytes", s.bytes)
}

// Session returns the session's metadata; false when the session is
// unknown.
func (s *MemoryStore) Session(ctx context.Context, session string) (Session, bool, error) {
	if session == "" {
		return Session{}, false, fmt.Errorf("read session: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out, ok := s.session(session)
	return out, ok, nil
}

func (s *MemoryStore) session(session string) (Session, bool) {
	ss := s.sessions[session]
	if ss == nil {
		return Session{}, false
	}
	out := Session{
		ID:             session,
		ConversationID: ss.conversation,
		CreatedMs:      ss.createdMs,
		LastActiveMs:   ss.lastActiveMs,
		Active:         ss.active,
		MessageCount:   ss.messages,
		Totals:         ss.totals,
	}
	if c := ss.convs[ss.conversation]; c != nil {
		out.Title = c.title
		if !c.titleSet {
			out.Title = c.autoTitle
		}
	}
	return out, true
}

// Conversations returns the session's conversations, oldest first,
// including those whose messages have expired; nil for an unknown session.
func (s *MemoryStore) Conversations(ctx context.Context, session string) ([]Conversation, error) {
	if session == "" {
		return nil, fmt.Errorf("list conversations: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil {
		return nil, nil
	}
	s.expire(ss, s.now())
	byID := map[string]*Conversation{}
	for id, c := range ss.convs {
		title := c.autoTitle
		if c.titleSet {
			title = c.title
		}
		byID[id] = &Conversation{
			ID: id, Title: title, TitleSet: c.titleSet, StartID: c.start, LastID: c.last,
			CreatedMs: c.createdMs, LastMs: c.lastMs, MessageCount: c.messages,
			Current: id == ss.conversation && ss.active,
			Expired: !ss.kept(c),
		}
	}
	return sortedConversations(byID), nil
}

// Messages returns a whole conversation, oldest first; an empty
// conversationID means the current conversation (nil after Reset).
func (s *MemoryStore) Messages(ctx context.Context, session, conversationID string) ([]Message, error) {
	_, msgs, err := s.ReadMessages(ctx, session, MessageQuery{Conversation: conversationID})
	return msgs, err
}

// ReadMessages returns the messages of one conversation that q selects;
// see RedisStore.ReadMessages.
func (s *MemoryStore) ReadMessages(ctx context.Context, session string, q MessageQuery) (string, []Message, error) {
	if session == "" {
		return "", nil, fmt.Errorf("read messages: %w", ErrEmptySession)
	}
	if err := checkQuery(q); err != nil {
		return "", nil, fmt.Errorf("read messages %s: %w", session, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil {
		return "", nil, nil
	}
	conv := q.Conversation
	if conv == "" {
		if !ss.active {
			return "", nil, nil
		}
		conv = ss.conversation
	}
	c := ss.convs[conv]
	if c == nil || c.start == "" {
		return "", nil, nil
	}
	s.expire(ss, s.now())
	i, j := ss.search(c.start, false), ss.search(c.last, true)
	if q.After != "" {
		i = max(i, ss.search(q.After, true))
	}
	if q.Before != "" {
		j = min(j, ss.search(q.Before, false))
	}
	if i >= j {
		return conv, nil, nil
	}
	msgs := ss.collect(conv, i, j, max(q.Limit, 0), q.Newest, false)
	if q.Newest {
		for a, b := 0, len(msgs)-1; a < b; a, b = a+1, b-1 {
			msgs[a], msgs[b] = msgs[b], msgs[a]
		}
	}
	return conv, msgs, nil
}

// Sessions lists sessions, most recently active first, as q selects them.
func (s *MemoryStore) Sessions(ctx context.Context, q SessionQuery) (SessionPage, error) {
	page, err := listSessions(ctx, memIndex{s}, q)
	if err != nil {
		return SessionPage{}, fmt.Errorf("list sessions: %w", err)
	}
	return page, nil
}

// memIndex serves listSessions from the index map, in the order of the
// Redis indexes: score descending, then id descending.
type memIndex struct{ s *MemoryStore }

// indexOf is the query of the index that serves q, as redisIndex.key picks
// it: its user, else agent, else channel, else all sessions.
func indexOf(q SessionQuery) SessionQuery {
	switch {
	case q.User != "":
		return SessionQuery{User: q.User}
	case q.Agent != "":
		return SessionQuery{Agent: q.Agent}
	case q.Channel != "":
		return SessionQuery{Channel: q.Channel}
	}
	return SessionQuery{}
}

func (m memIndex) entries(q SessionQuery, lo, hi int64) []indexEntry {
	key := indexOf(q)
	m.s.mu.Lock()
	var es []indexEntry
	for id, score := range m.s.index {
		if score >= lo && score <= hi && key.idFilter(id) {
			es = append(es, indexEntry{id: id, score: score})
		}
	}
	m.s.mu.Unlock()
	sort.Slice(es, func(i, j int) bool {
		if es[i].score != es[j].score {
			return es[i].score > es[j].score
		}
		return es[i].id > es[j].id
	})
	return es
}

func (m memIndex) scan(ctx context.Context, q SessionQuery, lo, hi int64, batch int, fn func([]indexEntry) bool) error {
	es := m.entries(q, lo, hi)
	for len(es) > 0 {
		n := min(batch, len(es))
		if !fn(es[:n]) {
			return nil
		}
		es = es[n:]
	}
	return nil
}

func (m memIndex) count(ctx context.Context, q SessionQuery, lo, hi int64) (int64, error) {
	key := indexOf(q)
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	var n int64
	for id, score := range m.s.index {
		if score >= lo && score <= hi && key.idFilter(id) {
			n++
		}
	}
	return n, nil
}

func (m memIndex) infos(ctx context.Context, ids []string) ([]Session, []bool, error) {
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	out := make([]Session, len(ids))
	found := make([]bool, len(ids))
	for i, id := range ids {
		out[i], found[i] = m.s.session(id)
	}
	return out, found, nil
}

// Reset ends the session's current conversation; see RedisStore.Reset.
func (s *MemoryStore) Reset(ctx context.Context, session string) (string, error) {
	if session == "" {
		return "", fmt.Errorf("reset session: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil || !ss.active || ss.conversation == "" {
		return "", nil
	}
	ss.active = false
	return ss.conversation, nil
}

// SetTitle sets or clears a conversation's title; see RedisStore.SetTitle.
func (s *MemoryStore) SetTitle(ctx context.Context, session, conversationID, title string) (string, error) {
	if session == "" {
		return "", fmt.Errorf("set title: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ss := s.sessions[session]
	if ss == nil {
		return "", nil
	}
	if conversationID == "" {
		conversationID = ss.conversation
	}
	c := ss.convs[conversationID]
	if c == nil {
		return "", nil
	}
	s.grow(ss, int64(len(title)-len(c.title)))
	c.title, c.titleSet = title, title != ""
	return conversationID, nil
}

// Erase forgets the session entirely and says what it removed.
func (s *MemoryStore) Erase(ctx context.Context, session string) (Erased, error) {
	if session == "" {
		return Erased{}, fmt.Errorf("erase session: %w", ErrEmptySession)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.erase(session), nil
}

func (s *MemoryStore) erase(session string) Erased {
	delete(s.index, session)
	if l := s.lives[session]; l != nil {
		// The live stream holds replies' text: it goes too.
		l.entries = nil
		s.liveChanged(session)
	}
	ss := s.sessions[session]
	if ss == nil {
		return Erased{}
	}
	s.expire(ss, s.now())
	delete(s.sessions, session)
	delete(s.compacting, session)
	s.bytes -= ss.bytes
	return Erased{Found: true, Conversations: ss.conversations, Messages: int64(len(ss.stream))}
}

// MemoryStats is what a MemoryStore holds.
type MemoryStats struct {
	Sessions, Messages, IdempotencyKeys int
	Bytes                               int64 // estimated
	// Waiting is how many requests wait in TakeTurn for a session's turn
	// lease, all sessions together.
	Waiting int
}

// Stats says what the store holds now.
func (s *MemoryStore) Stats() MemoryStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := MemoryStats{Sessions: len(s.sessions), Bytes: s.bytes}
	for _, ss := range s.sessions {
		st.Messages += len(ss.stream)
		st.IdempotencyKeys += len(ss.idem)
	}
	for _, t := range s.turns {
		st.Waiting += len(t.queue)
	}
	return st
}

// Sweep applies every expiry that is due, as Redis does in the background:
// conversation streams past their retention, idempotency sets past
// IdempotencyWindow, and live streams no one has watched for a minute. Sessions stay, with their metadata and totals, as
// their Redis hashes do.
func (s *MemoryStore) Sweep() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for _, ss := range s.sessions {
		s.expire(ss, now)
	}
	// A live stream no one watches any more goes, as its keys expire in
	// Redis.
	for id, l := range s.lives {
		if !now.Before(l.keptUntil) && !s.hubs.watched(id) {
			close(l.changed) // a reader waiting on it reads again
			delete(s.lives, id)
		}
	}
}

// Run sweeps every interval until ctx is done.
func (s *MemoryStore) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.Sweep()
		}
	}
}

// Close ends the store's watches.
func (s *MemoryStore) Close() error {
	s.hubs.close()
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

package history

import (
	"container/list"
	"sync"
	"unsafe"
)

// DefaultWindowCacheBytes is the size of a RedisStore's window cache when
// WithWindowCacheBytes does not set one.
const DefaultWindowCacheBytes = 16 << 20

// windowCache keeps, per session, the newest entries of the session's
// stream as this RedisStore last read them, decoded (a streamTail), so that
// the session's next TakeTurn reads and decodes only the entries added
// since (XREVRANGE stream + (newest COUNT n) instead of its whole window.
// It is bounded by the heap its tails hold (entryBytes, within a tenth of
// the runtime's count), the least recently used sessions dropped first.
//
// Why a tail read earlier still holds: within a stream's life, entries are
// only added at its end (XADD *, ids growing) and removed from its start
// (retention's XTRIM MINID); nothing changes an entry. So the stream's
// newest entries now are those added since, in front of the newest ones
// read then. Whatever else can happen to a stream shows, and the tail is
// then dropped and the window read afresh (see streamTail.extend and
// RedisStore.cacheTail): a trim, a stream gone (expired with retention, or
// erased) or put back by a migration, or entries that came in below the
// tail's newest (a clock stepped back) change its length by other than the
// entries read after the tail; a session erased and written again has
// another created_nonce (64 random bits set with its created_ms: within
// the millisecond of the erased stream's last write, the new stream reuses
// its ids, and may have its length and created_ms too); and the
// conversation's last entry must be among those read.
//
// A streamTail is never changed once built: the cache swaps whole tails,
// and the Messages handed out are copies of the entries' (sharing their
// strings and byte slices, which nothing writes to: the proxy builds new
// messages where it changes one).
//
// It is safe for concurrent use.
type windowCache struct {
	max int64 // bytes; 0: the cache is off

	mu    sync.Mutex
	bytes int64
	lru   list.List // of *cachedTail, the most recently used first
	items map[string]*list.Element
}

type cachedTail struct {
	session string
	tail    *streamTail
	size    int64 // the bytes it counts for
}

// tailOverhead is what a cached session holds beyond its entries: its map
// slot, list element and tail.
const tailOverhead = 160

// newWindowCache returns a cache of at most max bytes; nil (off) when max
// is 0 or less.
func newWindowCache(max int64) *windowCache {
	if max <= 0 {
		return nil
	}
	return &windowCache{max: max, items: map[string]*list.Element{}}
}

// get returns the session's tail, nil when none is cached. A nil cache has
// none.
func (c *windowCache) get(session string) *streamTail {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[session]
	if !ok {
		return nil
	}
	c.lru.MoveToFront(el)
	return el.Value.(*cachedTail).tail
}

// put makes next the session's tail. Which of two requests' tails is kept
// does not matter: each is checked against the stream when it is used.
func (c *windowCache) put(session string, next *streamTail) {
	if c == nil {
		return
	}
	size := next.bytes + int64(len(session)) + tailOverhead
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[session]; ok {
		c.remove(el)
	}
	if size > c.max {
		return
	}
	c.items[session] = c.lru.PushFront(&cachedTail{session: session, tail: next, size: size})
	c.bytes += size
	for c.bytes > c.max {
		c.remove(c.lru.Back())
	}
}

// drop forgets the session's tail.
func (c *windowCache) drop(session string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[session]; ok {
		c.remove(el)
	}
}

func (c *windowCache) remove(el *list.Element) {
	t := c.lru.Remove(el).(*cachedTail)
	delete(c.items, t.session)
	c.bytes -= t.size
}

// size returns the bytes the cache holds and how many sessions, for tests.
func (c *windowCache) size() (int64, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bytes, len(c.items)
}

// streamTail is the newest entries of a session's stream, newest first,
// with none missing between them, as one read found them.
type streamTail struct {
	entries []*streamEntry
	length  int64  // the stream's length (XLEN) at that read
	created string // the session's created_ms and created_nonce then
	bytes   int64  // an estimate of what the entries hold
}

// streamEntry is one decoded entry of a session's stream.
type streamEntry struct {
	conv    string // its conversation
	summary bool   // a compaction summary, not a message of the window
	msg     Message
}

func (e *streamEntry) id() string { return e.msg.ID }

// entryBytes estimates what an entry holds on the heap: the entry itself
// (its Message inline) and its slot in a tail, and each string, byte slice
// and usage it points to, each rounded up as the allocator rounds it. The
// entry's conversation is its message's (one string). Strings the decoder
// fills in from constants (a lean entry's implied kind and status) are
// counted as if they were allocated: a little over, never under.
// TestWindowCacheEstimateIsTheHeap holds it to the runtime's own count.
func entryBytes(e *streamEntry) int64 {
	m := &e.msg
	n := allocBytes(int(unsafe.Sizeof(*e))) + 8
	for _, s := range [...]string{m.ID, m.Conversation, m.Role, m.Content, m.Name, m.ToolCallID, m.Refusal, m.Kind,
		m.User, m.Model, m.RequestID, m.Status, m.IdempotencyKey, m.CoversFrom, m.CoversTo} {
		n += allocBytes(len(s))
	}
	n += allocBytes(len(m.Parts)) + allocBytes(len(m.ToolCalls))
	if m.Usage != nil {
		n += allocBytes(int(unsafe.Sizeof(*m.Usage)))
	}
	return n
}

// allocBytes is what an allocation of n bytes takes: Go's size classes are
// 16 bytes apart up to 256 and at most an eighth apart above.
func allocBytes(n int) int64 {
	switch {
	case n == 0:
		return 0
	case n <= 256:
		return int64(n+15) &^ 15
	default:
		return int64(n + n/8)
	}
}

func newTail(entries []*streamEntry, length int64, created string) *streamTail {
	t := &streamTail{entries: entries, length: length, created: created}
	for _, e := range entries {
		t.bytes += entryBytes(e)
	}
	return t
}

// covers reports whether the tail holds the stream's newest n entries (or
// all of them, when it has fewer), so that a read of the entries after it
// completes them.
func (t *streamTail) covers(n int) bool {
	return len(t.entries) >= n || int64(len(t.entries)) == t.length
}

// newest returns the id of the tail's newest entry.
func (t *streamTail) newest() string { return t.entries[0].id() }

// extend returns the tail after added, the entries after t's newest
// (newest first, read with COUNT n), when the stream's length is now
// length and the session's created_ms and created_nonce created. With n of them there may
// be more: they are the stream's newest n on their own, as a full read
// would give. Otherwise they are every entry added since t was read, and
// the result keeps the newest of them and t's entries, as many as n or as
// t had, whichever is more (so that requests of another window size for
// the session do not read all of theirs each time). false when the stream
// changed in any other way (its length is not t's plus added's: a trim,
// or entries that came in below t's newest) or the session is another
// (erased and written again): t's entries then cannot be trusted.
func (t *streamTail) extend(added []*streamEntry, length int64, created string, n int) (*streamTail, bool) {
	if len(added) >= n {
		return newTail(added, length, created), true
	}
	if length != t.length+int64(len(added)) || created != t.created {
		return nil, false
	}
	keep := max(n, len(t.entries))
	es := make([]*streamEntry, 0, min(keep, len(added)+len(t.entries)))
	es = append(es, added...)
	es = append(es, t.entries[:min(len(t.entries), keep-len(added))]...)
	return newTail(es, length, created), true
}

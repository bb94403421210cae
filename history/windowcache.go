package history

import (
	"container/list"
	"slices"
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
// It is bounded by the heap its tails hold (entryBytes: 1.00 to 1.04 of the
// runtime's count in the tests), the least recently used sessions dropped
// first.
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

// tailOverhead is what a cached session holds beyond its entries and its
// id: its tail (64 bytes), cachedTail (32), list element (48) and map
// slot (24 bytes and a control byte, in a table between 7/16 and 7/8
// full: up to 64; 80 counted, for the table's growth between sizes).
const tailOverhead = 224

// WindowCacheObserver counts what a RedisStore's window cache does (see
// WithWindowCacheObserver). The store calls it only while its cache is
// on: with the cache off it calls nothing.
type WindowCacheObserver interface {
	// WindowCacheOn is called once, by NewRedis, when the store's cache is
	// on, with held: the bytes the cache counts and the sessions it holds
	// at the time held is called. held is safe for concurrent use and
	// cheap (one lock), to be called at each scrape.
	WindowCacheOn(held func() (bytes int64, sessions int))
	// WindowCacheHit, WindowCacheMiss and WindowCacheStale count each take
	// that read a window (of n > 0 messages, the turn granted, of a
	// current conversation: a take that found none left the tail as it
	// is and counts nothing): a hit
	// used the session's tail and read only the stream's entries after
	// it (and the window again by windowScript when turns written late
	// to an older conversation crowd it out, as without the cache); a miss
	// had no tail to use (the session's first take on this instance, its
	// tail evicted, or one that holds fewer entries than the window
	// asked for) and read the newest n; a stale take found its tail no
	// longer held (the stream changed other than by appends, or the
	// session was erased and written again), dropped it, and read the
	// window again. They are called on the request's path: keep them to
	// an atomic add.
	WindowCacheHit()
	WindowCacheMiss()
	WindowCacheStale()
}

type noCacheObserver struct{}

func (noCacheObserver) WindowCacheOn(func() (int64, int)) {}
func (noCacheObserver) WindowCacheHit()                   {}
func (noCacheObserver) WindowCacheMiss()                  {}
func (noCacheObserver) WindowCacheStale()                 {}

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
	size := next.bytes + allocBytes(len(session)) + tailOverhead
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

// size returns the bytes the cache counts and how many sessions it
// holds (what WindowCacheObserver's held reports).
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
	bytes   int64  // what it holds on the heap: its entries, their slice, created
	// entryBytes is the entries' share of bytes, so that extending a tail
	// counts only the entries it adds and drops, not all of them again.
	entryBytes int64
}

// streamEntry is one decoded entry of a session's stream.
type streamEntry struct {
	conv    string        // its conversation
	summary bool          // a compaction summary, not a message of the window
	implied impliedFields // (in the summary's padding: the entry stays 352 bytes)
	msg     Message
}

// impliedFields says which of a message's kind and status its entry left
// out: the decoder fills those in with constants, which hold no heap.
type impliedFields struct{ kind, status bool }

func (e *streamEntry) id() string { return e.msg.ID }

// entryBytes is what an entry holds on the heap: the entry itself (its
// Message inline) and each string, byte slice and usage it points to, each
// as the allocator sizes it (allocBytes). A string read from Redis holds
// two bytes more than its length (go-redis reads a bulk string with its
// CRLF into one allocation and keeps the slice as the string); Parts and
// ToolCalls are copies of theirs, their own length. The entry's
// conversation is its message's (one string); a kind or status the
// decoder filled in holds nothing. Its slot in a tail is counted with the
// tail (sliceBytes). TestWindowCacheEstimateIsTheHeap and
// TestWindowCacheEstimateOfEveryShape hold it to the runtime's own count.
func entryBytes(e *streamEntry) int64 {
	m := &e.msg
	n := allocBytes(int(unsafe.Sizeof(*e)))
	for _, s := range [...]string{m.ID, m.Conversation, m.Role, m.Content, m.Name, m.ToolCallID, m.Refusal,
		m.User, m.Model, m.RequestID, m.IdempotencyKey, m.CoversFrom, m.CoversTo} {
		n += readBytes(s)
	}
	if !e.implied.kind {
		n += readBytes(m.Kind)
	}
	if !e.implied.status {
		n += readBytes(m.Status)
	}
	n += allocBytes(len(m.Parts)) + allocBytes(len(m.ToolCalls))
	if m.Usage != nil {
		n += allocBytes(int(unsafe.Sizeof(*m.Usage)))
	}
	return n
}

// readBytes is what a non-empty string go-redis read holds (see
// entryBytes).
func readBytes(s string) int64 {
	if s == "" {
		return 0
	}
	return allocBytes(len(s) + 2)
}

// sizeClasses are the sizes the Go allocator hands out up to 32 KiB (the
// runtime's internal/runtime/gc.SizeClassToSize).
var sizeClasses = [...]int{8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 288, 320,
	352, 384, 416, 448, 480, 512, 576, 640, 704, 768, 896, 1024, 1152, 1280, 1408, 1536, 1792, 2048, 2304, 2688, 3072, 3200,
	3456, 4096, 4864, 5376, 6144, 6528, 6784, 6912, 8192, 9472, 9728, 10240, 10880, 12288, 13568, 14336, 16384, 18432,
	19072, 20480, 21760, 24576, 27264, 28672, 32768}

// allocBytes is what an allocation of n bytes takes: its size class, or
// above 32 KiB whole 8 KiB pages. Under 16 bytes a pointer-free object
// (a string's) shares a 16-byte block with others, which lives as long as
// any of them does: counted as the whole block.
func allocBytes(n int) int64 {
	switch {
	case n <= 0:
		return 0
	case n > sizeClasses[len(sizeClasses)-1]:
		return int64(n+8191) &^ 8191
	}
	i, _ := slices.BinarySearch(sizeClasses[:], n)
	return int64(max(sizeClasses[i], 16))
}

// sliceBytes is what a tail's slice of entries takes: above 512 bytes an
// object with pointers carries an 8-byte header (up to 32 KiB).
func sliceBytes(n int) int64 {
	b := 8 * n
	if b > 512 && b <= sizeClasses[len(sizeClasses)-1]-8 {
		b += 8
	}
	return allocBytes(b)
}

func newTail(entries []*streamEntry, length int64, created string) *streamTail {
	var sum int64
	for _, e := range entries {
		sum += entryBytes(e)
	}
	return tailOf(entries, length, created, sum)
}

// tailOf is a tail of entries whose entryBytes add up to sum.
func tailOf(entries []*streamEntry, length int64, created string, sum int64) *streamTail {
	return &streamTail{entries: entries, length: length, created: created, entryBytes: sum,
		bytes: sum + sliceBytes(cap(entries)) + readBytes(created)}
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
// length and the session's created_ms and created_nonce created. With n
// of them there may be more: they are the stream's newest n on their own, as a full read
// would give. Otherwise they are every entry added since t was read, and
// the result keeps the newest of them and t's entries, as many as n or as
// t had, whichever is more (so that requests of another window size for
// the session do not read all of theirs each time). false when the stream
// changed in any other way (its length is not t's plus added's: a trim,
// or entries that came in below t's newest) or the session is another
// (erased and written again, however many entries were read): t's entries
// then cannot be trusted.
func (t *streamTail) extend(added []*streamEntry, length int64, created string, n int) (*streamTail, bool) {
	if created != t.created {
		// Checked before the n entries' shortcut too: they would make the
		// right window, but the take is not one of the tail's session, and
		// counts as stale (WindowCacheObserver).
		return nil, false
	}
	if len(added) >= n {
		return newTail(added, length, created), true
	}
	if length != t.length+int64(len(added)) {
		return nil, false
	}
	keep := max(n, len(t.entries))
	kept := min(len(t.entries), keep-len(added))
	es := make([]*streamEntry, 0, min(keep, len(added)+len(t.entries)))
	es = append(es, added...)
	es = append(es, t.entries[:kept]...)
	sum := t.entryBytes
	for _, e := range added {
		sum += entryBytes(e)
	}
	for _, e := range t.entries[kept:] {
		sum -= entryBytes(e)
	}
	return tailOf(es, length, created, sum), true
}

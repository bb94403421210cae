package history

import (
	"container/heap"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"
)

// ErrBadCursor is returned for a cursor that no page of Sessions gave.
var ErrBadCursor = errors.New("invalid cursor")

// SplitID splits a session id "channel:user:agent" into its parts; ok is
// false when it does not have three non-empty parts.
func SplitID(id string) (channel, user, agent string, ok bool) {
	channel, rest, ok1 := strings.Cut(id, ":")
	user, agent, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 || channel == "" || user == "" || agent == "" || strings.Contains(agent, ":") {
		return "", "", "", false
	}
	return channel, user, agent, true
}

// cursor is a position in the listing order: last activity (or cost,
// when byCost) descending, then id descending (the order of ZRANGE ... REV
// on ties).
type cursor struct {
	byCost bool
	score  int64
	id     string
}

// costMark starts a cost order's cursor, so that a cursor of one order is
// refused by the other.
const costMark = "$"

func (c cursor) String() string {
	mark := ""
	if c.byCost {
		mark = costMark
	}
	return base64.RawURLEncoding.EncodeToString([]byte(mark + strconv.FormatInt(c.score, 10) + ":" + c.id))
}

func parseCursor(s string, byCost bool) (cursor, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return cursor{}, ErrBadCursor
	}
	text, marked := strings.CutPrefix(string(b), costMark)
	score, id, ok := strings.Cut(text, ":")
	n, err := strconv.ParseInt(score, 10, 64)
	if !ok || err != nil || id == "" || marked != byCost {
		return cursor{}, ErrBadCursor
	}
	return cursor{byCost: byCost, score: n, id: id}, nil
}

// after reports whether (score, id) comes after c in the listing order.
func (c cursor) after(score int64, id string) bool {
	return score < c.score || (score == c.score && id < c.id)
}

// idFilter reports whether a session id has the parts q asks for.
func (q SessionQuery) idFilter(id string) bool {
	if q.MatchID != nil && !q.MatchID(id) {
		return false
	}
	if q.Channel == "" && q.User == "" && q.Agent == "" {
		return true
	}
	ch, u, a, ok := SplitID(id)
	return ok && (q.Channel == "" || q.Channel == ch) && (q.User == "" || q.User == u) && (q.Agent == "" || q.Agent == a)
}

// inRange reports whether a last activity is within q's bounds.
func (q SessionQuery) inRange(ms int64) bool {
	return (q.SinceMs == 0 || ms >= q.SinceMs) && (q.UntilMs == 0 || ms <= q.UntilMs)
}

// titleLen is about the longest derived title, in characters.
const titleLen = 60

// DeriveTitle gives a title from a message's text: its words, with runs of
// white space made one space, cut on a word boundary to about 60
// characters (an ellipsis says it was cut). A word longer than that is cut
// inside. Text in content parts counts; other parts do not.
func DeriveTitle(m Message) string {
	text := m.Content
	if text == "" && len(m.Parts) > 0 {
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if json.Unmarshal(m.Parts, &parts) == nil {
			var b strings.Builder
			for _, p := range parts {
				if p.Type == "text" {
					b.WriteString(p.Text)
					b.WriteByte(' ')
				}
			}
			text = b.String()
		}
	}
	// Word by word, stopping at the title's length: a message may be
	// megabytes long, and this runs for every turn.
	var b strings.Builder
	n := 0
	for w := range strings.FieldsSeq(text) {
		wn := utf8.RuneCountInString(w)
		sep := 0
		if n > 0 {
			sep = 1
		}
		if n+sep+wn > titleLen {
			if n == 0 {
				// One long word: cut inside it, after titleLen-1 runes.
				cut, runes := 0, 0
				for cut < len(w) && runes < titleLen-1 {
					_, size := utf8.DecodeRuneInString(w[cut:])
					cut += size
					runes++
				}
				b.WriteString(w[:cut])
			}
			b.WriteString("…")
			return b.String()
		}
		if sep == 1 {
			b.WriteByte(' ')
		}
		b.WriteString(w)
		n += sep + wn
	}
	return b.String()
}

// turnTitle is the title a turn offers a conversation that has none: from
// its first user message with text.
func turnTitle(msgs []Message) string {
	for _, m := range msgs {
		if m.Role == RoleUser {
			if t := DeriveTitle(m); t != "" {
				return t
			}
		}
	}
	return ""
}

// convNumber is the number of a conversation id "c<n>"; 0 when it has
// another form.
func convNumber(id string) int64 {
	n, err := strconv.ParseInt(strings.TrimPrefix(id, "c"), 10, 64)
	if err != nil || !strings.HasPrefix(id, "c") {
		return 0
	}
	return n
}

// parseID splits a stream id "ms-seq"; ok is false for another form.
func parseID(id string) (ms, seq int64, ok bool) {
	a, b, found := strings.Cut(id, "-")
	ms, err1 := strconv.ParseInt(a, 10, 64)
	seq, err2 := strconv.ParseInt(b, 10, 64)
	return ms, seq, found && err1 == nil && err2 == nil && ms >= 0 && seq >= 0
}

// ValidMessageID reports whether id has the form of a message id.
func ValidMessageID(id string) bool {
	_, _, ok := parseID(id)
	return ok
}

// CompareIDs orders two message ids (stream entry ids): -1, 0 or 1. Both
// must be valid (ValidMessageID).
func CompareIDs(a, b string) int { return compareIDs(a, b) }

// compareIDs orders two stream ids: -1, 0 or 1. Both must be valid.
func compareIDs(a, b string) int {
	am, as, _ := parseID(a)
	bm, bs, _ := parseID(b)
	switch {
	case am != bm:
		if am < bm {
			return -1
		}
		return 1
	case as != bs:
		if as < bs {
			return -1
		}
		return 1
	}
	return 0
}

func checkQuery(q MessageQuery) error {
	for _, id := range []string{q.After, q.Before} {
		if id != "" && !ValidMessageID(id) {
			return fmt.Errorf("message id %q: want ms-seq", id)
		}
	}
	return nil
}

// indexEntry is one session in an index: its id and last activity.
type indexEntry struct {
	id    string
	score int64
}

// sessionSource is what listSessions needs of a store.
type sessionSource interface {
	// scan calls fn with batches of at most batch entries of the index
	// that serves q (its user, else agent, else channel, else all
	// sessions), whose score is within [lo, hi], in listing order, until fn
	// returns false or the index is exhausted.
	scan(ctx context.Context, q SessionQuery, lo, hi int64, batch int, fn func([]indexEntry) bool) error
	// count counts the entries of that index within [lo, hi].
	count(ctx context.Context, q SessionQuery, lo, hi int64) (int64, error)
	// infos reads sessions' metadata; found[i] is false for one that is
	// gone although an index still names it.
	infos(ctx context.Context, ids []string) (s []Session, found []bool, err error)
}

// listSessions is Sessions for both stores, so that both page, filter and
// count alike.
//
// Without Match and with at most one of channel, user and agent, the page
// reads only the index entries it shows (plus one) and the total is one
// count. Otherwise every candidate of the index is visited to count the
// total, and with Match each one's metadata is read, in batches.
func listSessions(ctx context.Context, src sessionSource, q SessionQuery) (SessionPage, error) {
	var cur *cursor
	if q.Cursor != "" {
		c, err := parseCursor(q.Cursor, q.ByCost)
		if err != nil {
			return SessionPage{}, err
		}
		cur = &c
	}
	if q.ByCost {
		return listByCost(ctx, src, q, cur)
	}
	lo, hi := int64(math.MinInt64), int64(math.MaxInt64)
	if q.SinceMs != 0 {
		lo = q.SinceMs
	}
	if q.UntilMs != 0 {
		hi = q.UntilMs
	}
	// room reports whether the page takes another entry: up to Limit, plus
	// one that says there is a next page. No arithmetic on Limit, which
	// may be math.MaxInt.
	room := func(n int) bool { return q.Limit <= 0 || n <= q.Limit }
	parts := 0
	for _, p := range []string{q.Channel, q.User, q.Agent} {
		if p != "" {
			parts++
		}
	}
	scanAll := q.Match != nil || q.MatchID != nil || parts > 1
	// A page of the index is read in batches of the page's size, plus one;
	// a scan of all of it in large ones (batches of a page's size made a
	// q over 100,000 sessions take 2,000 round trips).
	batch := 500
	if !scanAll && q.Limit > 0 && q.Limit < batch {
		batch = q.Limit + 1
	}
	from := hi
	if !scanAll && cur != nil && cur.score < from {
		from = cur.score
	}

	type pick struct {
		e    indexEntry
		s    Session
		read bool
	}
	var (
		picked  []pick
		total   int64
		scanErr error
	)
	err := src.scan(ctx, q, lo, from, batch, func(es []indexEntry) bool {
		keep := es[:0:0]
		for _, e := range es {
			if q.idFilter(e.id) {
				keep = append(keep, e)
			}
		}
		if q.Match == nil {
			for _, e := range keep {
				if scanAll {
					total++
				}
				if (cur == nil || cur.after(e.score, e.id)) && room(len(picked)) {
					picked = append(picked, pick{e: e})
				}
			}
			return scanAll || room(len(picked))
		}
		if len(keep) == 0 {
			return true
		}
		ids := make([]string, len(keep))
		for i, e := range keep {
			ids[i] = e.id
		}
		infos, found, err := src.infos(ctx, ids)
		if err != nil {
			scanErr = err
			return false
		}
		for i, e := range keep {
			if !found[i] || !q.Match(infos[i]) {
				continue
			}
			total++
			if (cur == nil || cur.after(e.score, e.id)) && room(len(picked)) {
				picked = append(picked, pick{e: e, s: infos[i], read: true})
			}
		}
		return true
	})
	if err == nil {
		err = scanErr
	}
	if err != nil {
		return SessionPage{}, err
	}
	if !scanAll {
		if total, err = src.count(ctx, q, lo, hi); err != nil {
			return SessionPage{}, err
		}
	}
	var page SessionPage
	page.Total = total
	if !room(len(picked)) {
		picked = picked[:q.Limit]
		last := picked[len(picked)-1].e
		page.NextCursor = cursor{score: last.score, id: last.id}.String()
	}
	if q.Match == nil && len(picked) > 0 {
		ids := make([]string, len(picked))
		for i, p := range picked {
			ids[i] = p.e.id
		}
		infos, found, err := src.infos(ctx, ids)
		if err != nil {
			return SessionPage{}, err
		}
		for i := range picked {
			picked[i].s, picked[i].read = infos[i], found[i]
		}
	}
	for _, p := range picked {
		// An index entry whose session is gone (deleted by hand) is not
		// shown.
		if p.read {
			page.Sessions = append(page.Sessions, p.s)
		}
	}
	return page, nil
}

// listByCost is listSessions in the order of cost: every candidate of the
// index that serves q is read (in batches), and the page is the most
// costly after cur, kept in a bounded heap, so memory is the page's size
// whatever the number of sessions.
func listByCost(ctx context.Context, src sessionSource, q SessionQuery, cur *cursor) (SessionPage, error) {
	lo, hi := int64(math.MinInt64), int64(math.MaxInt64)
	if q.SinceMs != 0 {
		lo = q.SinceMs
	}
	if q.UntilMs != 0 {
		hi = q.UntilMs
	}
	keep := math.MaxInt
	if q.Limit > 0 {
		keep = q.Limit + 1 // one more says there is a next page
	}
	top := &costHeap{}
	var (
		total   int64
		scanErr error
	)
	err := src.scan(ctx, q, lo, hi, 500, func(es []indexEntry) bool {
		ids := make([]string, 0, len(es))
		for _, e := range es {
			if q.idFilter(e.id) {
				ids = append(ids, e.id)
			}
		}
		if len(ids) == 0 {
			return true
		}
		infos, found, err := src.infos(ctx, ids)
		if err != nil {
			scanErr = err
			return false
		}
		for i, s := range infos {
			if !found[i] || (q.Match != nil && !q.Match(s)) {
				continue
			}
			total++
			if cur != nil && !cur.after(s.Totals.CostNanos, s.ID) {
				continue
			}
			heap.Push(top, s)
			if top.Len() > keep {
				heap.Pop(top) // the cheapest: it comes last
			}
		}
		return true
	})
	if err == nil {
		err = scanErr
	}
	if err != nil {
		return SessionPage{}, err
	}
	page := SessionPage{Total: total, Sessions: make([]Session, top.Len())}
	for i := top.Len() - 1; i >= 0; i-- {
		page.Sessions[i] = heap.Pop(top).(Session)
	}
	if q.Limit > 0 && len(page.Sessions) > q.Limit {
		page.Sessions = page.Sessions[:q.Limit]
		last := page.Sessions[q.Limit-1]
		page.NextCursor = cursor{byCost: true, score: last.Totals.CostNanos, id: last.ID}.String()
	}
	return page, nil
}

// costHeap is a min-heap in the cost order: its root is the session
// listed last (the cheapest; on a tie, the smallest id).
type costHeap []Session

func (h costHeap) Len() int { return len(h) }
func (h costHeap) Less(i, j int) bool {
	a, b := h[i], h[j]
	if a.Totals.CostNanos != b.Totals.CostNanos {
		return a.Totals.CostNanos < b.Totals.CostNanos
	}
	return a.ID < b.ID
}
func (h costHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *costHeap) Push(x any)   { *h = append(*h, x.(Session)) }
func (h *costHeap) Pop() any {
	old := *h
	s := old[len(old)-1]
	*h = old[:len(old)-1]
	return s
}

package tokens

import (
	"context"
	"math"
	"sync/atomic"
	"unicode"
	"unicode/utf8"
)

// Bounds on what counting costs. tiktoken's byte-pair merge is quadratic in
// the length of one piece of text (a "word" of the encoding's split
// pattern: a run of letters, of punctuation or of spaces), so a single
// 200 KB word costs minutes of CPU, and the encoder holds several times
// its input in memory (the text as runes, an index per piece).
const (
	// maxRun is the longest run of non-space bytes, or of space bytes,
	// handed to the encoder in one piece. Longer runs are cut there, as
	// Meta's Llama 3 tokenizer guards tiktoken (openai/tiktoken#195). A cut
	// can change the count by a token per maxRun bytes of such a run (2 %
	// of random letters), and a run cut this short costs what ordinary
	// text does.
	maxRun = 256
	// segmentBytes is about the most text handed to the encoder at once,
	// which bounds its memory. Text is cut before a space that begins a
	// word, where the split pattern cuts too, so the count is unchanged.
	segmentBytes = 16 << 10
	// defaultBytesPerToken estimates text that is not tokenized until the
	// meter has measured a rate of its own (on minRateBytes or more).
	defaultBytesPerToken = 4
	minRateBytes         = 4 << 10
)

// A Meter counts the tokens of one request's texts at a bounded cost: it
// tokenizes at most its limit in bytes of text, and estimates the rest from
// its size at the rate (tokens per byte) measured on what it tokenized (one
// token per 4 bytes before it has measured 4 KiB). Once its context is done
// it tokenizes nothing more, so an abandoned request stops costing CPU.
//
// Its methods count as Counter's do. They may be called from several
// goroutines; Cap may be called while a count runs, and takes effect
// within one segment of 16 KiB.
type Meter struct {
	ctx     context.Context
	enc     *bpe
	framing string // the encoding's name, for the tools' framing

	left      atomic.Int64 // bytes that may still be tokenized; < 0: no limit
	bytes     atomic.Int64 // bytes tokenized
	tokens    atomic.Int64 // tokens they gave
	estimated atomic.Bool
}

// Meter returns a meter for model's encoding that tokenizes at most limit
// bytes of text (a negative limit: no limit) while ctx is not done.
func (c *Counter) Meter(ctx context.Context, model string, limit int64) *Meter {
	m := &Meter{ctx: ctx, enc: c.encoder(model), framing: c.Encoding(model)}
	m.left.Store(limit)
	return m
}

// Cap lowers what the meter may still tokenize to at most n bytes.
func (m *Meter) Cap(n int64) {
	for {
		left := m.left.Load()
		if left >= 0 && left <= n {
			return
		}
		if m.left.CompareAndSwap(left, n) {
			return
		}
	}
}

// Estimated reports whether any count so far was estimated in part.
func (m *Meter) Estimated() bool { return m.estimated.Load() }

// Text returns the number of tokens in s, estimated in part past the
// meter's limit.
func (m *Meter) Text(s string) int {
	n, done := 0, 0
	for seg := range segments(s, segmentBytes, 2*segmentBytes) {
		if !m.take(len(seg)) {
			return n + m.estimate(len(s)-done) // the rest of s, estimated whole
		}
		t := m.enc.count(seg)
		m.bytes.Add(int64(len(seg)))
		m.tokens.Add(int64(t))
		n += t
		done += len(seg)
	}
	return n
}

// take reserves n bytes of tokenizing; false when the limit or the context
// says no.
func (m *Meter) take(n int) bool {
	if m.ctx.Err() != nil {
		return false
	}
	for {
		left := m.left.Load()
		if left < 0 {
			return true
		}
		if left < int64(n) {
			return false
		}
		if m.left.CompareAndSwap(left, left-int64(n)) {
			return true
		}
	}
}

// estimate returns the tokens of n bytes not tokenized.
func (m *Meter) estimate(n int) int {
	if n <= 0 {
		return 0
	}
	m.estimated.Store(true)
	b, t := m.bytes.Load(), m.tokens.Load()
	if b < minRateBytes {
		return (n + defaultBytesPerToken - 1) / defaultBytesPerToken
	}
	return int(math.Ceil(float64(n) * float64(t) / float64(b)))
}

// segments yields s in pieces of about size bytes, cut where tiktoken's
// split patterns cut as well (before a space followed by a non-space: the
// space begins the next word), so the pieces count exactly what s counts.
// Two cuts are not exact: a run of non-space or of space bytes is cut every
// maxRun bytes, and text with no space to cut at is cut at most bytes; both
// at a rune boundary.
func segments(s string, size, most int) func(yield func(string) bool) {
	return func(yield func(string) bool) {
		start, runStart := 0, 0
		runSpace := false
		for i := 0; i < len(s); {
			r, w := utf8.DecodeRuneInString(s[i:])
			if sp := unicode.IsSpace(r); i == 0 || sp != runSpace {
				runSpace, runStart = sp, i
			}
			if i > start && (i+w-runStart > maxRun || // a run too long for the merge
				i-start >= size && r == ' ' && beginsWord(s[i+1:]) ||
				i-start >= most) {
				if !yield(s[start:i]) {
					return
				}
				start, runStart = i, i
			}
			i += w
		}
		if start < len(s) {
			yield(s[start:])
		}
	}
}

// beginsWord reports whether s starts with a character that is not a
// space.
func beginsWord(s string) bool {
	r, _ := utf8.DecodeRuneInString(s)
	return len(s) > 0 && !unicode.IsSpace(r)
}

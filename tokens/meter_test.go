package tokens

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// words mixes what the split patterns treat differently: letters with
// contractions, capitals, digits, punctuation, spaces, tabs, newlines,
// CJK, accents and emoji.
var words = []string{"the", "The", "patient's", "WAS", "stable", "3", "1234567", ",", ".", "!?", "--", "\n", "\n\n", "\t",
	"  ", "   ", "naïve", "東京", "は", "😀", "(x)", "/usr/bin", "a.b.c", "don't", "I'll", "e=mc²", "\r\n", "...", "\"q\""}

func randomText(r *rand.Rand, n int) string {
	var b strings.Builder
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		if r.IntN(3) > 0 {
			b.WriteByte(' ')
		}
	}
	return b.String()
}

// TestSegmentsCountExactly: cutting text where segments cuts it changes no
// count, for every encoding, even with segments far smaller than the real
// ones; and the segments are the text, in order.
func TestSegmentsCountExactly(t *testing.T) {
	c := testCounter(t)
	r := rand.New(rand.NewPCG(1, 2))
	for _, model := range []string{"gpt-4o", "gpt-4", "text-davinci-003", "davinci"} {
		enc := c.encoder(model)
		for i := 0; i < 50; i++ {
			text := randomText(r, 50+r.IntN(3000))
			want := enc.count(text)
			got, n := 0, 0
			var joined strings.Builder
			for seg := range segments(text, 16+r.IntN(64), len(text)) {
				got += enc.count(seg)
				joined.WriteString(seg)
				n++
			}
			require.Equal(t, text, joined.String())
			require.Greater(t, n, 1, "cut at least once")
			require.Equal(t, want, got, "model %s, text %q", model, text)
		}
	}
}

// TestSegmentsBoundRuns: no segment holds a run of more than maxRun bytes
// of non-space, or of space, and none is cut inside a rune.
func TestSegmentsBoundRuns(t *testing.T) {
	cases := map[string]string{
		"one long word":   strings.Repeat("abcdefghij", 10000),
		"underscores":     strings.Repeat("_", 70000),
		"spaces":          strings.Repeat(" ", 70000),
		"newlines":        strings.Repeat("\n", 70000),
		"multibyte":       strings.Repeat("東", 30000),
		"words and a run": "hello there " + strings.Repeat("x", 5000) + " bye",
		"no spaces ever":  strings.Repeat("a\nb\n", 50000),
	}
	for name, text := range cases {
		t.Run(name, func(t *testing.T) {
			var joined strings.Builder
			for seg := range segments(text, segmentBytes, 2*segmentBytes) {
				require.True(t, utf8.ValidString(seg), "cut inside a rune")
				require.LessOrEqual(t, len(seg), 2*segmentBytes+utf8.UTFMax)
				require.LessOrEqual(t, longestRun(seg), maxRun)
				joined.WriteString(seg)
			}
			require.Equal(t, text, joined.String())
		})
	}
}

func longestRun(s string) int {
	longest, run, space := 0, 0, false
	for i, r := range s {
		if sp := unicode.IsSpace(r); i == 0 || sp != space {
			space, run = sp, 0
		}
		run += utf8.RuneLen(r)
		longest = max(longest, run)
	}
	return longest
}

// TestLongWordsCountCloseToExact: a long word cut into runs counts within
// 2 % of its exact count.
func TestLongWordsCountCloseToExact(t *testing.T) {
	c := testCounter(t)
	r := rand.New(rand.NewPCG(3, 4))
	var b strings.Builder
	for b.Len() < 8<<10 {
		b.WriteByte("abcdefghijklmnopqrstuvwxyz"[r.IntN(26)])
	}
	word := b.String()
	exact := c.encoder("gpt-4o").count(word)
	got := c.Text("gpt-4o", word)
	require.InDelta(t, exact, got, float64(exact)/50, "exact %d, got %d", exact, got)
}

// allocated returns the bytes f allocates.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestEncoderMemoryIsBounded: the encoder is never handed more than a
// segment, and counting allocates nothing for ordinary text whatever its
// size: the merge state of a word lives on the stack, only a piece of more
// than 63 bytes allocates its own (tiktoken-go allocated over 100 times
// the text's size: runes, a match and an index slice per piece).
func TestEncoderMemoryIsBounded(t *testing.T) {
	c := testCounter(t)
	enc := c.encoder("gpt-4o")
	text := randomText(rand.New(rand.NewPCG(5, 6)), 256<<10)
	for seg := range segments(text, segmentBytes, 2*segmentBytes) {
		require.LessOrEqual(t, len(seg), 2*segmentBytes)
	}
	require.Zero(t, testing.AllocsPerRun(3, func() { enc.count(text) }), "counting 256 KiB of words")
	long := strings.Repeat("x", maxRun)
	require.Less(t, allocated(func() { enc.count(long) }), uint64(32*maxRun), "a piece of %d bytes", maxRun)
}

// TestMeterLimit: past its limit a meter estimates from bytes at the rate
// it measured; it reports that it estimated.
func TestMeterLimit(t *testing.T) {
	c := testCounter(t)
	text := randomText(rand.New(rand.NewPCG(7, 8)), 256<<10)
	exact := c.Text("gpt-4o", text)
	m := c.Meter(context.Background(), "gpt-4o", 32<<10)
	got := m.Text(text)
	require.True(t, m.Estimated())
	require.LessOrEqual(t, m.bytes.Load(), int64(32<<10), "tokenized at most the limit")
	require.InDelta(t, exact, got, float64(exact)/10, "exact %d, estimated %d", exact, got)

	small := c.Meter(context.Background(), "gpt-4o", 64<<10)
	require.Equal(t, c.Text("gpt-4o", "hello world"), small.Text("hello world"))
	require.False(t, small.Estimated(), "within the limit: exact")
}

// TestMeterStopsWithItsContext: a meter whose context is done tokenizes
// nothing more; Cap lowers the limit of a meter in use.
func TestMeterStopsWithItsContext(t *testing.T) {
	c := testCounter(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	m := c.Meter(ctx, "gpt-4o", -1)
	text := strings.Repeat("word ", 1<<18)
	require.Equal(t, len(text)/defaultBytesPerToken, m.Text(text))
	require.Zero(t, m.bytes.Load())

	m = c.Meter(context.Background(), "gpt-4o", -1)
	m.Cap(segmentBytes)
	m.Text(text)
	require.LessOrEqual(t, m.bytes.Load(), int64(segmentBytes))
	require.True(t, m.Estimated())
}

// BenchmarkLongWord shows the cost of a single word growing linearly with
// its length: ns/op divided by the size stays flat (tiktoken's merge alone
// is quadratic: 64 KiB took seconds).
func BenchmarkLongWord(b *testing.B) {
	c := testCounter(b)
	for _, size := range []int{16 << 10, 64 << 10, 256 << 10} {
		word := strings.Repeat("abcdefghij", size/10)
		b.Run(byteSize(size), func(b *testing.B) {
			b.SetBytes(int64(len(word)))
			for b.Loop() {
				c.Text("gpt-4o", word)
			}
		})
	}
}

func byteSize(n int) string { return fmt.Sprintf("%dKiB", n>>10) }

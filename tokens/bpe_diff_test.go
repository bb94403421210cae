package tokens

import (
	"flag"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

var bpeFor = flag.Duration("bpe.for", 0, "run TestBPEMatchesTiktokenOnMixedText this long (go test ./tokens/ -run MixedText -args -bpe.for=5m)")

// mixedAtoms are pieces of text of the classes the split patterns tell
// apart, and their neighbours: contractions in every case and with look-
// alike apostrophes, marks of the three kinds, numbers of every kind,
// Unicode spaces and format characters, line and paragraph separators,
// scripts without case, emoji sequences with joiners and modifiers,
// invalid and overlong UTF-8, surrogates encoded in UTF-8.
var mixedAtoms = []string{
	"a", "A", "z", "Hello", "HELLO", "hello", "World", "x", "ǅ", "ǈ", "ʰ", "ʱ", "ª", "º", "µ", "ß", "ſ", "K", "İ", "ı", "Ω", "ω", "Σ", "ς",
	"'s", "'S", "'t", "'T", "'re", "'RE", "'Re", "'rE", "'ve", "'VE", "'m", "'M", "'ll", "'LL", "'lL", "'d", "'D", "'", "''", "’s", "‘", "`",
	"\u0301", "\u0308", "\u0903", "\u20dd", "\u0488", "e\u0301", "\u0E31", "\u064b",
	"0", "1", "12", "123", "1234", "١", "٢٣", "Ⅻ", "½", "²", "①", "𝟘", "٣٤٥٦",
	" ", "  ", "\t", "\n", "\r", "\r\n", "\n\n", "\u00a0", "\u2028", "\u2029", "\u3000", "\u2003", "\u0085", "\v", "\f", "\u200b", "\u200d", "\ufeff", "\u180e", "\u202f", "\u1680",
	"!", "?", ".", ",", "/", "//", "-", "_", "\"", "(", ")", "{", "}", "<|endoftext|>", "...", "!!\n", "?/\n", "#", "@", "$", "%", "^", "&", "*", "~", "\\",
	"中", "文", "日本", "語", "한", "국어", "각", "ᄀ", "ᅡ", "ㄱ", "ש", "לום", "ع", "ربية", "ا", "ह", "िन्दी", "ไ", "ทย", "ก่", "ᏞᏞ",
	"🙂", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "❤️", "🇫🇷", "\U0001F9D1\u200d\U0001F4BB", "©", "™",
	"\xff", "\xe2\x82", "\xc3", "\xed\xa0\x80", "\xef\xbf\xbd", "\xf4\x90\x80\x80", "\xc0\xaf", "\x00", "\x7f", "\x1b",
}

// mixedText is n atoms or words, with a random byte now and then; one
// text in seven is instead a long run of one kind of character (a piece
// longer than the merge's stack array).
func mixedText(r *rand.Rand, n int) string {
	var b strings.Builder
	if r.IntN(7) == 0 {
		kinds := []string{"abcdefghij", "ABCDEFGHIJ", "中日한각語文", "éßſΩω\u0301", "0123456789", "!?./-_(){}", " \t\n\u00a0\u3000"}
		rs := []rune(kinds[r.IntN(len(kinds))])
		for range 60 + r.IntN(300) {
			b.WriteRune(rs[r.IntN(len(rs))])
		}
		return b.String()
	}
	for range n {
		switch r.IntN(10) {
		case 0:
			b.WriteString(words[r.IntN(len(words))])
		case 1:
			b.WriteByte(byte(r.IntN(256)))
		default:
			b.WriteString(mixedAtoms[r.IntN(len(mixedAtoms))])
		}
	}
	return b.String()
}

// TestBPEMatchesTiktokenOnMixedText: every encoding gives tiktoken-go's
// tokens on texts mixed from mixedAtoms: 1,500 of them, or as many as
// -bpe.for allows (1.26 million agreed in 440 s when the proxy's BPE
// came in).
func TestBPEMatchesTiktokenOnMixedText(t *testing.T) {
	c := testCounter(t)
	seed := uint64(21) // the same texts in every run, unless run long
	if *bpeFor > 0 {
		seed = uint64(time.Now().UnixNano())
	}
	r := rand.New(rand.NewPCG(seed, 22))
	deadline := time.Now().Add(*bpeFor)
	for n := 0; n < 1500 || time.Now().Before(deadline); n++ {
		text := mixedText(r, 1+r.IntN(30))
		for _, name := range supportedEncodings {
			enc, err := c.encoders[name]()
			if err != nil {
				t.Fatal(err)
			}
			if want, got := reference(t, name).EncodeOrdinary(text), enc.encode(text); !slices.Equal(want, got) {
				t.Fatalf("%s: %q: tiktoken-go %v, bpe %v", name, text, want, got)
			}
		}
	}
}

package tokens

import (
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/pkoukk/tiktoken-go"
	tiktoken_loader "github.com/pkoukk/tiktoken-go-loader"
	"github.com/stretchr/testify/require"
)

// reference returns tiktoken-go's encoder of an encoding: the counts the
// package kept until it counted on its own (bpe.go), and what it must
// still give.
var reference = func() func(t testing.TB, name string) *tiktoken.Tiktoken {
	var mu sync.Mutex
	encs := map[string]*tiktoken.Tiktoken{}
	return func(t testing.TB, name string) *tiktoken.Tiktoken {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		if encs[name] == nil {
			tiktoken.SetBpeLoader(tiktoken_loader.NewOfflineLoader())
			enc, err := tiktoken.GetEncoding(name)
			require.NoError(t, err)
			encs[name] = enc
		}
		return encs[name]
	}
}()

// adversarial is text that walks the split patterns' corners: every class
// they name (upper, lower, title case, modifier and other letters, marks,
// numbers of every kind), contractions in any case and their look-alikes,
// runs of spaces, tabs, CR, LF, Unicode spaces before words and at the
// end, slashes after punctuation, invalid UTF-8.
var adversarial = []string{
	"", " ", "  ", "a", "A", "\n", "\r\n", " \n ", "\t\t", "x  ", "x  y", "x \t y", "x \n\n y",
	"Hello world", "HELLO World", "hello, WORLD!", "don't", "DON'T", "Don'T", "we'll", "WE'LL", "I'm", "I'M", "you're", "they've", "he'd", "it's",
	"'s", "'S", "''s", " 's", "'", "' ", "x'", "'ll've", "ǅemal", "ǈ", "ǋx", "ʰʰa", "ʰA", "ABCdef", "abcDEF", "aBcDeF",
	"e\u0301", "E\u0301\u0301x", "\u0301", "\u0301\u0301", " \u0301", "\u03011", "1\u0301", "é", "É", "Ω", "ω", "ſ", "K", "İstanbul",
	"12345", "1234567", "١٢٣٤", "Ⅻ", "½¾", "x123y", " 123", "123 456", "3.14159",
	"!!!", " !!!", "!!!\n\n", "?!/\n/", "a/b/c", "http://example.com/a?b=c#d", "<|endoftext|>", "<|endofprompt|>", "{\"a\": [1, 2]}",
	"\u00a0x", "\u2003\u2003word", "x\u3000", "\u200b", "\u0085x", "\v\fx", "  \r\n\r\n  x", "x\r", "x\r\r\n\n",
	"中文字符测试", "日本語のテキスト", "한국어 텍스트", "עברית", "العربية", "हिन्दी", "ไทย", "🙂🙂 emoji 👍🏽", "👨‍👩‍👧",
	"\xff", "a\xffb", "\xe2\x82", "x\xc3", "  \xff  ",
	strings.Repeat("a", 300), strings.Repeat(" ", 300), strings.Repeat("ab ", 100), strings.Repeat("é", 200), strings.Repeat("1", 50),
}

// runes to draw random text from: one or more of each class.
var alphabet = []rune("aAzZ \t\n\r'sStTrReEvVmMlLdD019/.,!?-_\"\u00a0\u2003\u3000\u0085\u0301\u0308ǅǈʰʱ中日한ÉéßſKİΩω١Ⅻ½🙂\u200b")

func randomRunes(r *rand.Rand, n int) string {
	var b strings.Builder
	for range n {
		b.WriteRune(alphabet[r.IntN(len(alphabet))])
	}
	return b.String()
}

// TestBPEMatchesTiktoken: every encoding gives tiktoken-go's tokens, on
// the adversarial texts, on random strings of the characters the patterns
// tell apart, and on ordinary words.
func TestBPEMatchesTiktoken(t *testing.T) {
	c := testCounter(t)
	r := rand.New(rand.NewPCG(11, 12))
	texts := slices.Clone(adversarial)
	for range 3000 {
		texts = append(texts, randomRunes(r, 1+r.IntN(40)))
	}
	for range 50 {
		texts = append(texts, randomText(r, 200+r.IntN(2000)))
	}
	for _, name := range supportedEncodings {
		t.Run(name, func(t *testing.T) {
			enc, err := c.encoders[name]()
			require.NoError(t, err)
			ref := reference(t, name)
			for _, text := range texts {
				want := ref.EncodeOrdinary(text)
				require.Equal(t, want, enc.encode(text), "%q", text)
				require.Equal(t, len(want), enc.count(text), "%q", text)
			}
		})
	}
}

// FuzzBPE: any text counts as tiktoken-go counts it, with every encoding
// (p50k_base and r50k_base too: their split pattern is another function).
// go test -fuzz FuzzBPE ./tokens/
func FuzzBPE(f *testing.F) {
	for _, s := range adversarial {
		f.Add(s)
	}
	c := testCounter(f)
	f.Fuzz(func(t *testing.T, text string) {
		if len(text) > 300 { // the merge is quadratic in tiktoken-go too
			return
		}
		for _, name := range supportedEncodings {
			enc, err := c.encoders[name]()
			require.NoError(t, err)
			want := reference(t, name).EncodeOrdinary(text)
			require.Equal(t, want, enc.encode(text), "%s: %q", name, text)
		}
	})
}

// TestBPEPieces: the split pieces are the text, in order, each a whole
// number of runes.
func TestBPEPieces(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 14))
	for _, split := range []splitFunc{splitO200k, splitCl100k, splitGPT2} {
		for range 500 {
			text := randomRunes(r, 1+r.IntN(60))
			var joined strings.Builder
			for i := 0; i < len(text); {
				end := split(text, i)
				require.Greater(t, end, i)
				require.True(t, utf8.ValidString(text[i:end]), "%q", text[i:end])
				joined.WriteString(text[i:end])
				i = end
			}
			require.Equal(t, text, joined.String())
		}
	}
}

// BenchmarkBPE counts the same text with tiktoken-go and with bpe, in one
// run: go test -run '^$' -bench BPE -benchmem ./tokens/
func BenchmarkBPE(b *testing.B) {
	c := testCounter(b)
	long := longText(b, c, 4000)
	for _, bc := range []struct{ name, text string }{{"typical", typicalUserMessage}, {"4000tokens", long}} {
		enc, ref := c.encoder("gpt-4o"), reference(b, O200kBase)
		b.Run(bc.name+"/tiktoken-go", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.text)))
			for b.Loop() {
				ref.EncodeOrdinary(bc.text)
			}
		})
		b.Run(bc.name+"/bpe", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.text)))
			for b.Loop() {
				enc.count(bc.text)
			}
		})
	}
}

// TestBPEHeap reports the heap an encoding's table holds once loaded,
// beside tiktoken-go's (go test -v -run TestBPEHeap ./tokens/), and holds
// o200k_base under 8 MB.
func TestBPEHeap(t *testing.T) {
	held := func(load func()) uint64 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		load()
		runtime.GC()
		runtime.ReadMemStats(&after)
		return after.HeapAlloc - before.HeapAlloc
	}
	var enc *bpe
	ours := held(func() {
		var err error
		enc, err = loadBPE(O200kBase, splitO200k)
		require.NoError(t, err)
	})
	var ref *tiktoken.Tiktoken
	theirs := held(func() {
		tiktoken.SetBpeLoader(tiktoken_loader.NewOfflineLoader())
		var err error
		ref, err = tiktoken.GetEncoding(O200kBase)
		require.NoError(t, err)
	})
	t.Logf("o200k_base holds %.1f MB of heap, tiktoken-go's %.1f MB", float64(ours)/(1<<20), float64(theirs)/(1<<20))
	require.Less(t, ours, uint64(8<<20))
	runtime.KeepAlive(enc)
	runtime.KeepAlive(ref)
}

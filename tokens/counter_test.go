package tokens

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// sharedCounter is built once for the whole test binary: building an
// encoder takes a noticeable fraction of a second, more under -race.
var sharedCounter = sync.OnceValues(func() (*Counter, error) { return New("") })

func testCounter(t testing.TB) *Counter {
	t.Helper()
	c, err := sharedCounter()
	require.NoError(t, err)
	return c
}

func TestNew(t *testing.T) {
	tests := []struct {
		name     string
		encoding string
		wantErr  bool
		want     string // encoding of an unknown model
	}{
		{name: "empty means o200k_base", encoding: "", want: O200kBase},
		{name: "cl100k_base", encoding: Cl100kBase, want: Cl100kBase},
		{name: "unknown encoding", encoding: "o300k_base", wantErr: true},
		{name: "case matters", encoding: "O200K_BASE", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.encoding == "" {
				// The shared counter is New(""): reuse it rather than
				// build o200k_base once more.
				if got := testCounter(t).Encoding("llama-3-70b"); got != tt.want {
					t.Errorf("Encoding(unknown) = %q, want %q", got, tt.want)
				}
				return
			}
			c, err := New(tt.encoding)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("New(%q): got no error, want one", tt.encoding)
				}
				if !strings.Contains(err.Error(), tt.encoding) {
					t.Errorf("New(%q) error %q does not name the encoding", tt.encoding, err)
				}
				return
			}
			require.NoError(t, err)
			if got := c.Encoding("llama-3-70b"); got != tt.want {
				t.Errorf("Encoding(unknown) = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestEncoding(t *testing.T) {
	c := testCounter(t)
	tests := []struct{ model, want string }{
		{"gpt-4o", O200kBase},
		{"gpt-4o-2024-08-06", O200kBase},
		{"gpt-4o-mini", O200kBase},
		{"gpt-4o-mini-2024-07-18", O200kBase},
		{"chatgpt-4o-latest", O200kBase},
		{"gpt-4.1", O200kBase},
		{"gpt-4.1-nano-2025-04-14", O200kBase},
		{"gpt-4.5-preview", O200kBase},
		{"gpt-5", O200kBase},
		{"gpt-5-mini-2025-08-07", O200kBase},
		{"gpt-5.1", O200kBase},
		{"o1", O200kBase},
		{"o1-mini", O200kBase},
		{"o3-mini-2025-01-31", O200kBase},
		{"o4-mini", O200kBase},
		{"gpt-4", Cl100kBase},
		{"gpt-4-0613", Cl100kBase},
		{"gpt-4-turbo-2024-04-09", Cl100kBase},
		{"gpt-4-32k", Cl100kBase},
		{"gpt-3.5-turbo", Cl100kBase},
		{"gpt-3.5-turbo-0125", Cl100kBase},
		{"gpt-35-turbo", Cl100kBase},
		{"text-embedding-3-small", Cl100kBase},
		{"text-embedding-ada-002", Cl100kBase},
		{"ft:gpt-4o-mini:my-org::abc123", O200kBase},
		{"ft:gpt-3.5-turbo-0125:my-org:custom:xyz", Cl100kBase},
		{"ft:gpt-4-0613:my-org::abc", Cl100kBase},
		{"llama-3-70b", O200kBase}, // unknown: the default
		{"", O200kBase},
	}
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			if got := c.Encoding(tt.model); got != tt.want {
				t.Errorf("Encoding(%q) = %q, want %q", tt.model, got, tt.want)
			}
		})
	}
}

func TestBaseModel(t *testing.T) {
	tests := []struct{ model, want string }{
		{"ft:gpt-4o-mini:org::id", "gpt-4o-mini"},
		{"ft:gpt-4o-mini-2024-07-18:org:suffix:id", "gpt-4o-mini-2024-07-18"},
		{"ft:gpt-4o", "gpt-4o"},
		{"gpt-4o", "gpt-4o"},
		{"gpt-4o:odd", "gpt-4o:odd"},
	}
	for _, tt := range tests {
		if got := baseModel(tt.model); got != tt.want {
			t.Errorf("baseModel(%q) = %q, want %q", tt.model, got, tt.want)
		}
	}
}

// TestTextReferenceVectors checks counts and token ids published in the
// OpenAI cookbook, "How to count tokens with tiktoken"
// (examples/How_to_count_tokens_with_tiktoken.ipynb, sections 3 and 5,
// "Comparing encodings"). The cl100k_base ids of "tiktoken is great!" are
// from the notebook's earlier revision, which used cl100k_base in section 3.
func TestTextReferenceVectors(t *testing.T) {
	c := testCounter(t)
	tests := []struct {
		name  string
		model string
		text  string
		ids   []int
	}{
		{"tiktoken is great/o200k", "gpt-4o-mini", "tiktoken is great!", []int{83, 8251, 2488, 382, 2212, 0}},
		{"tiktoken is great/cl100k", "gpt-4", "tiktoken is great!", []int{83, 1609, 5963, 374, 2294, 0}},
		{"antidisestablishmentarianism/o200k", "gpt-4o", "antidisestablishmentarianism", []int{493, 129901, 376, 160388, 21203, 2367}},
		{"antidisestablishmentarianism/cl100k", "gpt-3.5-turbo", "antidisestablishmentarianism", []int{519, 85342, 34500, 479, 8997, 2191}},
		{"2 + 2 = 4/o200k", "gpt-4o", "2 + 2 = 4", []int{17, 659, 220, 17, 314, 220, 19}},
		{"2 + 2 = 4/cl100k", "gpt-4", "2 + 2 = 4", []int{17, 489, 220, 17, 284, 220, 19}},
		{"お誕生日おめでとう/o200k", "gpt-4o", "お誕生日おめでとう", []int{8930, 9697, 243, 128225, 8930, 17693, 4344, 48669}},
		{"お誕生日おめでとう/cl100k", "gpt-4", "お誕生日おめでとう", []int{33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := c.Text(tt.model, tt.text); got != len(tt.ids) {
				t.Errorf("Text(%q, %q) = %d, want %d", tt.model, tt.text, got, len(tt.ids))
			}
			if got := c.encoder(tt.model).encode(tt.text); !slices.Equal(got, tt.ids) {
				t.Errorf("encode %q with %s: got %v, want %v", tt.text, c.Encoding(tt.model), got, tt.ids)
			}
		})
	}
}

func TestTextEdgeCases(t *testing.T) {
	c := testCounter(t)
	if got := c.Text("gpt-4o", ""); got != 0 {
		t.Errorf("Text(empty) = %d, want 0", got)
	}
	// A user may type a special token's text; it must count as ordinary
	// text (several tokens) rather than panic or count as the single
	// special token.
	for _, model := range []string{"gpt-4o", "gpt-4"} {
		if got := c.Text(model, "<|endoftext|>"); got < 2 {
			t.Errorf("Text(%s, <|endoftext|>) = %d, want the ordinary text's several tokens", model, got)
		}
	}
}

// TestConcurrentCounting counts from many goroutines on a fresh Counter, so
// that the lazy building of the second encoding races with counting; run
// it with -race.
func TestConcurrentCounting(t *testing.T) {
	c, err := New("")
	require.NoError(t, err)
	ref := testCounter(t)
	texts := []string{
		"tiktoken is great!",
		"お誕生日おめでとう",
		strings.Repeat("The quick brown fox jumps over the lazy dog. ", 20),
	}
	models := []string{"gpt-4o", "gpt-4", "gpt-3.5-turbo-0125", "o3-mini"}
	want := map[string]int{}
	for _, m := range models {
		for _, s := range texts {
			want[m+"\x00"+s] = ref.Text(m, s)
		}
	}

	const goroutines = 16
	var wg sync.WaitGroup
	errs := make(chan string, goroutines*len(models)*len(texts))
	for g := range goroutines {
		wg.Go(func() {
			for i := range len(models) * len(texts) {
				m, s := models[(g+i)%len(models)], texts[i%len(texts)]
				if got := c.Text(m, s); got != want[m+"\x00"+s] {
					errs <- fmt.Sprintf("Text(%s, %.20q) = %d, want %d", m, s, got, want[m+"\x00"+s])
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

// typicalUserMessage is a new user turn of one or two sentences.
const typicalUserMessage = "Can you summarise the main differences between the two proposals we discussed yesterday? Keep it under five bullet points, please."

// longText returns English prose of about n tokens under o200k_base.
func longText(tb testing.TB, c *Counter, n int) string {
	tb.Helper()
	const para = "Distributed systems fail in partial and surprising ways: a request may time out " +
		"after the server has already committed its write, a retry may arrive twice, and a clock " +
		"may jump backwards by several seconds. Engineers respond with idempotency keys, fencing " +
		"tokens, and careful timeouts, measuring latency at the 99th percentile rather than the mean. "
	var b strings.Builder
	for i := 0; c.Text("gpt-4o", b.String()) < n; i++ {
		fmt.Fprintf(&b, "Section %d. %s", i+1, para)
	}
	return b.String()
}

func BenchmarkText(b *testing.B) {
	c := testCounter(b)
	long := longText(b, c, 4000)
	for _, bc := range []struct{ name, model, text string }{
		{"typical/o200k", "gpt-4o", typicalUserMessage},
		{"typical/cl100k", "gpt-4", typicalUserMessage},
		{"4000tokens/o200k", "gpt-4o", long},
		{"4000tokens/cl100k", "gpt-4", long},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.text)))
			for b.Loop() {
				c.Text(bc.model, bc.text)
			}
		})
	}
}

func BenchmarkMessage(b *testing.B) {
	c := testCounter(b)
	m := Message{Role: "user", Content: typicalUserMessage}
	b.ReportAllocs()
	for b.Loop() {
		c.Message("gpt-4o", m)
	}
}

package tokens

import (
	"unicode"
	"unicode/utf8"
)

// splitFunc returns the end of the piece of s that starts at i (i <
// len(s)): where the encoding's split pattern ends the match found there.
//
// tiktoken splits text with a regular expression before it merges bytes
// (the patterns are quoted above each function). These functions are
// those expressions written out, with the backtracking engine's answers:
// the alternatives are tried in order, quantifiers are greedy and give
// back one character at a time, and the first way that matches wins.
// tiktoken-go ran them through regexp2, a backtracking engine, at about a
// tenth of the proxy's CPU. \s is unicode.IsSpace, \p{..} the unicode
// package's categories, as in regexp2. TestBPEMatchesTiktoken holds them
// to tiktoken-go's results.
type splitFunc func(s string, i int) int

// Character classes of the patterns, as bits.
const (
	cLu    = 1 << iota // \p{Lu}
	cLl                // \p{Ll}
	cLt                // \p{Lt}
	cLm                // \p{Lm}
	cLo                // \p{Lo}
	cM                 // \p{M}
	cN                 // \p{N}
	cSpace             // \s
	cCRLF              // \r or \n

	cL     = cLu | cLl | cLt | cLm | cLo
	cUpper = cLu | cLt | cLm | cLo | cM // o200k's [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
	cLower = cLl | cLm | cLo | cM       // o200k's [\p{Ll}\p{Lm}\p{Lo}\p{M}]
)

// latin1 holds the classes of the first 256 code points, most text's.
var latin1 = func() (t [256]uint16) {
	for r := range t {
		t[r] = classify(rune(r))
	}
	return t
}()

// categories are the classes that are Unicode categories.
var categories = [...]struct {
	t   *unicode.RangeTable
	bit uint16
}{{unicode.Lu, cLu}, {unicode.Ll, cLl}, {unicode.Lt, cLt}, {unicode.Lm, cLm}, {unicode.Lo, cLo}, {unicode.M, cM}, {unicode.N, cN}}

func classify(r rune) uint16 {
	var c uint16
	for _, x := range categories {
		if unicode.Is(x.t, r) {
			c |= x.bit
		}
	}
	if unicode.IsSpace(r) {
		c |= cSpace
	}
	if r == '\r' || r == '\n' {
		c |= cCRLF
	}
	return c
}

// classAt returns the classes of the rune at i and its width; 0, 0 at the
// end of s.
func classAt(s string, i int) (uint16, int) {
	if i >= len(s) {
		return 0, 0
	}
	if s[i] < utf8.RuneSelf {
		return latin1[s[i]], 1
	}
	r, w := utf8.DecodeRuneInString(s[i:])
	if r < 256 {
		return latin1[r], w
	}
	return classify(r), w
}

// is reports whether the rune at i has a class of mask (false at the end).
func is(s string, i int, mask uint16) bool {
	c, w := classAt(s, i)
	return w > 0 && c&mask != 0
}

// isNot reports whether there is a rune at i without any class of mask:
// [^...] of the patterns.
func isNot(s string, i int, mask uint16) bool {
	c, w := classAt(s, i)
	return w > 0 && c&mask == 0
}

// width is the width of the rune at i (0 at the end).
func width(s string, i int) int {
	_, w := classAt(s, i)
	return w
}

// run returns the end of the run of runes of a class of mask from i.
func run(s string, i int, mask uint16) int {
	for is(s, i, mask) {
		i += width(s, i)
	}
	return i
}

// runNot returns the end of the run of runes of no class of mask from i.
func runNot(s string, i int, mask uint16) int {
	for isNot(s, i, mask) {
		i += width(s, i)
	}
	return i
}

// numbers returns the end of \p{N}{1,3} at i (i when there is none).
func numbers(s string, i int) int {
	for range 3 {
		if !is(s, i, cN) {
			break
		}
		i += width(s, i)
	}
	return i
}

// contraction returns the end of 's|'t|'re|'ve|'m|'ll|'d at i, in any
// case with fold (regexp2's (?i) compares unicode.ToLower of each
// character), or i when there is none.
func contraction(s string, i int, fold bool) int {
	if i >= len(s) || s[i] != '\'' {
		return i
	}
	for _, c := range [...]string{"s", "t", "re", "ve", "m", "ll", "d"} {
		j, ok := i+1, true
		for k := 0; k < len(c) && ok; k++ {
			r, w := utf8.DecodeRuneInString(s[j:])
			if fold {
				r = unicode.ToLower(r)
			}
			ok = w > 0 && r == rune(c[k])
			j += w
		}
		if ok {
			return j
		}
	}
	return i
}

// spaces returns where the alternatives on white space end a piece at
// i, in their order: \s*[\r\n]+ (cl100k and o200k only: newlines),
// \s+(?!\S), \s+. ok is false when there is no space at i.
func spaces(s string, i int, newlines bool) (end int, ok bool) {
	end = run(s, i, cSpace)
	if end == i {
		return i, false
	}
	last, lastNL := i, -1 // the run's last rune, and its last newline
	for j := i; j < end; j += width(s, j) {
		last = j
		if is(s, j, cCRLF) {
			lastNL = j
		}
	}
	switch {
	case newlines && lastNL >= 0:
		// \s* gives back until a newline follows: the run's last one.
		return lastNL + 1, true
	case end == len(s):
		return end, true
	case last > i:
		// (?!\S): the run gives back its last space, before the word
		// that follows, which takes it.
		return last, true
	}
	return end, true // \s+
}

// punctuation returns the end of " ?[^\s\p{L}\p{N}]+" at i, or i.
func punctuation(s string, i int) int {
	j := i
	if j < len(s) && s[j] == ' ' && isNot(s, j+1, cSpace|cL|cN) {
		j++
	}
	if end := runNot(s, j, cSpace|cL|cN); end > j {
		return end
	}
	return i
}

// newlines returns the end of [\r\n]* at i, or of [\r\n/]* with slash.
func newlines(s string, i int, slash bool) int {
	for i < len(s) && (s[i] == '\r' || s[i] == '\n' || slash && s[i] == '/') {
		i++
	}
	return i
}

// splitO200k is o200k_base's pattern:
//
//	[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//	|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//	|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
func splitO200k(s string, i int) int {
	// The optional first character, taken first, then not.
	starts := [2]int{-1, i}
	if isNot(s, i, cCRLF|cL|cN) {
		starts[0] = i + width(s, i)
	}
	for _, j := range starts { // upper* lower+
		if j < 0 {
			continue
		}
		// upper* gives back until a lower can start: the last one of
		// the run, or the rune after it.
		upper, k := run(s, j, cUpper), -1
		for p := j; p < upper; p += width(s, p) {
			if is(s, p, cLower) {
				k = p
			}
		}
		if is(s, upper, cLower) {
			k = upper
		}
		if k >= 0 {
			return contraction(s, run(s, k, cLower), true)
		}
	}
	for _, j := range starts { // upper+ lower*
		if j < 0 {
			continue
		}
		if upper := run(s, j, cUpper); upper > j {
			return contraction(s, run(s, upper, cLower), true)
		}
	}
	if end := numbers(s, i); end > i {
		return end
	}
	if end := punctuation(s, i); end > i {
		return newlines(s, end, true)
	}
	if end, ok := spaces(s, i, true); ok {
		return end
	}
	return i + width(s, i) // nothing matches (cannot happen): one rune
}

// splitCl100k is cl100k_base's pattern:
//
//	(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
func splitCl100k(s string, i int) int {
	if end := contraction(s, i, true); end > i {
		return end
	}
	if isNot(s, i, cCRLF|cL|cN) && is(s, i+width(s, i), cL) {
		return run(s, i+width(s, i), cL)
	}
	if end := run(s, i, cL); end > i {
		return end
	}
	if end := numbers(s, i); end > i {
		return end
	}
	if end := punctuation(s, i); end > i {
		return newlines(s, end, false)
	}
	if end, ok := spaces(s, i, true); ok {
		return end
	}
	return i + width(s, i) // nothing matches (cannot happen): one rune
}

// splitGPT2 is the pattern of r50k_base and p50k_base:
//
//	's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
func splitGPT2(s string, i int) int {
	if end := contraction(s, i, false); end > i {
		return end
	}
	j := i
	if s[i] == ' ' {
		j++
	}
	for _, class := range []uint16{cL, cN} {
		if end := run(s, j, class); end > j {
			return end
		}
		if end := run(s, i, class); end > i {
			return end
		}
	}
	if end := punctuation(s, i); end > i {
		return end
	}
	if end, ok := spaces(s, i, false); ok {
		return end
	}
	return i + width(s, i) // nothing matches (cannot happen): one rune
}

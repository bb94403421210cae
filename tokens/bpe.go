package tokens

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"hash/maphash"
	"math"
	"math/bits"
	"strconv"
	"unicode/utf8"

	"github.com/pkoukk/tiktoken-go-loader/assets"
)

// bpe is one of tiktoken's byte-pair encodings, held to count tokens: the
// bytes of every token back to back in one string, and an open-addressing
// table from a token's bytes to its rank. Apart from that one string it
// holds no pointers, so the garbage collector never scans it.
//
// It replaces tiktoken-go, which kept each encoding as an encoder map, a
// decoder map and a sorted copy of every token (for o200k_base about 45
// MB, the proxy's largest memory at rest and a large part of every
// collection's marking), and split text with a backtracking regular
// expression engine. o200k_base takes about 5 MB here. The counts are
// tiktoken's: TestBPEMatchesTiktoken compares the tokens with
// tiktoken-go's on random and adversarial text.
type bpe struct {
	name  string
	split splitFunc // the encoding's split pattern, see split.go
	bytes string    // the tokens' bytes, back to back
	ends  []uint32  // token k is bytes[ends[k-1]:ends[k]] (ends[-1] is 0)
	ranks []uint32  // token k's rank
	slots []uint32  // by hash of a token's bytes: k+1, or 0 for none
	seed  maphash.Seed
}

// noRank is the rank of a byte sequence that is not a token.
const noRank = math.MaxUint32

// loadBPE reads an encoding's table from the tables tiktoken-go-loader
// embeds in the binary ("<name>.tiktoken": one token a line, its bytes in
// base64 and its rank).
func loadBPE(name string, split splitFunc) (*bpe, error) {
	f, err := assets.Assets.Open(name + ".tiktoken")
	if err != nil {
		return nil, fmt.Errorf("load encoding %s: %w", name, err)
	}
	defer f.Close()
	b := &bpe{name: name, split: split, seed: maphash.MakeSeed()}
	var buf []byte
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		tok, rank, ok := bytes.Cut(sc.Bytes(), []byte(" "))
		r, err := strconv.ParseUint(string(rank), 10, 32)
		if !ok || err != nil || r == noRank {
			return nil, fmt.Errorf("load encoding %s: line %d: want a token in base64 and its rank", name, line)
		}
		if buf, err = base64.StdEncoding.AppendDecode(buf, tok); err != nil {
			return nil, fmt.Errorf("load encoding %s: line %d: %w", name, line, err)
		}
		b.ends = append(b.ends, uint32(len(buf)))
		b.ranks = append(b.ranks, uint32(r))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("load encoding %s: %w", name, err)
	}
	b.bytes = string(buf)
	// At most half full, so that a miss (most lookups of the merge) ends
	// after a probe or two.
	b.slots = make([]uint32, 1<<bits.Len(uint(2*len(b.ends))))
	mask := uint64(len(b.slots) - 1)
	for k := range b.ends {
		i := maphash.String(b.seed, b.token(k)) & mask
		for b.slots[i] != 0 {
			i = (i + 1) & mask
		}
		b.slots[i] = uint32(k + 1)
	}
	return b, nil
}

// token returns the bytes of token k.
func (b *bpe) token(k int) string {
	start := uint32(0)
	if k > 0 {
		start = b.ends[k-1]
	}
	return b.bytes[start:b.ends[k]]
}

// rank returns the rank of the token whose bytes are s, or noRank.
func (b *bpe) rank(s string) uint32 {
	mask := uint64(len(b.slots) - 1)
	for i := maphash.String(b.seed, s) & mask; ; i = (i + 1) & mask {
		k := b.slots[i]
		if k == 0 {
			return noRank
		}
		if b.token(int(k-1)) == s {
			return b.ranks[k-1]
		}
	}
}

// count returns the number of tokens of text, special tokens counted as
// ordinary text (tiktoken's encode_ordinary).
func (b *bpe) count(text string) int {
	n := 0
	b.pieces(text, func(piece string) { n += b.pieceTokens(piece, nil) })
	return n
}

// encode returns the tokens of text, as count counts them.
func (b *bpe) encode(text string) []int {
	out := []int{}
	b.pieces(text, func(piece string) { b.pieceTokens(piece, &out) })
	return out
}

// pieces hands f each piece of text the encoding's split pattern cuts.
// tiktoken splits text decoded into runes, so each byte of invalid UTF-8
// counts as U+FFFD, as it does there.
func (b *bpe) pieces(text string, f func(string)) {
	if !utf8.ValidString(text) {
		text = string([]rune(text))
	}
	for i := 0; i < len(text); {
		end := b.split(text, i)
		f(text[i:end])
		i = end
	}
}

// part is a piece's byte from which a token starts, and the rank of the
// pair of tokens that starts there (noRank when it is no token).
type part struct {
	start int
	rank  uint32
}

// pieceTokens returns the number of tokens of one piece, appending them to
// out when it is not nil. It is tiktoken's byte_pair_merge: adjacent
// tokens are merged, the pair of the lowest rank first, until no pair is
// a token. Quadratic in the piece's length, which the Meter bounds.
func (b *bpe) pieceTokens(piece string, out *[]int) int {
	if r := b.rank(piece); r != noRank {
		if out != nil {
			*out = append(*out, int(r))
		}
		return 1
	}
	var buf [64]part // most pieces are words: no allocation for them
	parts := buf[:0]
	if len(piece) >= len(buf) {
		parts = make([]part, 0, len(piece)+1)
	}
	minRank, minAt := uint32(noRank), -1
	for i := 0; i < len(piece)-1; i++ {
		r := b.rank(piece[i : i+2])
		if r < minRank {
			minRank, minAt = r, i
		}
		parts = append(parts, part{i, r})
	}
	parts = append(parts, part{len(piece) - 1, noRank}, part{len(piece), noRank})
	// The rank of the token that parts i, i+1 and i+2 would make.
	merged := func(i int) uint32 {
		if i+3 < len(parts) {
			return b.rank(piece[parts[i].start:parts[i+3].start])
		}
		return noRank
	}
	for minRank != noRank {
		i := minAt
		if i > 0 {
			parts[i-1].rank = merged(i - 1)
		}
		parts[i].rank = merged(i)
		parts = append(parts[:i+1], parts[i+2:]...)
		minRank, minAt = noRank, -1
		for j, p := range parts[:len(parts)-1] {
			if p.rank < minRank {
				minRank, minAt = p.rank, j
			}
		}
	}
	if out != nil {
		for j := range len(parts) - 1 {
			*out = append(*out, int(b.rank(piece[parts[j].start:parts[j+1].start])))
		}
	}
	return len(parts) - 1
}

// Package tokens counts the tokens of chat requests the way OpenAI's models
// see them, and prices token usage.
//
// Counting uses tiktoken's byte-pair encodings, loaded from tables embedded
// in the binary: the proxy never downloads an encoding. Model names resolve
// to an encoding by prefix, so any member of a family is counted with its
// family's encoding, and to a price only by name, a snapshot date stripped
// ("gpt-4o-2024-08-06" is gpt-4o; see Catalog.Lookup), since a similar name
// may cost many times more. The package knows nothing of HTTP or of where
// conversations are stored.
package tokens

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Encoding names accepted by New.
const (
	O200kBase  = "o200k_base"
	Cl100kBase = "cl100k_base"
	P50kBase   = "p50k_base"
	R50kBase   = "r50k_base"
)

// supportedEncodings are the encodings whose tables the offline loader
// embeds.
var supportedEncodings = []string{O200kBase, Cl100kBase, P50kBase, R50kBase}

// encodingPrefixes maps model-name prefixes to encodings; the longest
// matching prefix wins, so "gpt-4o-mini" is o200k_base although "gpt-4" is
// cl100k_base. Matching is a plain prefix so that later versions of a
// family ("gpt-5.1", "o3-pro") keep their family's encoding. Sources:
// tiktoken's model.py and the OpenAI cookbook's "How to count tokens with
// tiktoken".
var encodingPrefixes = []struct{ prefix, encoding string }{
	{"gpt-5", O200kBase},
	{"gpt-4.5", O200kBase},
	{"gpt-4.1", O200kBase},
	{"gpt-4o", O200kBase},
	{"chatgpt-4o", O200kBase},
	{"o1", O200kBase},
	{"o3", O200kBase},
	{"o4", O200kBase},
	{"gpt-4", Cl100kBase},
	{"gpt-3.5-turbo", Cl100kBase},
	{"gpt-35-turbo", Cl100kBase}, // Azure's spelling
	{"text-embedding-3", Cl100kBase},
	{"text-embedding-ada-002", Cl100kBase},
}

// splits are the encodings' split patterns (split.go).
var splits = map[string]splitFunc{O200kBase: splitO200k, Cl100kBase: splitCl100k, P50kBase: splitGPT2, R50kBase: splitGPT2}

// Counter counts tokens for any model. It is safe for concurrent use; build
// one with New and share it. The zero Counter is not usable.
type Counter struct {
	defaultEncoding string
	// encoders holds one lazily built encoder per supported encoding. The
	// map is filled in New and only read afterwards.
	encoders map[string]func() (*bpe, error)
}

// New returns a Counter that uses defaultEncoding for models it does not
// recognise ("" means o200k_base, the encoding of every current OpenAI
// model). It fails for an encoding it does not know. The default encoding is
// loaded at once (about 0.1 s, 5 MB for o200k_base), the others on first
// use.
func New(defaultEncoding string) (*Counter, error) {
	if defaultEncoding == "" {
		defaultEncoding = O200kBase
	}
	if !slices.Contains(supportedEncodings, defaultEncoding) {
		return nil, fmt.Errorf("new token counter: unknown encoding %q (known: %s)",
			defaultEncoding, strings.Join(supportedEncodings, ", "))
	}
	c := &Counter{
		defaultEncoding: defaultEncoding,
		encoders:        make(map[string]func() (*bpe, error), len(supportedEncodings)),
	}
	for _, name := range supportedEncodings {
		c.encoders[name] = sync.OnceValues(func() (*bpe, error) { return loadBPE(name, splits[name]) })
	}
	if _, err := c.encoders[defaultEncoding](); err != nil {
		return nil, fmt.Errorf("new token counter: %w", err)
	}
	return c, nil
}

// Encoding returns the name of the encoding used for model: the encoding of
// the longest known prefix of the model (or of the base model of a
// fine-tune), else the Counter's default.
func (c *Counter) Encoding(model string) string {
	model = baseModel(model)
	best, enc := 0, c.defaultEncoding
	for _, e := range encodingPrefixes {
		if len(e.prefix) > best && strings.HasPrefix(model, e.prefix) {
			best, enc = len(e.prefix), e.encoding
		}
	}
	return enc
}

// Text returns the number of tokens in s for model. Special-token text such
// as "<|endoftext|>" counts as ordinary text, as it does when sent to the
// API. Runs of more than 256 bytes without a space (or of spaces only) are
// counted in pieces of 256 bytes, which bounds the cost of the encoder's
// merge (quadratic in a word's length) and may add a token per piece; use
// a Meter to bound the cost of counting a whole request.
func (c *Counter) Text(model, s string) int {
	return c.unbounded(model).Text(s)
}

// unbounded is a meter with no limit, for the Counter's own methods.
func (c *Counter) unbounded(model string) *Meter {
	return c.Meter(context.Background(), model, -1)
}

// encoder returns the encoder for model. Should a non-default encoding fail
// to load (its table is compiled in, so only a broken build could do that),
// the default encoder, loaded in New, stands in: an approximate count beats
// none.
func (c *Counter) encoder(model string) *bpe {
	if enc, err := c.encoders[c.Encoding(model)](); err == nil {
		return enc
	}
	enc, _ := c.encoders[c.defaultEncoding]()
	return enc
}

// baseModel returns the model a fine-tune was trained from
// ("ft:gpt-4o-mini:org::id" gives "gpt-4o-mini"), or model itself.
func baseModel(model string) string {
	rest, ok := strings.CutPrefix(model, "ft:")
	if !ok {
		return model
	}
	base, _, _ := strings.Cut(rest, ":")
	return base
}

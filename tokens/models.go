package tokens

import (
	"cmp"
	"math"
	"slices"
	"strings"
)

// Model is what the proxy knows of a model: its context window and its
// prices in USD per one million tokens.
type Model struct {
	ContextWindow int // tokens; 0 means unknown
	Input         float64
	// CachedInput is the price of prompt tokens served from OpenAI's prompt
	// cache. 0 means the model has no cached-input price, and cached tokens
	// are billed at Input.
	CachedInput float64
	Output      float64
}

// builtinModels are OpenAI's standard-tier list prices, in USD per 1M
// tokens, as given by LiteLLM's model_prices_and_context_window.json (which
// tracks platform.openai.com/docs/pricing) in its 2025-2026 snapshots and
// agreeing with OpenAI's announced prices; prices change, so operators
// override them through NewCatalog. Besides the main families, the table lists the variants whose
// price differs from the family a prefix would give them (o1-mini, o1-pro,
// gpt-4o-2024-05-13, gpt-4-32k, ...) and the fine-tuned models' inference
// prices, which are higher than their base models'.
var builtinModels = map[string]Model{
	"gpt-5":              {ContextWindow: 400_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5-mini":         {ContextWindow: 400_000, Input: 0.25, CachedInput: 0.025, Output: 2},
	"gpt-5-nano":         {ContextWindow: 400_000, Input: 0.05, CachedInput: 0.005, Output: 0.40},
	"gpt-5-pro":          {ContextWindow: 400_000, Input: 15, Output: 120},
	"gpt-5.1":            {ContextWindow: 400_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5.1-codex-mini": {ContextWindow: 400_000, Input: 0.25, CachedInput: 0.025, Output: 2},
	"gpt-5.2":            {ContextWindow: 400_000, Input: 1.75, CachedInput: 0.175, Output: 14},

	"gpt-4.1":      {ContextWindow: 1_047_576, Input: 2, CachedInput: 0.50, Output: 8},
	"gpt-4.1-mini": {ContextWindow: 1_047_576, Input: 0.40, CachedInput: 0.10, Output: 1.60},
	"gpt-4.1-nano": {ContextWindow: 1_047_576, Input: 0.10, CachedInput: 0.025, Output: 0.40},

	"gpt-4o":            {ContextWindow: 128_000, Input: 2.50, CachedInput: 1.25, Output: 10},
	"gpt-4o-2024-05-13": {ContextWindow: 128_000, Input: 5, Output: 15},
	"gpt-4o-mini":       {ContextWindow: 128_000, Input: 0.15, CachedInput: 0.075, Output: 0.60},
	"chatgpt-4o-latest": {ContextWindow: 128_000, Input: 5, Output: 15},

	"o1":                    {ContextWindow: 200_000, Input: 15, CachedInput: 7.50, Output: 60},
	"o1-mini":               {ContextWindow: 128_000, Input: 1.10, CachedInput: 0.55, Output: 4.40},
	"o1-pro":                {ContextWindow: 200_000, Input: 150, Output: 600},
	"o3":                    {ContextWindow: 200_000, Input: 2, CachedInput: 0.50, Output: 8},
	"o3-mini":               {ContextWindow: 200_000, Input: 1.10, CachedInput: 0.55, Output: 4.40},
	"o3-pro":                {ContextWindow: 200_000, Input: 20, Output: 80},
	"o3-deep-research":      {ContextWindow: 200_000, Input: 10, CachedInput: 2.50, Output: 40},
	"o4-mini":               {ContextWindow: 200_000, Input: 1.10, CachedInput: 0.275, Output: 4.40},
	"o4-mini-deep-research": {ContextWindow: 200_000, Input: 2, CachedInput: 0.50, Output: 8},

	"gpt-4-turbo":         {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-turbo-preview": {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-1106-preview":  {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-0125-preview":  {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4":               {ContextWindow: 8_192, Input: 30, Output: 60},
	"gpt-4-32k":           {ContextWindow: 32_768, Input: 60, Output: 120},
	"gpt-3.5-turbo":       {ContextWindow: 16_385, Input: 0.50, Output: 1.50},

	// Fine-tuned models, by base model.
	"ft:gpt-4.1":       {ContextWindow: 1_047_576, Input: 3, CachedInput: 0.75, Output: 12},
	"ft:gpt-4.1-mini":  {ContextWindow: 1_047_576, Input: 0.80, CachedInput: 0.20, Output: 3.20},
	"ft:gpt-4.1-nano":  {ContextWindow: 1_047_576, Input: 0.20, CachedInput: 0.05, Output: 0.80},
	"ft:gpt-4o":        {ContextWindow: 128_000, Input: 3.75, CachedInput: 1.875, Output: 15},
	"ft:gpt-4o-mini":   {ContextWindow: 128_000, Input: 0.30, CachedInput: 0.15, Output: 1.20},
	"ft:o4-mini":       {ContextWindow: 200_000, Input: 4, CachedInput: 1, Output: 16},
	"ft:gpt-3.5-turbo": {ContextWindow: 16_385, Input: 3, Output: 6},
}

// Catalog is a table of models with their prices. It is read-only after
// NewCatalog and safe for concurrent use. The zero Catalog knows no model.
type Catalog struct {
	// names are the table's names, longest first, so that the first
	// matching name is the longest.
	names  []string
	models map[string]Model
	// nanos holds each model's prices in nano-USD per token, converted once.
	nanos map[string]nanoPrices
}

type nanoPrices struct{ input, cached, output int64 }

// NewCatalog returns a catalog of the built-in models, with extra's entries
// added; an entry of extra whose name is built in replaces that entry whole.
func NewCatalog(extra map[string]Model) *Catalog {
	c := &Catalog{
		models: make(map[string]Model, len(builtinModels)+len(extra)),
		nanos:  make(map[string]nanoPrices, len(builtinModels)+len(extra)),
	}
	for name, m := range builtinModels {
		c.models[name] = m
	}
	for name, m := range extra {
		c.models[name] = m
	}
	for name, m := range c.models {
		c.names = append(c.names, name)
		p := nanoPrices{input: toNanos(m.Input), cached: toNanos(m.CachedInput), output: toNanos(m.Output)}
		if m.CachedInput == 0 {
			p.cached = p.input
		}
		c.nanos[name] = p
	}
	slices.SortFunc(c.names, func(a, b string) int {
		return cmp.Or(cmp.Compare(len(b), len(a)), cmp.Compare(a, b))
	})
	return c
}

// toNanos converts a price in USD per 1M tokens to nano-USD per token.
func toNanos(usdPerMillion float64) int64 {
	return int64(math.Round(usdPerMillion * 1000))
}

// resolve returns the catalog name that prices model: the longest name that
// is model itself or a prefix of it followed by '-' or ':' (so a dated
// snapshot finds its family, but "gpt-5.2" does not take gpt-5's price),
// else, for a fine-tune with no fine-tune entry, what its base model
// resolves to.
func (c *Catalog) resolve(model string) (string, bool) {
	for _, name := range c.names {
		if matchesName(model, name) {
			return name, true
		}
	}
	if base := baseModel(model); base != model {
		return c.resolve(base)
	}
	return "", false
}

func matchesName(model, name string) bool {
	if !strings.HasPrefix(model, name) {
		return false
	}
	if len(model) == len(name) {
		return true
	}
	next := model[len(name)]
	return next == '-' || next == ':'
}

// Lookup returns the entry for model, found as described on Cost, and
// whether there is one.
func (c *Catalog) Lookup(model string) (Model, bool) {
	name, ok := c.resolve(model)
	if !ok {
		return Model{}, false
	}
	return c.models[name], true
}

// Usage is the token usage of one request, with OpenAI's semantics: Cached
// is the part of Prompt served from the prompt cache, Reasoning the part of
// Completion spent on reasoning. Estimated marks counts the proxy computed
// itself because the upstream reported none.
type Usage struct {
	Prompt, Completion, Cached, Reasoning int64
	Estimated                             bool
}

// Cost returns what u cost on model in nano-USD (10^-9 USD), and whether
// the model has a price (false: cost 0). The model is found as described on
// Lookup.
//
// Uncached prompt tokens are billed at the input price, cached ones at the
// cached-input price, completion tokens (reasoning included) at the output
// price. The arithmetic is exact, in integers: a price in USD per 1M tokens
// with at most three decimals is a whole number of nano-USD per token (USD
// per 1M × 1000), so a request's cost is a whole number of nano-USD and
// totals added from it never round (an int64 of nano-USD holds 9.2 × 10^9
// USD). Negative counts count as 0, and Cached above Prompt as Prompt.
func (c *Catalog) Cost(model string, u Usage) (nanos int64, priced bool) {
	name, ok := c.resolve(model)
	if !ok {
		return 0, false
	}
	p := c.nanos[name]
	prompt := max(u.Prompt, 0)
	cached := min(max(u.Cached, 0), prompt)
	completion := max(u.Completion, 0)
	return (prompt-cached)*p.input + cached*p.cached + completion*p.output, true
}

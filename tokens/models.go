package tokens

import (
	"math"
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
// tokens. Prices change: operators override them through NewCatalog (the
// config's models:). The README says when and against what the table was
// last checked.
//
// Besides each family, the table names every snapshot or alias whose price
// differs from what the fallback rule (see Lookup) would give it
// (gpt-4o-2024-05-13, gpt-3.5-turbo-1106, ...) and every alias that the rule
// does not reach (gpt-5-chat-latest, gpt-4-vision-preview, ...), and the
// fine-tuned models' inference prices, which are higher than their base
// models'. ContextWindow 0 means the window was not confirmed; then only an
// agent's max_tokens bounds the history.
//
// Requests whose prompt passes a long-context threshold are priced higher
// by OpenAI on some models (gpt-5.4 and later); the table holds the
// standard rate only.
var builtinModels = map[string]Model{
	"gpt-5.5":     {ContextWindow: 0, Input: 5, CachedInput: 0.50, Output: 30},
	"gpt-5.5-pro": {ContextWindow: 0, Input: 30, Output: 180},

	"gpt-5.4":      {ContextWindow: 1_050_000, Input: 2.50, CachedInput: 0.25, Output: 15},
	"gpt-5.4-mini": {ContextWindow: 0, Input: 0.75, CachedInput: 0.075, Output: 4.50},
	"gpt-5.4-nano": {ContextWindow: 0, Input: 0.20, CachedInput: 0.02, Output: 1.25},
	"gpt-5.4-pro":  {ContextWindow: 1_050_000, Input: 30, Output: 180},

	"gpt-5.3-codex": {ContextWindow: 0, Input: 1.75, CachedInput: 0.175, Output: 14},

	"gpt-5.2":             {ContextWindow: 400_000, Input: 1.75, CachedInput: 0.175, Output: 14},
	"gpt-5.2-chat-latest": {ContextWindow: 128_000, Input: 1.75, CachedInput: 0.175, Output: 14},
	"gpt-5.2-codex":       {ContextWindow: 400_000, Input: 1.75, CachedInput: 0.175, Output: 14},
	"gpt-5.2-pro":         {ContextWindow: 400_000, Input: 21, Output: 168},

	"gpt-5.1":             {ContextWindow: 400_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5.1-chat-latest": {ContextWindow: 128_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5.1-codex":       {ContextWindow: 400_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5.1-codex-max":   {ContextWindow: 400_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5.1-codex-mini":  {ContextWindow: 400_000, Input: 0.25, CachedInput: 0.025, Output: 2},

	"gpt-5":             {ContextWindow: 400_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5-chat-latest": {ContextWindow: 128_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5-codex":       {ContextWindow: 400_000, Input: 1.25, CachedInput: 0.125, Output: 10},
	"gpt-5-mini":        {ContextWindow: 400_000, Input: 0.25, CachedInput: 0.025, Output: 2},
	"gpt-5-nano":        {ContextWindow: 400_000, Input: 0.05, CachedInput: 0.005, Output: 0.40},
	"gpt-5-pro":         {ContextWindow: 400_000, Input: 15, Output: 120},

	"gpt-4.5-preview": {ContextWindow: 128_000, Input: 75, CachedInput: 37.50, Output: 150},

	"gpt-4.1":      {ContextWindow: 1_047_576, Input: 2, CachedInput: 0.50, Output: 8},
	"gpt-4.1-mini": {ContextWindow: 1_047_576, Input: 0.40, CachedInput: 0.10, Output: 1.60},
	"gpt-4.1-nano": {ContextWindow: 1_047_576, Input: 0.10, CachedInput: 0.025, Output: 0.40},

	"gpt-4o":            {ContextWindow: 128_000, Input: 2.50, CachedInput: 1.25, Output: 10},
	"gpt-4o-2024-05-13": {ContextWindow: 128_000, Input: 5, Output: 15},
	"gpt-4o-mini":       {ContextWindow: 128_000, Input: 0.15, CachedInput: 0.075, Output: 0.60},
	"chatgpt-4o-latest": {ContextWindow: 128_000, Input: 5, Output: 15},

	"o1":                    {ContextWindow: 200_000, Input: 15, CachedInput: 7.50, Output: 60},
	"o1-preview":            {ContextWindow: 128_000, Input: 15, CachedInput: 7.50, Output: 60},
	"o1-mini":               {ContextWindow: 128_000, Input: 1.10, CachedInput: 0.55, Output: 4.40},
	"o1-pro":                {ContextWindow: 200_000, Input: 150, Output: 600},
	"o3":                    {ContextWindow: 200_000, Input: 2, CachedInput: 0.50, Output: 8},
	"o3-mini":               {ContextWindow: 200_000, Input: 1.10, CachedInput: 0.55, Output: 4.40},
	"o3-pro":                {ContextWindow: 200_000, Input: 20, Output: 80},
	"o3-deep-research":      {ContextWindow: 200_000, Input: 10, CachedInput: 2.50, Output: 40},
	"o4-mini":               {ContextWindow: 200_000, Input: 1.10, CachedInput: 0.275, Output: 4.40},
	"o4-mini-deep-research": {ContextWindow: 200_000, Input: 2, CachedInput: 0.50, Output: 8},
	"codex-mini-latest":     {ContextWindow: 200_000, Input: 1.50, CachedInput: 0.375, Output: 6},

	"gpt-4-turbo":               {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-turbo-preview":       {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-1106-preview":        {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-0125-preview":        {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-vision-preview":      {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4-1106-vision-preview": {ContextWindow: 128_000, Input: 10, Output: 30},
	"gpt-4":                     {ContextWindow: 8_192, Input: 30, Output: 60},
	"gpt-4-32k":                 {ContextWindow: 32_768, Input: 60, Output: 120},
	"gpt-3.5-turbo":             {ContextWindow: 16_385, Input: 0.50, Output: 1.50},
	"gpt-3.5-turbo-1106":        {ContextWindow: 16_385, Input: 1, Output: 2},
	"gpt-3.5-turbo-0613":        {ContextWindow: 4_096, Input: 1.50, Output: 2},
	"gpt-3.5-turbo-0301":        {ContextWindow: 4_096, Input: 1.50, Output: 2},
	"gpt-3.5-turbo-16k":         {ContextWindow: 16_385, Input: 3, Output: 4},
	"gpt-3.5-turbo-instruct":    {ContextWindow: 4_096, Input: 1.50, Output: 2},

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
	models map[string]Model
	// nanos holds each model's prices in nano-USD per token, converted once.
	nanos map[string]nanoPrices
}

type nanoPrices struct{ input, cached, output int64 }

// PriceDecimals is how many decimals a price in USD per 1M tokens may have:
// with three, every price is a whole number of nano-USD per token, so costs
// are exact. The config refuses finer prices at start-up.
const PriceDecimals = 3

// NewCatalog returns a catalog of the built-in models, with extra's entries
// added; an entry of extra whose name is built in replaces that entry whole.
// An entry prices its model even with every price 0 (a local model that
// costs nothing). Prices with more than PriceDecimals decimals are rounded
// to the nearest nano-USD per token; callers validate them first.
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
		p := nanoPrices{input: toNanos(m.Input), cached: toNanos(m.CachedInput), output: toNanos(m.Output)}
		if m.CachedInput == 0 {
			p.cached = p.input
		}
		c.nanos[name] = p
	}
	return c
}

// toNanos converts a price in USD per 1M tokens to nano-USD per token.
func toNanos(usdPerMillion float64) int64 {
	return int64(math.Round(usdPerMillion * 1000))
}

// resolve returns the catalog name that prices model. A model falls back
// only across what cannot change its price: a date suffix, and the
// organisation, suffix and id of a fine-tune. Anything else (a "-pro", a
// "-16k", a newer version, another vendor's name) is not priced until the
// table or the config names it, since a guess from a similar name can be
// off many times over (gpt-5.2-pro costs 12 times gpt-5.2).
func (c *Catalog) resolve(model string) (string, bool) {
	if _, ok := c.models[model]; ok {
		// Named as it is, a fine-tune too: the config may price one
		// fine-tune apart from the others of its base.
		return model, true
	}
	if base, ok := strings.CutPrefix(model, "ft:"); ok {
		// ft:<base>[:org[:suffix[:id]]]: priced as a fine-tune of base. A
		// base with no fine-tune price is not priced as the base model,
		// since fine-tuned inference costs more.
		base, _, _ = strings.Cut(base, ":")
		model = "ft:" + base
	}
	if _, ok := c.models[model]; ok {
		return model, true
	}
	if undated, ok := cutDate(model); ok {
		if _, ok := c.models[undated]; ok {
			return undated, true
		}
	}
	return "", false
}

// cutDate strips a snapshot date from the end of model: -YYYY-MM-DD
// ("gpt-4o-2024-08-06") or -MMDD ("gpt-3.5-turbo-0125"). ok is false when
// model has none.
func cutDate(model string) (string, bool) {
	for _, layout := range []string{"-dddd-dd-dd", "-dddd"} {
		n := len(model) - len(layout)
		if n > 0 && matchesLayout(model[n:], layout) {
			return model[:n], true
		}
	}
	return model, false
}

// matchesLayout reports whether s has layout's shape, 'd' standing for a
// digit and any other byte for itself.
func matchesLayout(s, layout string) bool {
	for i := range len(layout) {
		if layout[i] == 'd' {
			if s[i] < '0' || s[i] > '9' {
				return false
			}
		} else if s[i] != layout[i] {
			return false
		}
	}
	return true
}

// Lookup returns the entry for model and whether there is one. A model is
// found by its own name (a fine-tune's whole name included); else without a snapshot date at its end
// ("gpt-4o-2024-08-06" is gpt-4o, "gpt-3.5-turbo-0125" is gpt-3.5-turbo, but
// a snapshot priced apart, such as gpt-3.5-turbo-1106, is named in the
// table); a fine-tune ("ft:gpt-4o-mini-2024-07-18:org:name:id") is found as
// ft: and its base model, the base's date stripped the same way. Nothing
// else falls back: "gpt-5.2-pro" is not gpt-5.2, and "ft:gpt-5-mini" with no
// fine-tune price is not gpt-5-mini.
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

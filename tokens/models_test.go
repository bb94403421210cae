package tokens

import (
	"math"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestCatalogLookup(t *testing.T) {
	c := NewCatalog(nil)
	tests := []struct {
		model  string
		want   string // the built-in entry it should resolve to; "" for none
		wantOK bool
	}{
		{"gpt-4o", "gpt-4o", true},
		{"gpt-4o-2024-08-06", "gpt-4o", true},
		{"gpt-4o-2024-05-13", "gpt-4o-2024-05-13", true}, // a snapshot priced apart
		{"gpt-4o-mini", "gpt-4o-mini", true},
		{"gpt-4o-mini-2024-07-18", "gpt-4o-mini", true},
		{"gpt-4.1-nano-2025-04-14", "gpt-4.1-nano", true},
		{"gpt-5-chat-latest", "gpt-5-chat-latest", true},
		{"gpt-5-mini-2025-08-07", "gpt-5-mini", true},
		{"gpt-5.2-2025-12-11", "gpt-5.2", true},
		{"o1-mini-2024-09-12", "o1-mini", true},
		{"o3-mini-2025-01-31", "o3-mini", true},
		{"o3-2025-04-16", "o3", true},
		{"gpt-4-0613", "gpt-4", true},
		{"gpt-4-32k-0613", "gpt-4-32k", true},
		{"gpt-4-turbo-2024-04-09", "gpt-4-turbo", true},
		{"gpt-3.5-turbo-0125", "gpt-3.5-turbo", true},
		{"gpt-3.5-turbo-16k-0613", "gpt-3.5-turbo-16k", true},
		// Snapshots and variants priced apart from their family.
		{"gpt-3.5-turbo-1106", "gpt-3.5-turbo-1106", true},
		{"gpt-3.5-turbo-16k", "gpt-3.5-turbo-16k", true},
		{"gpt-4-vision-preview", "gpt-4-vision-preview", true},
		{"gpt-5.2-pro", "gpt-5.2-pro", true},
		{"gpt-5.2-pro-2025-12-11", "gpt-5.2-pro", true},
		{"ft:gpt-4o-mini:my-org::abc123", "ft:gpt-4o-mini", true},
		{"ft:gpt-4o-mini-2024-07-18:my-org:suffix:abc123", "ft:gpt-4o-mini", true},
		{"ft:gpt-4o-2024-08-06:my-org::abc123", "ft:gpt-4o", true},
		{"ft:gpt-3.5-turbo-0125:my-org::abc123", "ft:gpt-3.5-turbo", true},
		// Nothing else falls back to a similar name.
		{"ft:gpt-5-mini:my-org::abc123", "", false}, // no fine-tune price; the base model's would be too low
		{"gpt-5.9", "", false},                      // a new version does not take gpt-5's price
		{"gpt-5.2-mini", "", false},
		{"gpt-4o-mini-search-preview", "", false},
		{"gpt-4o-audio-preview", "", false},
		{"gpt-4-0613-preview", "", false},
		{"gpt-4ox", "", false},
		{"gpt-4o-", "", false},
		{"-0613", "", false},
		{"llama-3-70b", "", false},
		{"ft:", "", false},
		{"", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.model, func(t *testing.T) {
			got, ok := c.Lookup(tt.model)
			if ok != tt.wantOK {
				t.Fatalf("Lookup(%q): got ok %v, want %v", tt.model, ok, tt.wantOK)
			}
			if want := builtinModels[tt.want]; got != want {
				t.Errorf("Lookup(%q) = %+v, want %s's %+v", tt.model, got, tt.want, want)
			}
		})
	}
}

// TestUnpricedVariantsAreNotBilledAsTheirFamily holds the cases that a
// prefix fallback billed at their family's price, counted as priced.
func TestUnpricedVariantsAreNotBilledAsTheirFamily(t *testing.T) {
	c := NewCatalog(nil)
	u := Usage{Prompt: 1_000_000, Completion: 1_000_000}
	for _, tc := range []struct {
		model     string
		wantNanos int64 // 0 with wantOK false: unpriced
		wantOK    bool
	}{
		{"gpt-5.2-pro", (21 + 168) * 1e9, true},         // not gpt-5.2's 1.75 + 14
		{"gpt-3.5-turbo-1106", (1 + 2) * 1e9, true},     // not gpt-3.5-turbo's 0.50 + 1.50
		{"gpt-3.5-turbo-16k", (3 + 4) * 1e9, true},      // not gpt-3.5-turbo's
		{"gpt-4-vision-preview", (10 + 30) * 1e9, true}, // not gpt-4's 30 + 60
		{"gpt-5.2-ultra", 0, false},
		{"gpt-4o-realtime-preview", 0, false},
	} {
		t.Run(tc.model, func(t *testing.T) {
			nanos, ok := c.Cost(tc.model, u)
			if nanos != tc.wantNanos || ok != tc.wantOK {
				t.Errorf("Cost(%s, 1M in + 1M out) = %d, %v; want %d, %v", tc.model, nanos, ok, tc.wantNanos, tc.wantOK)
			}
		})
	}
}

func TestBuiltinModels(t *testing.T) {
	for _, name := range []string{
		"gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano",
		"gpt-5", "gpt-5-mini", "gpt-5-nano", "o1", "o3", "o3-mini", "o4-mini",
		"gpt-4-turbo", "gpt-4", "gpt-3.5-turbo",
	} {
		m, ok := builtinModels[name]
		if !ok {
			t.Errorf("built-in table lacks %s", name)
			continue
		}
		if m.ContextWindow <= 0 || m.Input <= 0 || m.Output <= 0 {
			t.Errorf("%s: got %+v, want a context window and input and output prices", name, m)
		}
	}
	for name, m := range builtinModels {
		if m.CachedInput > m.Input {
			t.Errorf("%s: cached input %v costs more than input %v", name, m.CachedInput, m.Input)
		}
		// Every price must be a whole number of nano-USD per token, or Cost
		// would round it.
		for _, p := range []float64{m.Input, m.CachedInput, m.Output} {
			if s := strconv.FormatFloat(p, 'f', -1, 64); strings.Contains(s, ".") && len(s)-strings.Index(s, ".")-1 > PriceDecimals {
				t.Errorf("%s: price %s has more than %d decimals", name, s, PriceDecimals)
			}
		}
	}
}

func TestCost(t *testing.T) {
	c := NewCatalog(map[string]Model{
		// Prices chosen so each term is easy to check by hand.
		"test-model": {Input: 2, CachedInput: 0.5, Output: 8},
		// 0.15 USD per 1M is 0.15 micro-USD per token: fractions of a
		// micro-USD per token.
		"test-cheap": {Input: 0.15, CachedInput: 0.075, Output: 0.6},
		// No cached price: cached tokens are billed at the input price.
		"test-nocache": {Input: 10, Output: 30},
		"test-free":    {},
		// A fine-tune is priced under ft: and its base model.
		"ft:test-model": {Input: 2, Output: 8},
		// An override replaces the whole built-in entry.
		"gpt-4o": {ContextWindow: 1000, Input: 1, Output: 1},
	})
	tests := []struct {
		name       string
		model      string
		usage      Usage
		wantNanos  int64
		wantPriced bool
	}{
		{
			name:       "input and output",
			model:      "test-model",
			usage:      Usage{Prompt: 1000, Completion: 500},
			wantNanos:  (1000*2 + 500*8) * 1000, // USD per 1M = micro-USD per token
			wantPriced: true,
		},
		{
			name:       "cached tokens are part of the prompt",
			model:      "test-model",
			usage:      Usage{Prompt: 1000, Cached: 400, Completion: 10},
			wantNanos:  (600*2 + 400/2 + 10*8) * 1000,
			wantPriced: true,
		},
		{
			name:       "reasoning tokens are part of the completion",
			model:      "test-model",
			usage:      Usage{Prompt: 10, Completion: 100, Reasoning: 80},
			wantNanos:  (10*2 + 100*8) * 1000,
			wantPriced: true,
		},
		{
			name:       "fractions of a micro-USD are kept",
			model:      "test-cheap",
			usage:      Usage{Prompt: 3}, // 0.45 micro-USD
			wantNanos:  450,
			wantPriced: true,
		},
		{
			name:       "a 10-token gpt-5-nano request costs half a micro-USD",
			model:      "gpt-5-nano",
			usage:      Usage{Prompt: 10}, // $0.05 per 1M
			wantNanos:  500,
			wantPriced: true,
		},
		{
			name:       "fractions add exactly",
			model:      "test-cheap",
			usage:      Usage{Prompt: 7, Cached: 4, Completion: 1}, // 0.45 + 0.3 + 0.6 = 1.35 micro-USD
			wantNanos:  1350,
			wantPriced: true,
		},
		{
			name:       "no cached price bills cached tokens at input",
			model:      "test-nocache",
			usage:      Usage{Prompt: 100, Cached: 100},
			wantNanos:  100 * 10 * 1000,
			wantPriced: true,
		},
		{
			name:       "zero usage",
			model:      "test-model",
			usage:      Usage{},
			wantNanos:  0,
			wantPriced: true,
		},
		{
			name:       "a free model is priced",
			model:      "test-free",
			usage:      Usage{Prompt: 100, Completion: 100},
			wantNanos:  0,
			wantPriced: true,
		},
		{
			name:       "unknown model",
			model:      "llama-3-70b",
			usage:      Usage{Prompt: 1000, Completion: 1000},
			wantNanos:  0,
			wantPriced: false,
		},
		{
			name:       "override replaces the built-in price",
			model:      "gpt-4o-2024-08-06",
			usage:      Usage{Prompt: 100, Cached: 50, Completion: 100},
			wantNanos:  (100 + 100) * 1000, // no cached price in the override: input price
			wantPriced: true,
		},
		{
			name:       "built-ins stay beside the extras",
			model:      "gpt-4o-mini-2024-07-18",
			usage:      Usage{Prompt: 1_000_000, Cached: 200_000, Completion: 1_000_000},
			wantNanos:  (800_000*0.15 + 200_000*0.075 + 1_000_000*0.6) * 1000, // 120,000 + 15,000 + 600,000 micro-USD
			wantPriced: true,
		},
		{
			name:       "fine-tune of an extra model takes its fine-tune price",
			model:      "ft:test-model:my-org::abc",
			usage:      Usage{Prompt: 1, Completion: 1},
			wantNanos:  (2 + 8) * 1000,
			wantPriced: true,
		},
		{
			name:       "negative counts count as zero",
			model:      "test-model",
			usage:      Usage{Prompt: -5, Cached: -1, Completion: -3},
			wantNanos:  0,
			wantPriced: true,
		},
		{
			name:       "cached above prompt is capped",
			model:      "test-model",
			usage:      Usage{Prompt: 100, Cached: 150},
			wantNanos:  100 / 2 * 1000,
			wantPriced: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nanos, priced := c.Cost(tt.model, tt.usage)
			if nanos != tt.wantNanos || priced != tt.wantPriced {
				t.Errorf("Cost(%s, %+v) = %d, %v; want %d, %v",
					tt.model, tt.usage, nanos, priced, tt.wantNanos, tt.wantPriced)
			}
		})
	}
}

// TestCostPublishedPrices prices one million tokens of each kind on a few
// built-in models; one million tokens cost the list price in USD, that is
// the price × 10^9 nano-USD.
func TestCostPublishedPrices(t *testing.T) {
	c := NewCatalog(nil)
	for _, model := range []string{"gpt-4o", "gpt-4.1-nano", "gpt-5-nano", "o4-mini", "gpt-4"} {
		m := builtinModels[model]
		cached := m.CachedInput
		if cached == 0 {
			cached = m.Input
		}
		for _, tc := range []struct {
			kind  string
			usage Usage
			usd   float64
		}{
			{"input", Usage{Prompt: 1_000_000}, m.Input},
			{"cached", Usage{Prompt: 1_000_000, Cached: 1_000_000}, cached},
			{"output", Usage{Completion: 1_000_000}, m.Output},
		} {
			nanos, priced := c.Cost(model, tc.usage)
			assert.True(t, priced, "%s priced", model)
			assert.Equal(t, int64(math.Round(tc.usd*1e9)), nanos, "%s: cost of 1M %s tokens", model, tc.kind)
		}
	}
}

func TestNewCatalogDoesNotAliasBuiltins(t *testing.T) {
	NewCatalog(map[string]Model{"gpt-4o": {Input: 99}})
	got, _ := NewCatalog(nil).Lookup("gpt-4o")
	if got.Input == 99 {
		t.Errorf("an override leaked into a later catalog: got %+v", got)
	}
}

// TestConfiguredFineTuneByItsFullName: a fine-tune that the config names in
// full ("unpriced until the table or the config names it") takes that
// price. The lookup cut the organisation and id off before it looked, so a
// config entry for one fine-tune was never read: the model stayed at its
// base's fine-tune price, or unpriced when the base has none.
func TestConfiguredFineTuneByItsFullName(t *testing.T) {
	const (
		ownPriced = "ft:gpt-4o-mini-2024-07-18:acme:support:abc123" // ft:gpt-4o-mini is built in
		noBase    = "ft:gpt-5-mini-2025-08-07:acme::def456"         // no fine-tune price for gpt-5-mini
	)
	c := NewCatalog(map[string]Model{
		ownPriced: {ContextWindow: 64_000, Input: 7, Output: 9},
		noBase:    {Input: 0.5, CachedInput: 0.05, Output: 4},
	})
	u := Usage{Prompt: 1_000_000, Completion: 1_000_000}
	for _, tc := range []struct {
		model     string
		wantNanos int64
		wantWin   int
	}{
		{ownPriced, (7 + 9) * 1e9, 64_000},
		{noBase, (0.5 + 4) * 1e9, 0},
		// Another fine-tune of the same base still falls back to ft:gpt-4o-mini.
		{"ft:gpt-4o-mini-2024-07-18:acme:other:xyz", (0.30 + 1.20) * 1e9, 128_000},
	} {
		t.Run(tc.model, func(t *testing.T) {
			nanos, ok := c.Cost(tc.model, u)
			if !ok || nanos != tc.wantNanos {
				t.Errorf("Cost(%s, 1M in + 1M out) = %d, %v; want %d, true", tc.model, nanos, ok, tc.wantNanos)
			}
			m, ok := c.Lookup(tc.model)
			if !ok || m.ContextWindow != tc.wantWin {
				t.Errorf("Lookup(%s) = %+v, %v; want context window %d", tc.model, m, ok, tc.wantWin)
			}
		})
	}
}

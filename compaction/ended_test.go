package compaction

import (
	"context"
	"fmt"
	"net/url"
	"testing"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/tokens"
	"github.com/historyproxy/historyproxy/upstream"
)

// TestEndedConversationIsNotCompactedInTheBackground: queued work that
// runs after its conversation ended (reset, or a newer one began while
// the job waited for its retry) made a billed call for a summary nothing
// would inject: only the current conversation's window is read. It was
// also written after the newer conversation's start, where retention's
// trim of the ended one does not reach it. On demand it still runs.
func TestEndedConversationIsNotCompactedInTheBackground(t *testing.T) {
	ctx := context.Background()
	counter, err := tokens.New("o200k_base")
	if err != nil {
		t.Fatal(err)
	}
	up := fakeai.New(t)
	u, err := url.Parse(up.URL)
	if err != nil {
		t.Fatal(err)
	}
	store := history.NewMemory()
	const session = "web:ann:support"
	for i := range 6 {
		_, err := store.Append(ctx, session, history.Turn{NowMs: int64(1000 + i), Messages: []history.Message{
			{Role: history.RoleUser, Content: fmt.Sprintf("q%d", i), Tokens: 5, Model: "gpt-4o-mini"},
			{Role: history.RoleAssistant, Content: fmt.Sprintf("a%d", i), Tokens: 5, Model: "gpt-4o-mini"},
		}}, history.Policy{})
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := store.Reset(ctx, session); err != nil {
		t.Fatal(err)
	}
	w := New(Options{Store: store, Upstream: upstream.New(upstream.Options{URL: u}), Counter: counter, Catalog: tokens.NewCatalog(nil),
		Settings: func(string) Settings {
			return Settings{Enabled: true, TriggerMessages: 10, TargetMessages: 6, KeepRecentTurns: 2, MaxSummaryTokens: 100}
		}})
	turn := Turn{Session: session, Agent: "support", Conversation: "c1", Model: "gpt-4o-mini", Auth: "Bearer sk-x", Unsummarized: 12}
	res, err := w.compact(ctx, turn, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Compacted || len(up.Requests()) != 0 {
		t.Fatalf("background compaction of an ended conversation: compacted %v, %d upstream calls; want none", res.Compacted, len(up.Requests()))
	}
	if res, err = w.Compact(ctx, session, "c1", "Bearer sk-x"); err != nil || !res.Compacted {
		t.Fatalf("on demand: got %+v, %v; want compacted", res, err)
	}
}

package compaction

import (
	"context"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/tokens"
)

// TestGoneSessionIsNotRetried: work queued for a session that is gone by
// the time it runs (erased, or its conversation expired) has nothing to
// retry: the job ends. It was retried with backoff, six times, each a
// store read, as if the store had failed.
func TestGoneSessionIsNotRetried(t *testing.T) {
	counter, err := tokens.New("o200k_base")
	if err != nil {
		t.Fatal(err)
	}
	settings := func(string) Settings {
		return Settings{Enabled: true, TriggerMessages: 10, TargetMessages: 6, KeepRecentTurns: 2, MaxSummaryTokens: 100, Titles: true}
	}
	for _, tc := range []struct {
		name string
		turn Turn
	}{
		{"compaction", Turn{Session: "web:gone:support", Agent: "support", Conversation: "c1", Model: "m", Unsummarized: 60}},
		{"title", Turn{Session: "web:gone:support", Agent: "support", Conversation: "c1", Model: "m", Unsummarized: 2, NewConversation: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := New(Options{Store: history.NewMemory(), Upstream: blockCaller{}, Counter: counter, Catalog: tokens.NewCatalog(nil),
				Settings: settings, Backoff: time.Hour})
			w.Recorded(tc.turn)
			if w.Pending() != 1 {
				t.Fatalf("queued: got %d, want 1", w.Pending())
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); w.Run(ctx) }()
			defer func() { cancel(); <-done }()
			for deadline := time.Now().Add(10 * time.Second); w.Pending() != 0; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the job for a session that does not exist is still queued (retried as a failure)")
				}
			}
		})
	}
}

package history

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// compactor is what compaction needs of a store; both stores are one.
type compactor interface {
	store
	TakeCompaction(ctx context.Context, session string, ttl time.Duration) (string, error)
	ReleaseCompaction(ctx context.Context, session, token string) error
	Compaction(ctx context.Context, session, conv string, limit int) (CompactionInput, bool, error)
	StoreSummary(ctx context.Context, session, token string, w SummaryWrite) (Message, error)
	AddUsage(ctx context.Context, session string, u Usage) error
	StoreTitle(ctx context.Context, session, conv, title string, onlyUnset bool, u Usage) (string, bool, error)
}

var (
	_ compactor = (*MemoryStore)(nil)
	_ compactor = (*RedisStore)(nil)
)

// testSummaryConformance runs the compaction behaviour every store must
// have.
func testSummaryConformance(t *testing.T, newFixture func(t *testing.T) fixture) {
	ctx := context.Background()
	// six turns, then a summary of the first four.
	setup := func(t *testing.T) (compactor, []string, Message) {
		t.Helper()
		s := newFixture(t).store.(compactor)
		var ids []string
		for i := range 6 {
			res := appendQA(t, s, session, i, t0+int64(i), Policy{})
			if want := int64(2 * (i + 1)); res.Unsummarized != want {
				t.Fatalf("turn %d: Unsummarized %d, want %d", i, res.Unsummarized, want)
			}
			ids = append(ids, res.IDs...)
		}
		in, found, err := s.Compaction(ctx, session, "", 0)
		mustNoErr(t, err)
		if !found || in.Conversation != "c1" || !in.Current || in.Summary != nil || len(in.Messages) != 12 || in.Unsummarized != 12 {
			t.Fatalf("compaction input: got %+v found %v, want c1, current, no summary, 12 messages", in, found)
		}
		tok, err := s.TakeCompaction(ctx, session, time.Minute)
		mustNoErr(t, err)
		if _, err := s.TakeCompaction(ctx, session, time.Minute); !errors.Is(err, ErrCompacting) {
			t.Fatalf("second TakeCompaction: got %v, want ErrCompacting", err)
		}
		sum, err := s.StoreSummary(ctx, session, tok, SummaryWrite{
			Conversation: "c1", Message: Message{Content: "John likes tea", Tokens: 30, Model: "m"},
			CoversFrom: ids[0], CoversTo: ids[7], Covers: 8,
			Usage: Usage{PromptTokens: 100, CompletionTokens: 10, CostNanos: 500},
		})
		mustNoErr(t, err)
		mustNoErr(t, s.ReleaseCompaction(ctx, session, tok))
		return s, ids, sum
	}

	t.Run("summary: window starts after its range", func(t *testing.T) {
		s, ids, sum := setup(t)
		w, err := s.Window(ctx, session, 10, t0+10, Policy{})
		mustNoErr(t, err)
		if w.Summary == nil || w.Summary.Content != "John likes tea" || w.Summary.Kind != KindSummary || w.Summary.ID != sum.ID ||
			w.Summary.CoversFrom != ids[0] || w.Summary.CoversTo != ids[7] || w.Summary.Covers != 8 || w.Summary.Tokens != 30 {
			t.Fatalf("window summary: got %+v, want the stored one (%+v)", w.Summary, sum)
		}
		if got := fmt.Sprint(contents(w.Messages)); got != "[q4 a4 q5 a5]" {
			t.Errorf("window: got %s, want [q4 a4 q5 a5]", got)
		}
		// The next turn comes after the summary in the stream; the window
		// leaves the summary out of its messages, and the count of what
		// is not summarized goes on from 4.
		res := appendQA(t, s, session, 6, t0+20, Policy{})
		if res.Unsummarized != 6 {
			t.Errorf("Unsummarized after the summary: got %d, want 6", res.Unsummarized)
		}
		w, err = s.Window(ctx, session, 10, t0+20, Policy{})
		mustNoErr(t, err)
		if got := fmt.Sprint(contents(w.Messages)); got != "[q4 a4 q5 a5 q6 a6]" || w.Summary == nil {
			t.Errorf("window after a turn: got %s (summary %v), want [q4 a4 q5 a5 q6 a6] and the summary", got, w.Summary != nil)
		}
		// The lease-taking read gives the same window.
		if ts, ok := s.(interface {
			TakeTurn(context.Context, string, int, int64, Policy, TurnOptions) (Window, *Lease, error)
		}); ok {
			w2, _, err := ts.TakeTurn(ctx, session, 3, t0+20, Policy{}, TurnOptions{})
			mustNoErr(t, err)
			if got := fmt.Sprint(contents(w2.Messages)); got != "[a5 q6 a6]" || w2.Summary == nil || w2.Summary.ID != sum.ID {
				t.Errorf("TakeTurn window: got %s (summary %+v), want [a5 q6 a6] and the summary", got, w2.Summary)
			}
		}
		// The originals are kept: the whole conversation still reads
		// back, with the summary where it was written.
		all, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if got := fmt.Sprint(contents(all)); got != "[q0 a0 q1 a1 q2 a2 q3 a3 q4 a4 q5 a5 John likes tea q6 a6]" {
			t.Errorf("messages: got %s", got)
		}
		in, _, err := s.Compaction(ctx, session, "c1", 0)
		mustNoErr(t, err)
		if in.Summary == nil || in.Summary.ID != sum.ID || in.Unsummarized != 6 || fmt.Sprint(contents(in.Messages)) != "[q4 a4 q5 a5 q6 a6]" {
			t.Errorf("compaction input after a summary: got %+v", in)
		}
		se, _, err := s.Session(ctx, session)
		mustNoErr(t, err)
		if se.Totals.PromptTokens != 6*0+100 || se.Totals.CompletionTokens != 10 || se.Totals.CostNanos != 500 || se.MessageCount != 14 {
			t.Errorf("session totals: got %+v (messages %d), want the summary's usage and 14 messages", se.Totals, se.MessageCount)
		}
	})

	t.Run("summary: refused without the lease or on another base", func(t *testing.T) {
		s, ids, sum := setup(t)
		w := SummaryWrite{Conversation: "c1", Message: Message{Content: "x"}, CoversTo: ids[9], Covers: 10, Base: sum.ID}
		if _, err := s.StoreSummary(ctx, session, "not-the-token", w); !errors.Is(err, ErrCompactionLost) {
			t.Errorf("without the lease: got %v, want ErrCompactionLost", err)
		}
		tok, err := s.TakeCompaction(ctx, session, time.Minute)
		mustNoErr(t, err)
		stale := w
		stale.Base = ""
		if _, err := s.StoreSummary(ctx, session, tok, stale); !errors.Is(err, ErrCompactionLost) {
			t.Errorf("on a summary that is no longer the latest: got %v, want ErrCompactionLost", err)
		}
		all, err := s.Messages(ctx, session, "c1")
		mustNoErr(t, err)
		if len(all) != 13 {
			t.Errorf("refused writes wrote something: %d messages, want 13", len(all))
		}
		second, err := s.StoreSummary(ctx, session, tok, w)
		mustNoErr(t, err)
		win, err := s.Window(ctx, session, 10, t0+20, Policy{})
		mustNoErr(t, err)
		if win.Summary == nil || win.Summary.ID != second.ID || fmt.Sprint(contents(win.Messages)) != "[q5 a5]" {
			t.Errorf("after a second summary: got %+v, want it and [q5 a5]", win)
		}
	})

	t.Run("summary: StoreTitle", func(t *testing.T) {
		s, _, _ := setup(t)
		u := Usage{PromptTokens: 7, CompletionTokens: 2, CostNanos: 3}
		title := func(want string, wantSet bool) {
			t.Helper()
			convs, err := s.Conversations(ctx, session)
			mustNoErr(t, err)
			if len(convs) != 1 || convs[0].Title != want || convs[0].TitleSet != wantSet {
				t.Fatalf("conversations: got %+v, want title %q (set %v)", convs, want, wantSet)
			}
		}
		conv, stored, err := s.StoreTitle(ctx, session, "", "Tea", true, u)
		mustNoErr(t, err)
		if conv != "c1" || !stored {
			t.Errorf("first title: got %q %v, want c1 stored", conv, stored)
		}
		title("Tea", true)
		if _, err := s.SetTitle(ctx, session, "c1", "Mine"); err != nil {
			t.Fatal(err)
		}
		conv, stored, err = s.StoreTitle(ctx, session, "c1", "Coffee", true, u)
		mustNoErr(t, err)
		if conv != "c1" || stored {
			t.Errorf("over a title set: got %q %v, want c1 not stored", conv, stored)
		}
		title("Mine", true)
		if _, stored, _ = s.StoreTitle(ctx, session, "c1", "Coffee", false, u); !stored {
			t.Errorf("forced: not stored")
		}
		title("Coffee", true)
		if conv, stored, _ = s.StoreTitle(ctx, session, "c9", "X", false, u); conv != "" || stored {
			t.Errorf("no such conversation: got %q %v", conv, stored)
		}
		se, _, err := s.Session(ctx, session)
		mustNoErr(t, err)
		if se.Totals.PromptTokens != 100+4*7 || se.Totals.CompletionTokens != 10+4*2 || se.Totals.CostNanos != 500+4*3 {
			t.Errorf("totals: got %+v, want the summary's usage and four titles'", se.Totals)
		}
		if conv, _, _ = s.StoreTitle(ctx, "a:b:unknown", "", "X", false, u); conv != "" {
			t.Errorf("unknown session: got %q", conv)
		}
		if _, found, _ := s.Session(ctx, "a:b:unknown"); found {
			t.Errorf("StoreTitle created an unknown session")
		}
	})

	t.Run("summary: AddUsage and erase", func(t *testing.T) {
		s, _, _ := setup(t)
		mustNoErr(t, s.AddUsage(ctx, session, Usage{PromptTokens: 7, CostNanos: 3}))
		mustNoErr(t, s.AddUsage(ctx, "a:b:unknown", Usage{PromptTokens: 7}))
		if _, found, _ := s.Session(ctx, "a:b:unknown"); found {
			t.Errorf("AddUsage created an unknown session")
		}
		se, _, err := s.Session(ctx, session)
		mustNoErr(t, err)
		if se.Totals.PromptTokens != 107 || se.Totals.CostNanos != 503 {
			t.Errorf("totals: got %+v, want 107 prompt and 503 nano-USD", se.Totals)
		}
		tok, err := s.TakeCompaction(ctx, session, time.Minute)
		mustNoErr(t, err)
		_, err = s.Erase(ctx, session)
		mustNoErr(t, err)
		if _, err := s.TakeCompaction(ctx, session, time.Minute); err != nil {
			t.Errorf("erase left the compaction lease: %v", err)
		}
		_ = tok
	})
}

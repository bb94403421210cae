package history

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestTakeWindowSecondReadKeepsItsSummary: when the newest entries the
// lease-taking read got are crowded by summaries (or late turns of
// another conversation), the window is read again by a script of its
// own. That script starts after the latest summary's range as it is
// then; a summary stored between the two reads made it start after the
// new summary's range while the window kept the old summary: the messages
// between the two ranges were in neither.
func TestTakeWindowSecondReadKeepsItsSummary(t *testing.T) {
	ctx := context.Background()
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "t")
	var ids []string
	for i := range 3 {
		ids = append(ids, appendQA(t, s, session, i, t0+int64(i), Policy{}).IDs...)
	}
	summarize := func(base string, from, to int) Message {
		t.Helper()
		tok, err := s.TakeCompaction(ctx, session, time.Minute)
		mustNoErr(t, err)
		defer func() { mustNoErr(t, s.ReleaseCompaction(ctx, session, tok)) }()
		m, err := s.StoreSummary(ctx, session, tok, SummaryWrite{Conversation: "c1", Base: base,
			Message:    Message{Content: fmt.Sprintf("summary of %d to %d", from, to), Tokens: 10},
			CoversFrom: ids[0], CoversTo: ids[to], Covers: int64(to + 1)})
		mustNoErr(t, err)
		return m
	}
	first := summarize("", 0, 1) // q0 a0; the stream: q0 a0 q1 a1 q2 a2 S1
	const n = 5                  // S1 a2 q2 a1 q1: four after its range, fewer than n
	keys := append(s.sessionKeys(session)[:3], s.leaseKey(session), s.queueKey(session), s.waitersKey(session), s.watchedKey(session))
	res, newest, err := s.takeRead(ctx, keys, n, nil, []any{n, t0 + 10, 0, "tok", 60000, 0, 0, s.wakeChannel(session)})
	mustNoErr(t, err)
	summarize(first.ID, 0, 3) // between the two reads: q0 to a1
	w, err := s.takeWindow(ctx, session, keys, n, res, nil, newest)
	mustNoErr(t, err)
	if w.Summary == nil {
		t.Fatalf("window: no summary")
	}
	// The window must go on right after the range of the summary it
	// carries.
	next := ""
	for i, id := range ids {
		if id == w.Summary.CoversTo && i+1 < len(ids) {
			next = ids[i+1]
		}
	}
	if len(w.Messages) == 0 || w.Messages[0].ID != next {
		t.Errorf("window: summary %q (covers to %s), messages %v: want them to begin at %s", w.Summary.Content, w.Summary.CoversTo, contents(w.Messages), next)
	}
}

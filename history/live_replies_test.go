package history

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestWatchersAssembleEveryReply: sessions streaming at once, each
// watched, each reply's fragments published at a stream's pace and the
// turn appended right after the last: every watcher assembles every
// reply whole from its deltas, none after the turn's messages. Nothing is
// slowed down on purpose: the turn's write overtaking a delta write in
// flight happens on its own (it failed so on both stores before the
// append waited for that write: a few replies in three runs lacked
// their last fragments).
func TestWatchersAssembleEveryReply(t *testing.T) {
	srv := redistest.Start(t)
	c := srv.Client(t)
	for name, newStore := range map[string]func() watchStore{
		"memory": func() watchStore { return NewMemory() },
		// Watches' blocking reads on a pool of their own, as in production.
		"redis": func() watchStore { return NewRedis(c, "t", WithBlockingClient(srv.Client(t))) },
	} {
		t.Run(name, func(t *testing.T) {
			s := newStore()
			defer func() { _ = s.(interface{ Close() error }).Close() }()
			var wg sync.WaitGroup
			for i := range 20 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					streamTurns(t, s, fmt.Sprintf("chat:u%d:support", i))
				}()
			}
			wg.Wait()
		})
	}
}

// streamTurns streams three watched turns of session and checks what its
// watcher assembles of each.
func streamTurns(t *testing.T, s watchStore, session string) {
	ctx := context.Background()
	w, err := s.Watch(ctx, session, "")
	if err != nil {
		t.Error(err)
		return
	}
	defer w.Close()
	for turn := range 3 {
		_, l, err := s.TakeTurn(ctx, session, 20, t0, Policy{}, hold)
		if err != nil {
			t.Error(err)
			return
		}
		var want strings.Builder
		for k := range 40 {
			f := fmt.Sprintf("%d.%d ", turn, k)
			want.WriteString(f)
			l.Publish(Delta{Content: f})
			time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		}
		if _, err := s.Append(ctx, session, Turn{Messages: qa(turn), NowMs: t0 + int64(turn), Lease: l}, Policy{}); err != nil {
			t.Error(err)
			return
		}
		text, messages := "", 0
		for {
			ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			e, err := w.Next(ctx)
			cancel()
			if err != nil {
				t.Errorf("%s turn %d: %v", session, turn, err)
				return
			}
			if e.Kind == EventComplete {
				break
			}
			if e.Kind == EventMessage {
				messages++
				continue
			}
			if messages > 0 {
				t.Errorf("%s turn %d: a delta after the turn's messages", session, turn)
			}
			if e.Delta.Replace {
				text = ""
			}
			text += e.Delta.Content
		}
		if text != want.String() || messages != 2 {
			t.Errorf("%s turn %d: assembled %q and %d messages, want %q and 2", session, turn, text, messages, want.String())
		}
	}
}

package compaction

import (
	"context"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/tokens"
	"github.com/historyproxy/historyproxy/upstream"
)

type stubStore struct {
	mu     sync.Mutex
	usage  history.Usage
	stored int
}

func (s *stubStore) TakeCompaction(ctx context.Context, session string, ttl time.Duration) (string, error) {
	return "tok-" + session, nil
}
func (s *stubStore) ReleaseCompaction(ctx context.Context, session, token string) error { return nil }
func (s *stubStore) Compaction(ctx context.Context, session, conv string, limit int) (history.CompactionInput, bool, error) {
	var msgs []history.Message
	for i := range 60 {
		role := history.RoleUser
		if i%2 == 1 {
			role = history.RoleAssistant
		}
		msgs = append(msgs, history.Message{ID: fmt.Sprintf("%d-0", i+1), Role: role, Content: "hello there", Tokens: 5, Model: "gpt-4o-mini"})
	}
	return history.CompactionInput{Conversation: "c1", Current: true, Messages: msgs, Unsummarized: 60}, true, nil
}
func (s *stubStore) StoreSummary(ctx context.Context, session, token string, w history.SummaryWrite) (history.Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stored++
	s.usage = s.usage.Add(w.Usage)
	return w.Message, nil
}
func (s *stubStore) AddUsage(ctx context.Context, session string, u history.Usage) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.usage = s.usage.Add(u)
	return nil
}
func (s *stubStore) ReadMessages(ctx context.Context, session string, q history.MessageQuery) (string, []history.Message, error) {
	return "", nil, nil
}
func (s *stubStore) StoreTitle(ctx context.Context, session, conv, title string, onlyUnset bool, u history.Usage) (string, bool, error) {
	return conv, true, nil
}

type blockCaller struct{}

func (blockCaller) Chat(ctx context.Context, auth string, req upstream.ChatRequest) (upstream.ChatResponse, error) {
	<-ctx.Done()
	return upstream.ChatResponse{}, ctx.Err()
}

func stubSettings(string) Settings {
	return Settings{Enabled: true, TriggerMessages: 50, TargetMessages: 30, KeepRecentTurns: 10, MaxSummaryTokens: 512}
}

func cpu() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Found by review: 38% of a core spent with 10,000 sessions queued and
// both slots in a slow call.
// While every worker slot is busy (a slow upstream) and other jobs are
// overdue, Run should sleep until a slot frees, not wake every millisecond
// and rescan the whole queue under the mutex Recorded takes on the
// request path.
func TestRunSleepsWhileSlotsBusy(t *testing.T) {
	counter, err := tokens.New("o200k_base")
	if err != nil {
		t.Fatal(err)
	}
	w := New(Options{Store: &stubStore{}, Upstream: blockCaller{}, Counter: counter, Catalog: tokens.NewCatalog(nil),
		Settings: stubSettings, Workers: 2, CallTimeout: time.Minute})
	for i := range 10000 {
		w.Recorded(Turn{Session: fmt.Sprintf("ch:u%d:a", i), Agent: "a", Model: "gpt-4o-mini", Auth: "Bearer sk-x", Unsummarized: 60})
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx) }()
	time.Sleep(200 * time.Millisecond) // both slots now blocked in the upstream call
	c0, t0 := cpu(), time.Now()
	time.Sleep(time.Second)
	used, wall := cpu()-c0, time.Since(t0)
	cancel()
	<-done
	t.Logf("idle queue, 2 slots busy: %v CPU in %v wall", used, wall)
	if used > 100*time.Millisecond {
		t.Fatalf("the worker burned %v CPU in %v while waiting for a free slot (Run busy-loops at 1 ms)", used, wall)
	}
}

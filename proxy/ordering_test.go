package proxy

import (
	"bufio"
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
)

func orderedAgent(string) Agent {
	a := defaultAgent("")
	a.Ordering, a.OrderingTimeout = OrderingWait, time.Minute
	return a
}

// held starts a streamed turn of session that the fake upstream holds
// after its first chunk until the returned gate is closed; it returns
// once the first chunk arrived, and a function that reads the rest.
func (h *harness) held(t *testing.T, session, text string) (gate chan struct{}, rest func() string) {
	t.Helper()
	gate = make(chan struct{})
	h.up.Enqueue(fakeai.Reply{Content: "answer to " + text, Gate: gate, GateAfter: 1})
	resp := h.do(t, "/v1/chat/completions", `{"model":"gpt-4o-mini","stream":true,"messages":[`+user(text)+`]}`,
		map[string]string{"X-Session-ID": session})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	buf := make([]byte, 1)
	_, err := resp.Body.Read(buf) // the first chunk is through
	require.NoError(t, err)
	return gate, func() string { return string(buf) + readAll(t, resp) }
}

// TestReadOnlyWaitsItsTurn: a read-only request of a busy session waits
// for the turn being generated and reads it, but holds no one up.
func TestReadOnlyWaitsItsTurn(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.Agent = orderedAgent })
	const session = "chat:ro:support"
	gate, rest := h.held(t, session, "first")

	got := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, h.srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user("peek"))))
		req.Header.Set("X-Session-ID", session)
		req.Header.Set("X-History", "read-only")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			got <- 0
			return
		}
		defer resp.Body.Close()
		got <- len(h.up.LastChat().Chat.Messages)
	}()
	select {
	case <-got:
		t.Fatal("the read-only request did not wait for the turn being generated")
	case <-time.After(200 * time.Millisecond):
	}
	close(gate)
	require.Contains(t, rest(), "[DONE]")
	require.Equal(t, 3, <-got, "the reader saw the turn before it (2 messages) and its own")
	require.Len(t, h.stored(t, session), 2, "the read-only turn recorded nothing")

	// The reader held no one up: the next turn goes at once.
	resp := h.do(t, "/v1/chat/completions", chatBody(user("next")), map[string]string{"X-Session-ID": session})
	require.Equal(t, http.StatusOK, resp.StatusCode, readAll(t, resp))
}

// TestWaiterWhoLeavesIsNotForwarded: a client that gives up while its
// request waits for the turn is not forwarded, and leaves no one stuck.
func TestWaiterWhoLeavesIsNotForwarded(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.Agent = orderedAgent })
	const session = "chat:leaves:support"
	gate, rest := h.held(t, session, "first")

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user("impatient"))))
	req.Header.Set("X-Session-ID", session)
	done := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	// It waits in the lease's queue (not merely on its way there, which a
	// loaded machine can stretch past any sleep); then its client goes.
	waiting := func() int { return h.store.Stats().Waiting }
	require.Eventually(t, func() bool { return waiting() == 1 }, 10*time.Second, time.Millisecond, "the request never queued for the turn")
	cancel()
	require.Error(t, <-done)
	require.Eventually(t, func() bool { return waiting() == 0 }, 10*time.Second, time.Millisecond, "the request that left is still queued")
	close(gate)
	rest()

	resp := h.do(t, "/v1/chat/completions", chatBody(user("second")), map[string]string{"X-Session-ID": session})
	require.Equal(t, http.StatusOK, resp.StatusCode, readAll(t, resp))
	var texts []string
	for _, r := range h.up.Requests() {
		if r.Chat != nil {
			msgs := r.Chat.Messages
			texts = append(texts, msgs[len(msgs)-1]["content"].(string))
		}
	}
	require.Equal(t, []string{"first", "second"}, texts, "the request whose client left never reached the upstream")
	require.Len(t, h.stored(t, session), 4)
}

// TestFailedTurnGivesTheTurnBack: a request whose upstream fails records
// nothing and gives the session's turn back at once.
func TestFailedTurnGivesTheTurnBack(t *testing.T) {
	h := newHarness(t, func(o *Options) {
		o.Agent = func(string) Agent { a := orderedAgent(""); a.Ordering = OrderingReject; return a }
	})
	const session = "chat:fails:support"
	h.up.Enqueue(fakeai.Reply{Status: http.StatusTooManyRequests})
	resp := h.do(t, "/v1/chat/completions", chatBody(user("hi")), map[string]string{"X-Session-ID": session})
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	readAll(t, resp)
	resp = h.do(t, "/v1/chat/completions", chatBody(user("again")), map[string]string{"X-Session-ID": session})
	require.Equal(t, http.StatusOK, resp.StatusCode, "the failed turn's lease was given back: %s", readAll(t, resp))
}

// TestClientDisconnectModes: a client that goes away after the first
// chunk of a streamed reply; with on_client_disconnect: cancel (the
// default) what was generated is recorded incomplete, with finish the
// reply is read to its end and recorded complete.
func TestClientDisconnectModes(t *testing.T) {
	for _, mode := range []string{DisconnectCancel, DisconnectFinish} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, func(o *Options) {
				o.Agent = func(string) Agent { a := orderedAgent(""); a.OnClientDisconnect = mode; return a }
			})
			session := "chat:leaver:" + mode
			gate := make(chan struct{})
			words := strings.Fields(strings.Repeat("more words of a long answer ", 40))
			for i := range words {
				words[i] = " " + words[i]
			}
			words[0] = "First"
			h.up.Enqueue(fakeai.Reply{Deltas: words, Gate: gate, GateAfter: 2})
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions",
				strings.NewReader(`{"model":"gpt-4o-mini","stream":true,"messages":[`+user("tell me")+`]}`))
			req.Header.Set("X-Session-ID", session)
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			br := bufio.NewReader(resp.Body)
			for {
				line, err := br.ReadString('\n')
				require.NoError(t, err)
				if strings.Contains(line, "First") {
					break // the first words arrived
				}
			}
			cancel() // the client goes away
			resp.Body.Close()
			close(gate)

			want := strings.Join(words, "")
			require.Eventually(t, func() bool {
				msgs, _ := h.store.Messages(context.Background(), session, "")
				return len(msgs) == 2
			}, 20*time.Second, 5*time.Millisecond, "the turn is recorded")
			reply := h.stored(t, session)[1]
			if mode == DisconnectFinish {
				require.Equal(t, want, reply.Content, "read to its end")
				require.Equal(t, "complete", reply.Status)
			} else {
				require.Equal(t, "incomplete", reply.Status)
				require.NotEqual(t, want, reply.Content)
			}
			// Either way the session's turn is given back.
			r2 := h.do(t, "/v1/chat/completions", chatBody(user("next")), map[string]string{"X-Session-ID": session})
			require.Equal(t, http.StatusOK, r2.StatusCode, readAll(t, r2))
		})
	}
}

// leaveOnTurn is a store whose client leaves just as its request gets the
// session's turn: TakeTurn succeeds, and the request's context is done.
type leaveOnTurn struct {
	Store
	cancel context.CancelFunc
}

func (s leaveOnTurn) TakeTurn(ctx context.Context, session string, n int, nowMs int64, p history.Policy, o history.TurnOptions) (history.Window, *history.Lease, error) {
	w, l, err := s.Store.TakeTurn(ctx, session, n, nowMs, p, o)
	s.cancel()
	select {
	case <-ctx.Done(): // the server saw the client go
	case <-time.After(10 * time.Second):
	}
	return w, l, err
}

// TestClientLeavingAsItsTurnComesGivesItBack: a request whose client
// leaves just as it gets the session's turn gives the turn back; the
// next request is not held up.
func TestClientLeavingAsItsTurnComesGivesItBack(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	h := newHarness(t, func(o *Options) {
		o.Agent = func(string) Agent { a := orderedAgent(""); a.Ordering = OrderingReject; return a }
		o.Store = leaveOnTurn{Store: o.Store, cancel: cancel}
	})
	const session = "chat:leaves-on-turn:support"
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user("gone"))))
	req.Header.Set("X-Session-ID", session)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
	}
	// The handler ends on its own; then the session is free.
	require.Eventually(t, func() bool {
		_, l, err := h.store.TakeTurn(context.Background(), session, 0, 0, history.Policy{}, history.TurnOptions{Hold: true})
		if err == nil {
			_ = l.Release(context.Background())
		}
		return err == nil
	}, 20*time.Second, 10*time.Millisecond, "the turn was given back")
}

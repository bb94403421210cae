package proxy

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestInjectedContextAlwaysAccepted plays apps against the proxy at random,
// each request valid for an app that relies on the proxy for its history:
// questions, tool calls (parallel ones, ids reused across replies as some
// servers do), tool results sent later (after other users spoke, in another
// order, or never), requests retried with their Idempotency-Key, streamed
// or not, under small budgets. The fake upstream enforces the API's tool
// message rules, so every request must be answered 200: a 400 is one the
// proxy's injected history caused.
func TestInjectedContextAlwaysAccepted(t *testing.T) {
	backends := []struct {
		name string
		open func(t *testing.T) e2eBackend
	}{
		{"memory", func(*testing.T) e2eBackend {
			return e2eBackend{open: func(*testing.T, string) e2eStore { return history.NewMemory() }}
		}},
		{"redis", func(t *testing.T) e2eBackend {
			srv := redistest.Start(t)
			return e2eBackend{shared: true, open: func(t *testing.T, prefix string) e2eStore {
				return history.NewRedis(srv.Client(t), prefix)
			}}
		}},
	}
	for _, bc := range backends {
		t.Run(bc.name, func(t *testing.T) {
			b := bc.open(t)
			for seed := range uint64(24) {
				t.Run(fmt.Sprint(seed), func(t *testing.T) { simulateApps(t, b, seed) })
			}
		})
	}
}

func simulateApps(t *testing.T, b e2eBackend, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 13))
	shared := seed%2 == 0
	maxMessages := []int{3, 5, 8, 20}[rng.IntN(4)]
	maxTokens := []int{40, 150, 600, 4000}[rng.IntN(4)]
	h := newE2EHarness(t, b, 1, func(o *Options) {
		o.Agent = func(name string) Agent {
			a := defaultAgent(name)
			if shared {
				a.Mode = ModeShared
			}
			a.MaxMessages, a.MaxTokens = maxMessages, maxTokens
			return a
		}
	})
	users := []string{"alice"}
	if shared {
		users = append(users, "bob", "carol")
	}
	pending := map[string][]string{} // a user's calls not answered yet
	var log []string
	callN, limited := 0, 0
	defer func() { t.Logf("%d requests whose call was out of the window read", limited) }()
	reply := func() fakeai.Reply {
		if rng.IntN(2) == 0 {
			return fakeai.Reply{Content: fmt.Sprintf("answer %d", rng.IntN(1000))}
		}
		var calls []fakeai.ToolCall
		for i := range 1 + rng.IntN(3) {
			id := fmt.Sprintf("call_%d", i) // reused in every reply
			if rng.IntN(2) == 0 {
				callN++
				id = fmt.Sprintf("call_u%d", callN)
			}
			args := `{"q":"` + strings.Repeat("x", rng.IntN(3)*150) + `"}`
			calls = append(calls, fakeai.ToolCall{ID: id, Name: "f", Arguments: args})
		}
		return fakeai.Reply{ToolCalls: calls}
	}
	for step := range 40 {
		u := users[rng.IntN(len(users))]
		sid, stored := "team:"+u+":sim", "team:*:sim"
		if !shared {
			sid, stored = "app:"+u+":sim", "app:"+u+":sim"
		}
		var msgs []string
		what := ""
		if ids := pending[u]; len(ids) > 0 && rng.IntN(4) != 0 {
			rng.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
			for _, id := range ids {
				msgs = append(msgs, toolResult(id, "result of "+id))
			}
			what = fmt.Sprintf("%s sends results %v", u, ids)
			if rng.IntN(4) == 0 {
				msgs = append(msgs, user("and a note"))
				what += " and a note"
			}
		} else {
			msgs = append(msgs, user(fmt.Sprintf("question %d", step)))
			what = fmt.Sprintf("%s asks (pending %v)", u, pending[u])
		}
		body := chatBody(msgs...)
		if rng.IntN(3) == 0 {
			body = strings.Replace(body, `{"model"`, `{"stream":true,"model"`, 1)
			what += ", streamed"
		}
		var hdr map[string]string
		attempts := 1
		if rng.IntN(3) == 0 {
			hdr = map[string]string{"Idempotency-Key": fmt.Sprintf("k-%d-%d", seed, step)}
			attempts = 1 + rng.IntN(2)
		}
		rep := reply()
		for a := range attempts {
			h.up.Enqueue(rep)
			r, err := h.postWith(0, sid, body, hdr)
			require.NoError(t, err)
			log = append(log, fmt.Sprintf("%d.%d %s -> %d", step, a, what, r.status))
			if r.status != http.StatusOK && strings.HasPrefix(what, u+" sends") && !callInWindow(t, h, stored, pending[u], maxMessages+1) {
				// The call is no longer among the messages read for the
				// window (other turns pushed it out): a known limit.
				log[len(log)-1] += " (call out of the window read)"
				limited++
				break
			}
			if r.status != http.StatusOK {
				t.Fatalf("shared %v max_messages %d max_tokens %d\n%s\nupstream got %v\nstored %v\n%s",
					shared, maxMessages, maxTokens, strings.Join(log, "\n"), wireLines(h.up.LastChat().Chat.Messages), simStored(t, h, stored), r.body)
			}
		}
		if strings.HasPrefix(what, u+" sends") && rng.IntN(5) == 0 && !strings.HasSuffix(log[len(log)-1], "window read)") {
			// The app sends its results again, without a key (it never
			// got the answer): a new turn of the same results.
			h.up.Enqueue(rep)
			r, err := h.postWith(0, sid, body, nil)
			require.NoError(t, err)
			log = append(log, fmt.Sprintf("%d.r %s again without a key -> %d", step, what, r.status))
			if r.status != http.StatusOK && !callInWindow(t, h, stored, pending[u], maxMessages+1) {
				log[len(log)-1] += " (call out of the window read)"
				limited++
			} else if r.status != http.StatusOK {
				t.Fatalf("shared %v max_messages %d max_tokens %d\n%s\nupstream got %v\nstored %v\n%s",
					shared, maxMessages, maxTokens, strings.Join(log, "\n"), wireLines(h.up.LastChat().Chat.Messages), simStored(t, h, stored), r.body)
			}
		}
		pending[u] = nil
		for _, c := range rep.ToolCalls {
			pending[u] = append(pending[u], c.ID)
		}
	}
}

// callInWindow reports whether the assistant message calling exactly ids
// is among the last n messages stored in the session's latest conversation.
func callInWindow(t *testing.T, h *e2eHarness, sid string, ids []string, n int) bool {
	msgs := h.messages(t, sid, "")
	require.NotEmpty(t, msgs, "nothing stored for %s", sid)
	if len(msgs) == 0 {
		return false
	}
	conv := msgs[len(msgs)-1].Conversation
	var in []history.Message
	for _, m := range msgs {
		if m.Conversation == conv {
			in = append(in, m)
		}
	}
	in = in[max(0, len(in)-n):]
	want := append([]string(nil), ids...)
	slices.Sort(want)
	for _, m := range in {
		if m.ToolCalls == nil {
			continue
		}
		got := history.ToolCallIDs(m.ToolCalls)
		slices.Sort(got)
		if slices.Equal(got, want) {
			return true
		}
	}
	return false
}

func simStored(t *testing.T, h *e2eHarness, sid string) string {
	var out []string
	for _, m := range h.messages(t, sid, "") {
		w := m.Role + ":" + m.Content
		if m.ToolCalls != nil {
			w = "call" + fmt.Sprint(history.ToolCallIDs(m.ToolCalls))
		}
		if m.ToolCallID != "" {
			w = "tool:" + m.ToolCallID
		}
		out = append(out, w+"@"+m.User+"#"+m.IdempotencyKey)
	}
	return strings.Join(out, " ")
}

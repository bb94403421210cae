package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/admin"
	"github.com/historyproxy/historyproxy/internal/fakeai"
)

// totals reads a session's all-time prompt and completion tokens.
func (e *adminEnv) totals(t *testing.T, id string) (prompt, completion int64) {
	t.Helper()
	var s admin.SessionDetail
	e.get(t, sessionPath(id), &s)
	return s.Tokens.Prompt, s.Tokens.Completion
}

// TestBilledBackgroundCallCountsUnderItsSession: the issue counts the
// tokens and cost of background calls under the session that caused them.
// A call the upstream billed whose result is not stored (an empty summary,
// an answer that holds no title, a summary refused because the lease was
// lost meanwhile) was counted on the metrics but never reached the
// session's totals. A session erased meanwhile is not brought back by it.
func TestBilledBackgroundCallCountsUnderItsSession(t *testing.T) {
	key := []string{"X-Upstream-Authorization", "Bearer sk-admin"}
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		cases := []struct {
			name          string
			route         string
			summary       fakeai.Reply
			title         fakeai.Reply
			prompt, compl int64
			status        int
		}{
			{name: "empty summary", route: "/compact", status: http.StatusBadGateway,
				summary: fakeai.Reply{Content: "", FinishReason: "length", Usage: &fakeai.Usage{PromptTokens: 1000, CompletionTokens: 50}},
				prompt:  1000, compl: 50},
			{name: "empty title", route: "/title:generate", status: http.StatusBadGateway,
				title:  fakeai.Reply{Content: "  ", Usage: &fakeai.Usage{PromptTokens: 100, CompletionTokens: 5}},
				prompt: 100, compl: 5},
			{name: "answer holds no title", route: "/title:generate", status: http.StatusBadGateway,
				title:  fakeai.Reply{Content: `"".`, Usage: &fakeai.Usage{PromptTokens: 100, CompletionTokens: 7}},
				prompt: 100, compl: 7},
		}
		for i, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				e := b.start(t, nil, "-config", compactionConfig(t, false, ""))
				s := newSummarizer(e.up)
				if tc.summary.Usage != nil {
					s.summaryAs = &tc.summary
				}
				if tc.title.Usage != nil {
					s.titleAs = &tc.title
				}
				id := fmt.Sprintf("web:u%d:support", i)
				for q := range 3 {
					e.chat(t, id, fmt.Sprintf("q%d", q))
				}
				p0, c0 := e.totals(t, id)
				var ae apiError
				require.Equal(t, tc.status, e.call(t, http.MethodPost, sessionPath(id, tc.route), nil, &ae, key...), "%+v", ae)
				p1, c1 := e.totals(t, id)
				require.Equal(t, [2]int64{tc.prompt, tc.compl}, [2]int64{p1 - p0, c1 - c0}, "the billed call's tokens under the session")
			})
		}
	})
}

// TestBilledSummaryRefusedCountsUnderItsSession: a summary the store
// refuses (its lease lost during a long call) was billed: its usage goes
// to the session's totals all the same. An erase during the call is
// different: the session is gone and stays gone.
func TestBilledSummaryRefusedCountsUnderItsSession(t *testing.T) {
	key := []string{"X-Upstream-Authorization", "Bearer sk-admin"}
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		for _, erase := range []bool{false, true} {
			t.Run(fmt.Sprintf("erase=%v", erase), func(t *testing.T) {
				if !erase && b.rs == nil {
					t.Skip("the memory store's lease cannot be taken away from outside")
				}
				e := b.start(t, nil, "-config", compactionConfig(t, false, ""))
				s := newSummarizer(e.up)
				gate := make(chan struct{})
				s.mu.Lock()
				s.gate = gate
				s.mu.Unlock()
				const id = "web:lee:support"
				for q := range 3 {
					e.chat(t, id, fmt.Sprintf("q%d", q))
				}
				p0, c0 := e.totals(t, id)
				done := make(chan int)
				var ae apiError
				go func() {
					done <- e.call(t, http.MethodPost, sessionPath(id, "/compact"), nil, &ae, key...)
				}()
				<-s.seen
				if erase {
					require.Equal(t, http.StatusOK, e.call(t, http.MethodDelete, sessionPath(id), nil, nil))
				} else {
					// The lease expired during the call (a call longer than it).
					c := b.rs.Client(t)
					n, err := c.Del(context.Background(), e.prefix+":{"+id+"}:compact").Result()
					require.NoError(t, err)
					require.Equal(t, int64(1), n, "the lease key")
				}
				close(gate)
				select {
				case status := <-done:
					require.Equal(t, http.StatusConflict, status)
					require.Equal(t, "compaction_superseded", ae.Error.Code)
				case <-time.After(10 * time.Second):
					t.Fatal("no answer")
				}
				if erase {
					e.fails(t, http.MethodGet, sessionPath(id), nil, http.StatusNotFound, "session_not_found")
					e.noKeys(t, b, id)
					return
				}
				p1, c1 := e.totals(t, id)
				require.Equal(t, [2]int64{1000, 50}, [2]int64{p1 - p0, c1 - c0}, "the billed call's tokens under the session")
				require.Empty(t, e.summaries(t, id))
			})
		}
	})
}

// TestGeneratedTitleKeepsAHandSetTitle: the background title generation
// checks for a title before its upstream call; a title set by hand during
// the call was overwritten by the generated one. It is kept now, and the
// call's usage still counts under the session. The on-demand route is
// asked for a new title and replaces it.
func TestGeneratedTitleKeepsAHandSetTitle(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		e := b.start(t, nil, "-config", compactionConfig(t, false, "    titles: true\n"))
		s := newSummarizer(e.up)
		gate := make(chan struct{})
		s.mu.Lock()
		s.gate = gate
		s.mu.Unlock()
		const id = "web:hal:support"
		e.chat(t, id, "What is the weather in Paris?")
		<-s.seen // the background title call, held
		p0, c0 := e.totals(t, id)
		require.Equal(t, http.StatusOK, e.call(t, http.MethodPut, sessionPath(id, "/title"), map[string]string{"title": "Mine"}, nil))
		close(gate)
		require.Eventually(t, func() bool {
			return scrapeMetrics(t, e.p.addrs.Admin)[`historyproxy_background_calls_total{purpose="title",result="ok"}`] == 1
		}, 10*time.Second, 5*time.Millisecond)
		require.Eventually(t, func() bool {
			p1, c1 := e.totals(t, id)
			return p1-p0 == 100 && c1-c0 == 5
		}, 10*time.Second, 5*time.Millisecond, "the title call's usage under the session")
		var d admin.SessionDetail
		e.get(t, sessionPath(id), &d)
		require.Equal(t, "Mine", *d.Conversations[0].Title, "the title set by hand")

		var res struct{ Title string }
		require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/title:generate"), nil, &res, "X-Upstream-Authorization", "Bearer sk-admin"))
		require.Equal(t, "Weather in Paris", res.Title)
		e.get(t, sessionPath(id), &d)
		require.Equal(t, "Weather in Paris", *d.Conversations[0].Title, "asked for on demand")
	})
}

// TestCompactionKeepsAToolCallWithItsResults: the product rule is that a
// tool call is never parted from its results. A compaction folded a call
// whose results had not come yet into the summary when keep_recent_turns
// is 0 (which the configuration allows), and in a shared conversation
// when others spoke keep_recent_turns times before the results came: the
// results then reached the upstream with no call before them, and it
// refused the request (400).
func TestCompactionKeepsAToolCallWithItsResults(t *testing.T) {
	cases := []struct {
		name, extra, keep string
		// others are turns of other users of a shared conversation between
		// the call and its results.
		others []string
	}{
		{name: "keep_recent_turns 0", keep: "0"},
		{name: "shared, others speak before the results", keep: "2",
			extra: "agents:\n  support:\n    mode: shared\n", others: []string{"web:bob:support", "web:cyd:support"}},
	}
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				path := compactionConfig(t, false, tc.extra)
				raw, err := os.ReadFile(path)
				require.NoError(t, err)
				require.NoError(t, os.WriteFile(path, []byte(strings.Replace(string(raw), "keep_recent_turns: 2", "keep_recent_turns: "+tc.keep, 1)), 0o600))
				e := b.start(t, nil, "-config", path)
				newSummarizer(e.up)
				const alice = "web:alice:support"
				stored := alice
				if len(tc.others) > 0 {
					stored = "web:*:support"
				}
				e.chat(t, alice, "hello")
				e.up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_w", Name: "weather", Arguments: `{"city":"Paris"}`}}})
				ctx := context.Background()
				res, err := e.p.client(alice).Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
					Model:    openai.ChatModelGPT4oMini,
					Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("What is the weather in Paris?")},
				})
				require.NoError(t, err)
				require.Len(t, res.Choices[0].Message.ToolCalls, 1)
				for _, o := range tc.others {
					e.chat(t, o, "hi from "+o)
				}
				var out struct {
					Compacted bool   `json:"compacted"`
					Folded    int    `json:"folded"`
					Reason    string `json:"reason"`
				}
				require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(stored, "/compact"), nil, &out, "X-Upstream-Authorization", "Bearer sk-admin"))
				t.Logf("compacted %v, folded %d %s", out.Compacted, out.Folded, out.Reason)
				// The app sends its tool's result: the call must be before it.
				_, err = e.p.client(alice).Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
					Model:    openai.ChatModelGPT4oMini,
					Messages: []openai.ChatCompletionMessageParamUnion{openai.ToolMessage(`{"temp":21}`, "call_w")},
				})
				require.NoError(t, err, "the tool's result after a compaction")
				msgs := e.up.LastChat().Chat.Messages
				var roles []string
				for _, m := range msgs {
					roles = append(roles, fmt.Sprint(m["role"]))
				}
				require.Equal(t, []string{"assistant", "tool"}, roles[len(roles)-2:], "the call right before its result")
			})
		}
	})
}

// TestCompactRoutesBadInput: the two on-demand routes answer bad input
// with an OpenAI-shaped error, make no upstream call and change nothing.
func TestCompactRoutesBadInput(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		e := b.start(t, nil, "-config", compactionConfig(t, false, ""))
		s := newSummarizer(e.up)
		const id = "web:ivy:support"
		for q := range 3 {
			e.chat(t, id, fmt.Sprintf("q%d", q))
		}
		var before admin.SessionDetail
		e.get(t, sessionPath(id), &before)
		requests := len(e.up.Requests())
		cases := []struct {
			name, path, body string
			status           int
			code             string
		}{
			{"not JSON", sessionPath(id, "/compact"), `{"conversation":`, 400, "invalid_json"},
			{"an array", sessionPath(id, "/title:generate"), `[]`, 400, "invalid_json"},
			{"a number for the conversation", sessionPath(id, "/compact"), `{"conversation":1}`, 400, "invalid_json"},
			{"not UTF-8", sessionPath(id, "/compact"), "{\"conversation\":\"\xff\"}", 400, "invalid_request_body"},
			{"no such conversation", sessionPath(id, "/compact"), `{"conversation":"c1:start"}`, 404, "conversation_not_found"},
			{"no such conversation, title", sessionPath(id, "/title:generate"), `{"conversation":"c7"}`, 404, "conversation_not_found"},
			{"bad session id", "/admin/v1/sessions/nocolons/compact", ``, 400, "invalid_session_id"},
			{"no such session", sessionPath("web:nobody:support", "/title:generate"), ``, 404, "session_not_found"},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				req, err := http.NewRequest(http.MethodPost, "http://"+e.p.addrs.Admin+tc.path, strings.NewReader(tc.body))
				require.NoError(t, err)
				req.Header.Set("X-Upstream-Authorization", "Bearer sk-admin")
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				var ae apiError
				require.NoError(t, json.NewDecoder(resp.Body).Decode(&ae))
				require.Equal(t, tc.status, resp.StatusCode, "%+v", ae)
				require.Equal(t, tc.code, ae.Error.Code)
				require.NotEmpty(t, ae.Error.Message)
				require.NotEmpty(t, ae.Error.Type)
			})
		}
		require.Len(t, e.up.Requests(), requests, "no upstream call")
		require.Empty(t, s.seen)
		var after admin.SessionDetail
		e.get(t, sessionPath(id), &after)
		require.Equal(t, before, after, "the session is unchanged")
		require.Empty(t, e.summaries(t, id))
	})
}

// TestCompactionIsNotActivity: a summary is written to the conversation's
// stream and its last entry pointer names it, but a compaction is not
// activity of the conversation: its last message time, its message count,
// the session's last activity (which idle_timeout, retention and the
// sessions list read) stay, and the next turn after the idle timeout
// starts a new conversation even when the compaction ran within it.
func TestCompactionIsNotActivity(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		path := compactionConfig(t, false, "")
		raw, err := os.ReadFile(path)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path, []byte(strings.Replace(string(raw), "defaults:\n", "defaults:\n  idle_timeout: 1s\n", 1)), 0o600))
		e := b.start(t, nil, "-config", path)
		newSummarizer(e.up)
		const id = "web:ida:support"
		for q := range 3 {
			e.chat(t, id, fmt.Sprintf("q%d", q))
		}
		var before, after admin.SessionDetail
		e.get(t, sessionPath(id), &before)
		time.Sleep(600 * time.Millisecond)
		var res struct {
			Compacted bool         `json:"compacted"`
			Summary   *admin.Entry `json:"summary"`
		}
		require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/compact"), nil, &res, "X-Upstream-Authorization", "Bearer sk-admin"))
		require.True(t, res.Compacted)
		e.get(t, sessionPath(id), &after)
		require.Equal(t, before.LastActiveAt, after.LastActiveAt, "the session's last activity")
		require.Equal(t, before.MessageCount, after.MessageCount)
		bc, ac := before.Conversations[0], after.Conversations[0]
		require.Equal(t, bc.LastMessageAt, ac.LastMessageAt, "the conversation's last message time")
		require.Equal(t, bc.MessageCount, ac.MessageCount)
		require.Equal(t, res.Summary.ID, *ac.LastMessageID, "the last entry: the summary, as the timeline shows it")
		require.Equal(t, []string{id}, listIDs(e.list(t, "active=true")), "listed as before")
		time.Sleep(600 * time.Millisecond) // 1.2 s after the last turn, 0.6 s after the compaction
		e.chat(t, id, "after a pause")
		e.get(t, sessionPath(id), &after)
		require.Equal(t, "c2", *after.Conversation, "the idle timeout counts from the last turn, not the compaction")
	})
}

package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/admin"
	"github.com/historyproxy/historyproxy/compaction"
	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// summarizer scripts the fake upstream's answers to the proxy's own
// summarization and title calls, and keeps every request it saw: the
// summaries carry each "FACT-..." word of their input, so a fact stated
// once survives summary after summary, as a good summarizer's would. A
// test that needs another answer sets summaryAs or titleAs.
type summarizer struct {
	mu        sync.Mutex
	summaries []fakeai.ChatRequest // summarization requests, in order
	titles    []fakeai.ChatRequest
	chats     []fakeai.ChatRequest // everything else: the proxied requests
	fail      int                  // answer the next this many summarization calls with 500
	summaryAs *fakeai.Reply        // when not nil, the answer to every summarization call
	titleAs   *fakeai.Reply        // when not nil, the answer to every title call
	gate      chan struct{}        // when not nil, background calls (summaries, titles) wait for it
	seen      chan struct{}        // signalled at each background call
}

var factRE = regexp.MustCompile(`FACT-\w+`)

func newSummarizer(up *fakeai.Server) *summarizer {
	s := &summarizer{seen: make(chan struct{}, 100)}
	up.Intercept(func(r fakeai.ChatRequest) (fakeai.Reply, bool) {
		sys := r.System()
		s.mu.Lock()
		var reply fakeai.Reply
		switch {
		case strings.HasPrefix(sys, "You keep the running summary"):
			s.summaries = append(s.summaries, r)
			in, _ := r.Messages[1]["content"].(string)
			facts := strings.Join(unique(factRE.FindAllString(in, -1)), " ")
			reply = fakeai.Reply{Content: fmt.Sprintf("SUMMARY-%d knows %s", len(s.summaries), facts),
				Usage: &fakeai.Usage{PromptTokens: 1000, CompletionTokens: 50}}
			switch {
			case s.fail > 0:
				s.fail--
				reply = fakeai.Reply{Status: http.StatusInternalServerError, ErrorMessage: "summarizer down"}
			case s.summaryAs != nil:
				reply = *s.summaryAs
			}
		case sys == compaction.TitlePrompt:
			s.titles = append(s.titles, r)
			reply = fakeai.Reply{Content: "\"Weather in Paris.\"", Usage: &fakeai.Usage{PromptTokens: 100, CompletionTokens: 5}}
			if s.titleAs != nil {
				reply = *s.titleAs
			}
		default:
			s.chats = append(s.chats, r)
			s.mu.Unlock()
			return fakeai.Reply{}, false
		}
		gate := s.gate
		s.mu.Unlock()
		s.seen <- struct{}{}
		if gate != nil {
			<-gate
		}
		return reply, true
	})
	return s
}

func unique(ss []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range ss {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

func (s *summarizer) counts() (summaries, titles, chats int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.summaries), len(s.titles), len(s.chats)
}

func (s *summarizer) lastChat() fakeai.ChatRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.chats[len(s.chats)-1]
}

func (s *summarizer) summary(i int) fakeai.ChatRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.summaries[i]
}

// compactionConfig writes a config file with compaction on (or off).
func compactionConfig(t *testing.T, enabled bool, extra string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	cfg := fmt.Sprintf(`defaults:
  max_messages: 40
  max_tokens: 4000
  compaction:
    enabled: %v
    trigger_messages: 10
    target_messages: 6
    keep_recent_turns: 2
    max_summary_tokens: 100
%s`, enabled, extra)
	require.NoError(t, os.WriteFile(path, []byte(cfg), 0o600))
	return path
}

// summaries reads the session's summaries from the timeline, oldest first.
func (e *adminEnv) summaries(t *testing.T, session string) []admin.Entry {
	t.Helper()
	var tl struct {
		Items []admin.Entry `json:"items"`
	}
	e.get(t, sessionPath(session, "/timeline?limit=5000"), &tl)
	var out []admin.Entry
	for _, it := range tl.Items {
		if it.Kind == history.KindSummary {
			out = append(out, it)
		}
	}
	return out
}

func (e *adminEnv) waitSummaries(t *testing.T, session string, n int) []admin.Entry {
	t.Helper()
	var got []admin.Entry
	require.Eventually(t, func() bool {
		got = e.summaries(t, session)
		return len(got) >= n
	}, 20*time.Second, 5*time.Millisecond, "waiting for %d summaries", n)
	require.Len(t, got, n, "summaries")
	return got
}

func eachBackend(t *testing.T, f func(t *testing.T, b *adminBackend)) {
	t.Run("memory", func(t *testing.T) { f(t, &adminBackend{name: "memory"}) })
	t.Run("redis", func(t *testing.T) { f(t, &adminBackend{name: "redis", rs: redistest.Start(t)}) })
}

// TestCompactionThresholds: below the trigger nothing is called; past it,
// one summarization call with the exact request the README describes
// folds the oldest turns down to the target, keeping the newest turns;
// the next request gets the summary as one marked system message, then
// the turns after its range. The flat messages route does not list it;
// the timeline does, in place; the transcript shows it.
func TestCompactionThresholds(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		e := b.start(t, nil, "-config", compactionConfig(t, true, ""))
		sum := newSummarizer(e.up)
		const id = "web:john:support"
		for i := range 5 { // 10 messages: at the trigger, not over it
			e.chat(t, id, fmt.Sprintf("q%d FACT-turn%d", i, i))
		}
		time.Sleep(200 * time.Millisecond)
		n, _, _ := sum.counts()
		require.Zero(t, n, "a summarization call at the trigger")

		e.chat(t, id, "q5") // 12 messages: over it
		got := e.waitSummaries(t, id, 1)
		req := sum.summary(0)
		require.Equal(t, "gpt-4o-mini", req.Model, "the model of the request that triggered it")
		require.Equal(t, 100, req.MaxCompletionTokens)
		for _, r := range e.up.Requests() {
			if r.Chat != nil && strings.HasPrefix(r.Chat.System(), "You keep") {
				require.Equal(t, "Bearer sk-test", r.Header.Get("Authorization"), "the key of the request that triggered it")
			}
		}
		require.Len(t, req.Messages, 2)
		require.Equal(t, fmt.Sprintf(compaction.DefaultPrompt, 75), req.System())
		in := req.Messages[1]["content"].(string)
		require.Contains(t, in, "Previous summary: none.")
		for i := range 3 {
			require.Contains(t, in, fmt.Sprintf("[user john]: q%d FACT-turn%d", i, i))
		}
		require.NotContains(t, in, "q3", "the target keeps the newest 6 messages")
		s := got[0]
		require.Equal(t, "SUMMARY-1 knows FACT-turn0 FACT-turn1 FACT-turn2", *s.Content)
		require.Equal(t, int64(6), s.Covers.Messages)
		require.Equal(t, "system", s.Role)

		e.chat(t, id, "q6")
		msgs := sum.lastChat().Messages
		require.Equal(t, "system", msgs[0]["role"])
		require.Equal(t, history.SummaryPrefix+*s.Content, msgs[0]["content"])
		var rest []string
		for _, m := range msgs[1:] {
			rest = append(rest, fmt.Sprint(m["content"]))
		}
		require.Len(t, rest, 7)
		require.Equal(t, "q3 FACT-turn3", rest[0], "the recent turns after its range follow it")
		require.Equal(t, "q6", rest[6])

		var flat struct{ Items []admin.Message }
		e.get(t, sessionPath(id, "/messages?limit=100"), &flat)
		require.Len(t, flat.Items, 14, "the flat history lists the originals, no summary")
		for _, m := range flat.Items {
			require.NotContains(t, m.Content, "SUMMARY")
		}
		if b.rs != nil {
			var out strings.Builder
			require.NoError(t, cli(context.Background(), []string{"transcript", id, "-redis-url", b.rs.URL, "-redis-prefix", e.prefix},
				func(string) string { return "" }, &out, &out))
			require.Contains(t, out.String(), "summary of 6 messages")
			require.Contains(t, out.String(), "SUMMARY-1 knows FACT-turn0")
		}
	})
}

// TestCompactionLongConversation: 200 turns; every request's injected
// history stays within the token budget and, once there is one, begins
// with the latest summary; the fact of turn 1 is in turn 200's context.
func TestCompactionLongConversation(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		const budget = 110
		path := compactionConfig(t, true, "")
		raw, err := os.ReadFile(path)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path, []byte(strings.Replace(string(raw), "max_tokens: 4000", "max_tokens: "+strconv.Itoa(budget), 1)), 0o600))
		e := b.start(t, nil, "-config", path)
		sum := newSummarizer(e.up)
		const id = "web:ann:support"
		latest := ""
		want, uncovered, cut := 0, 0, 0
		for i := 1; i <= 200; i++ {
			text := fmt.Sprintf("turn %d: some more words to give this message a size", i)
			if i == 1 {
				text = "My name is FACT-Ann, remember it."
			}
			var resp *http.Response
			_, err := e.p.client(id).Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
				Model:    openai.ChatModelGPT4oMini,
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(text)},
			}, option.WithResponseInto(&resp))
			require.NoError(t, err, "turn %d", i)
			histTokens, err := strconv.Atoi(resp.Header.Get("X-History-Tokens"))
			require.NoError(t, err)
			require.LessOrEqual(t, histTokens, budget, "turn %d: injected history over the budget", i)
			msgs := sum.lastChat().Messages
			if latest == "" {
				require.NotEqual(t, "system", msgs[0]["role"], "turn %d: a summary before any was made", i)
			} else {
				require.Equal(t, "system", msgs[0]["role"], "turn %d: no summary first", i)
				require.Equal(t, history.SummaryPrefix+latest, msgs[0]["content"], "turn %d: not the latest summary", i)
			}
			if n, _ := strconv.Atoi(resp.Header.Get("X-History-Messages")); latest != "" && n < 1+2*min(uncovered/2, 3) {
				cut++ // the budget let fewer recent turns in than are stored
			}
			if i == 200 {
				require.Contains(t, msgs[0]["content"], "FACT-Ann", "turn 1's fact in turn 200's context")
			}
			uncovered += 2
			if uncovered > 10 {
				uncovered, want = 6, want+1
				got := e.waitSummaries(t, id, want)
				latest = *got[want-1].Content
			}
		}
		n, _, _ := sum.counts()
		require.Equal(t, want, n, "one summarization call per compaction")
		t.Logf("%d summaries; %d of 200 requests had recent turns cut by the budget", want, cut)
		require.Positive(t, cut, "the budget never pressed: the test proves nothing about it")
	})
}

// TestCompactionAcrossInstances: two proxy instances on one Redis; while
// one compacts a session (its summarizer call held), the other's trigger
// and an on-demand compaction through its admin API find the lease taken:
// one summary is made.
func TestCompactionAcrossInstances(t *testing.T) {
	rs := redistest.Start(t)
	b := &adminBackend{name: "redis", rs: rs}
	path := compactionConfig(t, true, "")
	a := b.start(t, nil, "-config", path)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": a.up.URL, "HISTORYPROXY_REDIS_URL": rs.URL, "HISTORYPROXY_REDIS_PREFIX": a.prefix}
	other := &adminEnv{up: a.up, prefix: a.prefix, p: start(t, env, "-config", path)}
	sum := newSummarizer(a.up)
	gate := make(chan struct{})
	sum.mu.Lock()
	sum.gate = gate
	sum.mu.Unlock()
	const id = "web:bob:support"
	for i := range 6 {
		a.chat(t, id, fmt.Sprintf("q%d", i))
	}
	<-sum.seen              // instance a's compaction holds the lease, its call waits
	other.chat(t, id, "q6") // 14 messages: instance other queues one too
	other.fails(t, http.MethodPost, sessionPath(id, "/compact"), nil, http.StatusConflict, "compaction_running")
	time.Sleep(300 * time.Millisecond) // other's worker tries, and finds the lease taken
	close(gate)
	a.waitSummaries(t, id, 1)
	time.Sleep(300 * time.Millisecond)
	n, _, _ := sum.counts()
	require.Equal(t, 1, n, "summarization calls")
	require.Len(t, a.summaries(t, id), 1)
}

// TestCompactionRetry: a summarizer that fails leaves the conversation as
// it was, is counted, and is retried with backoff until it succeeds.
func TestCompactionRetry(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		e := b.start(t, nil, "-config", compactionConfig(t, true, ""))
		sum := newSummarizer(e.up)
		sum.mu.Lock()
		sum.fail = 1
		sum.mu.Unlock()
		const id = "web:cy:support"
		for i := range 6 {
			e.chat(t, id, fmt.Sprintf("q%d", i))
		}
		<-sum.seen // the failed call
		require.Eventually(t, func() bool {
			return scrapeMetrics(t, e.p.addrs.Admin)[`historyproxy_background_calls_total{purpose="compaction",result="error"}`] == 1
		}, 10*time.Second, 5*time.Millisecond)
		require.Empty(t, e.summaries(t, id), "a failed compaction stored something")
		e.chat(t, id, "q6") // history as it was: no summary
		require.NotEqual(t, "system", sum.lastChat().Messages[0]["role"])
		got := e.waitSummaries(t, id, 1) // the retry, after its backoff
		require.Contains(t, *got[0].Content, "SUMMARY-2")
		require.Equal(t, 1.0, scrapeMetrics(t, e.p.addrs.Admin)[`historyproxy_background_calls_total{purpose="compaction",result="ok"}`])
	})
}

// TestCompactOnDemand: the compact route runs one now, below the trigger,
// keeping the newest keep_recent_turns user turns, and answers with the
// summary; below that there is nothing to fold. Compaction need not be
// enabled for it.
func TestCompactOnDemand(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		e := b.start(t, nil, "-config", compactionConfig(t, false, ""))
		sum := newSummarizer(e.up)
		const id = "web:dee:support"
		e.chat(t, id, "q0 FACT-dee")
		e.chat(t, id, "q1")
		var res struct {
			Conversation string       `json:"conversation"`
			Compacted    bool         `json:"compacted"`
			Folded       int          `json:"folded"`
			Reason       string       `json:"reason"`
			Summary      *admin.Entry `json:"summary"`
		}
		require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/compact"), nil, &res, "X-Upstream-Authorization", "Bearer sk-admin"))
		require.False(t, res.Compacted)
		require.Nil(t, res.Summary)
		require.Contains(t, res.Reason, "nothing to fold")
		e.chat(t, id, "q2")
		// The proxy holds no key: the admin call brings one.
		e.fails(t, http.MethodPost, sessionPath(id, "/compact"), nil, http.StatusBadRequest, "upstream_key_missing")
		var before admin.SessionDetail
		e.get(t, sessionPath(id), &before)
		require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/compact"), map[string]string{"conversation": "c1"}, &res, "X-Upstream-Authorization", "Bearer sk-admin"))
		checkBackgroundCost(t, e, id, before, "compaction", 1000, 50)
		require.True(t, res.Compacted)
		require.Equal(t, 2, res.Folded, "all but the newest 2 user turns")
		require.Equal(t, "c1", res.Conversation)
		require.Equal(t, "SUMMARY-1 knows FACT-dee", *res.Summary.Content)
		require.Equal(t, int64(2), res.Summary.Covers.Messages)
		require.Equal(t, res.Summary.ID, e.summaries(t, id)[0].ID)
		e.fails(t, http.MethodPost, sessionPath("web:nobody:support", "/compact"), nil, http.StatusNotFound, "session_not_found")
		var ae apiError
		require.Equal(t, http.StatusNotFound, e.call(t, http.MethodPost, sessionPath(id, "/compact"), map[string]string{"conversation": "c9"}, &ae, "X-Upstream-Authorization", "Bearer sk-admin"))
		require.Equal(t, "conversation_not_found", ae.Error.Code)
		for _, r := range e.up.Requests() {
			if r.Chat != nil && strings.HasPrefix(r.Chat.System(), "You keep") {
				require.Equal(t, "Bearer sk-admin", r.Header.Get("Authorization"), "the key the admin call brought")
			}
		}
		n, _, _ := sum.counts()
		require.Equal(t, 1, n)
	})
}

// TestGenerateTitle: on demand, and in the background after a
// conversation's first turn with compaction.titles; stored like a title
// set by hand, its cost counted under the session with purpose title.
func TestGenerateTitle(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		e := b.start(t, nil, "-config", compactionConfig(t, false, ""))
		sum := newSummarizer(e.up)
		const id = "web:eve:support"
		e.chat(t, id, "What is the weather in Paris?")
		var res struct {
			Conversation string `json:"conversation"`
			Title        string `json:"title"`
		}
		var before admin.SessionDetail
		e.get(t, sessionPath(id), &before)
		require.Equal(t, http.StatusOK, e.call(t, http.MethodPost, sessionPath(id, "/title:generate"), nil, &res, "X-Upstream-Authorization", "Bearer sk-admin"))
		// The call's usage (100 prompt, 5 completion tokens of gpt-4o-mini)
		// counts under the session, and on the metrics as purpose title.
		checkBackgroundCost(t, e, id, before, "title", 100, 5)
		require.Equal(t, "Weather in Paris", res.Title, "quotes and the final period dropped")
		var s admin.SessionDetail
		e.get(t, sessionPath(id), &s)
		require.Equal(t, "Weather in Paris", *s.Conversations[0].Title)
		require.True(t, s.Conversations[0].TitleSet)
		_, titles, _ := sum.counts()
		require.Equal(t, 1, titles)
		sum.mu.Lock()
		in := sum.titles[0].Messages[1]["content"]
		sum.mu.Unlock()
		require.Contains(t, in, "[user eve]: What is the weather in Paris?")

		bg := b.start(t, nil, "-config", compactionConfig(t, false, "    titles: true\n"))
		bsum := newSummarizer(bg.up)
		bg.chat(t, id, "Tell me about Lyon")
		require.Eventually(t, func() bool {
			var s admin.SessionDetail
			bg.get(t, sessionPath(id), &s)
			return s.Conversations[0].TitleSet && *s.Conversations[0].Title == "Weather in Paris"
		}, 10*time.Second, 5*time.Millisecond)
		bg.chat(t, id, "and Nice?")
		time.Sleep(200 * time.Millisecond)
		_, titles, _ = bsum.counts()
		require.Equal(t, 1, titles, "one title per conversation, after its first turn")
	})
}

// checkBackgroundCost checks that one background call of purpose, of
// gpt-4o-mini with these tokens, was added to the session's totals since
// before, and is on the metrics under its purpose and in the session's
// series; chat is not.
func checkBackgroundCost(t *testing.T, e *adminEnv, id string, before admin.SessionDetail, purpose string, prompt, completion int64) {
	t.Helper()
	var after admin.SessionDetail
	e.get(t, sessionPath(id), &after)
	nanos := prompt*150 + completion*600 // gpt-4o-mini: 0.15 and 0.60 USD per 1M tokens
	require.Equal(t, prompt, after.Tokens.Prompt-before.Tokens.Prompt, "the session's prompt tokens")
	require.Equal(t, completion, after.Tokens.Completion-before.Tokens.Completion, "the session's completion tokens")
	require.InDelta(t, float64(nanos)/1e9, after.CostUSD-before.CostUSD, 1e-12, "the session's cost")
	require.Equal(t, before.Requests, after.Requests, "a background call is not a request of the session")
	m := scrapeMetrics(t, e.p.addrs.Admin)
	labels := `agent="support",channel="web",model="gpt-4o-mini",purpose="` + purpose + `"`
	require.Equal(t, float64(prompt), m[`historyproxy_tokens_total{`+labels+`,type="prompt"}`])
	require.Equal(t, float64(completion), m[`historyproxy_tokens_total{`+labels+`,type="completion"}`])
	require.InDelta(t, float64(nanos)/1e9, m[`historyproxy_cost_usd_total{`+labels+`}`], 1e-12)
	require.Equal(t, 1.0, m[`historyproxy_background_calls_total{purpose="`+purpose+`",result="ok"}`])
	require.Equal(t, after.CostUSD, m[`historyproxy_session_cost_usd_total{session="`+id+`"}`], "the session's series: chat and background")
}

// TestCompactionOff: with compaction off (the default), a long
// conversation makes no upstream call but its own.
func TestCompactionOff(t *testing.T) {
	eachBackend(t, func(t *testing.T, b *adminBackend) {
		e := b.start(t, nil, "-config", compactionConfig(t, false, ""))
		sum := newSummarizer(e.up)
		const id = "web:fay:support"
		for i := range 15 {
			e.chat(t, id, fmt.Sprintf("q%d", i))
		}
		time.Sleep(300 * time.Millisecond)
		s, ti, chats := sum.counts()
		require.Equal(t, [3]int{0, 0, 15}, [3]int{s, ti, chats}, "summaries, titles, chats")
		require.Len(t, e.up.Requests(), 15, "requests the upstream got")
		require.Empty(t, e.summaries(t, id))
	})
}

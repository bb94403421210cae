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
// once survives summary after summary, as a good summarizer's would.
type summarizer struct {
	mu        sync.Mutex
	summaries []fakeai.ChatRequest // summarization requests, in order
	titles    []fakeai.ChatRequest
	chats     []fakeai.ChatRequest // everything else: the proxied requests
	fail      int                  // answer the next this many summarization calls with 500
	gate      chan struct{}        // when not nil, summarization calls wait for it
	seen      chan struct{}        // signalled at each summarization call
}

var factRE = regexp.MustCompile(`FACT-\w+`)

func newSummarizer(up *fakeai.Server) *summarizer {
	s := &summarizer{seen: make(chan struct{}, 100)}
	up.Intercept(func(r fakeai.ChatRequest) (fakeai.Reply, bool) {
		sys := r.System()
		s.mu.Lock()
		switch {
		case strings.HasPrefix(sys, "You keep the running summary"):
			s.summaries = append(s.summaries, r)
			n := len(s.summaries)
			fail := s.fail > 0
			if fail {
				s.fail--
			}
			gate := s.gate
			s.mu.Unlock()
			s.seen <- struct{}{}
			if gate != nil {
				<-gate
			}
			if fail {
				return fakeai.Reply{Status: http.StatusInternalServerError, ErrorMessage: "summarizer down"}, true
			}
			in, _ := r.Messages[1]["content"].(string)
			facts := strings.Join(unique(factRE.FindAllString(in, -1)), " ")
			return fakeai.Reply{Content: fmt.Sprintf("SUMMARY-%d knows %s", n, facts),
				Usage: &fakeai.Usage{PromptTokens: 1000, CompletionTokens: 50}}, true
		case sys == compaction.TitlePrompt:
			s.titles = append(s.titles, r)
			s.mu.Unlock()
			return fakeai.Reply{Content: "\"Weather in Paris.\"", Usage: &fakeai.Usage{PromptTokens: 100, CompletionTokens: 5}}, true
		}
		s.chats = append(s.chats, r)
		s.mu.Unlock()
		return fakeai.Reply{}, false
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

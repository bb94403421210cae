package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// runCommand runs historyproxy with args, as main does, and returns what it
// printed.
func runCommand(t *testing.T, env map[string]string, args ...string) (string, error) {
	t.Helper()
	var out, errs bytes.Buffer
	err := cli(context.Background(), args, func(k string) string { return env[k] }, &out, &errs)
	return out.String(), err
}

// stamps are the times a transcript shows; they change from run to run.
var stamps = regexp.MustCompile(`\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ`)

// TestTranscriptCommand: a conversation with a tool call (two calls in one
// message, answered by the app with only their results), a refusal and a
// stream cut by the client, printed from Redis by historyproxy transcript
// while the proxy runs.
func TestTranscriptCommand(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}
	p := start(t, env)
	ctx := context.Background()
	const id = "chat:john@example.com:support"
	c := p.client(id)
	ask := func(msgs ...openai.ChatCompletionMessageParamUnion) {
		t.Helper()
		_, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: openai.ChatModelGPT4oMini, Messages: msgs})
		require.NoError(t, err)
	}
	up.Enqueue(fakeai.Reply{Content: "Hello John!", Usage: &fakeai.Usage{PromptTokens: 12, CompletionTokens: 3}})
	ask(openai.SystemMessage("be brief"), openai.UserMessage("Hi, I am John.\nI live in Paris."))
	up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{
		{ID: "call_w", Name: "weather", Arguments: `{"city":"Paris"}`},
		{ID: "call_t", Name: "time", Arguments: `{"tz":"Europe/Paris"}`},
	}, Usage: &fakeai.Usage{PromptTokens: 40, CompletionTokens: 20}})
	ask(openai.UserMessage("Weather and time at home?"))
	up.Enqueue(fakeai.Reply{Content: "21 °C and 14:05 in Paris.", Usage: &fakeai.Usage{PromptTokens: 80, CompletionTokens: 9, CachedTokens: 64}})
	ask(openai.ToolMessage(`{"temp":21}`, "call_w"), openai.ToolMessage(`{"time":"14:05"}`, "call_t"))
	up.Enqueue(fakeai.Reply{Refusal: "I can't share that.", Usage: &fakeai.Usage{PromptTokens: 90, CompletionTokens: 5}})
	ask(openai.UserMessage("What is my neighbour's password?"))
	// A stream the client leaves after its first words.
	gate := make(chan struct{})
	defer close(gate)
	up.Enqueue(fakeai.Reply{Content: "Once upon a time there was", Gate: gate, GateAfter: 2})
	sctx, cancel := context.WithCancel(ctx)
	stream := c.Chat.Completions.NewStreaming(sctx, openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Tell me a long story")},
	})
	for i := 0; i < 2; i++ {
		require.True(t, stream.Next(), "chunk %d", i)
	}
	cancel()
	_ = stream.Close()

	var out string
	require.Eventually(t, func() bool {
		var err error
		out, err = runCommand(t, env, "transcript", id)
		return err == nil && strings.Contains(out, "INCOMPLETE")
	}, 20*time.Second, 20*time.Millisecond, "the cut stream is recorded")
	got := stamps.ReplaceAllString(out, "YYYY-MM-DD hh:mm:ssZ")
	golden := filepath.Join("testdata", "transcript.golden")
	if *update {
		require.NoError(t, os.MkdirAll("testdata", 0o755))
		require.NoError(t, os.WriteFile(golden, []byte(got), 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err)
	require.Equal(t, string(want), got)

	// The same as JSON, flags after the id and the store given as a flag.
	out, err = runCommand(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "transcript", id, "-json", "-redis-url", rs.URL, "-conversation", "c1")
	require.NoError(t, err)
	var tr Transcript
	require.NoError(t, json.Unmarshal([]byte(out), &tr))
	require.Equal(t, id, tr.Session.ID)
	require.Equal(t, "c1", tr.Conversation.ID)
	require.Len(t, tr.Messages, 11)
	require.Equal(t, "tool_call", tr.Messages[3].Kind)

	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"transcript"}, "takes one session id"},
		{[]string{"transcript", "a", "b"}, "takes one session id"},
		{[]string{"transcript", "nope"}, "must be channel:user:agent"},
		{[]string{"transcript", "chat:nobody:support"}, `no session "chat:nobody:support"`},
		{[]string{"transcript", id, "-conversation", "c7"}, `has no conversation "c7"`},
		{[]string{"transcript", id, "-color"}, "flag provided but not defined: -color"},
	} {
		_, err := runCommand(t, env, bad.args...)
		require.ErrorContains(t, err, bad.want, bad.args)
	}
}

// turnBetweenReads is a store in which a turn is appended just after the
// transcript's first read of the session, as the running proxy may do.
type turnBetweenReads struct {
	*history.MemoryStore
	turn func()
}

func (s *turnBetweenReads) Session(ctx context.Context, id string) (history.Session, bool, error) {
	got, ok, err := s.MemoryStore.Session(ctx, id)
	if s.turn != nil {
		s.turn()
		s.turn = nil
	}
	return got, ok, err
}

// TestTranscriptIsOneMoment: a turn appended while the transcript is
// being read shows in its messages and in its header's totals, or in
// neither (the reads were: the totals without the messages' turn).
func TestTranscriptIsOneMoment(t *testing.T) {
	ctx := context.Background()
	const id = "chat:ann:support"
	mem := history.NewMemory()
	turn := func(text string, ms int64) {
		_, err := mem.Append(ctx, id, history.Turn{NowMs: ms, Usage: history.Usage{PromptTokens: 10, Requests: 1},
			Messages: []history.Message{{Role: history.RoleUser, Content: text}, {Role: history.RoleAssistant, Content: "ok"}}}, history.Policy{})
		require.NoError(t, err)
	}
	turn("first", 1000)
	store := &turnBetweenReads{MemoryStore: mem, turn: func() { turn("second", 2000) }}
	snap, err := readTranscript(ctx, store, id, "")
	require.NoError(t, err)
	require.Len(t, snap.messages, 4, "the turn appended during the read")
	require.EqualValues(t, 2, snap.session.Totals.Requests, "the header counts the turn its messages show")
	require.EqualValues(t, 4, snap.session.MessageCount)

	_, err = readTranscript(ctx, mem, "chat:bob:support", "")
	require.ErrorIs(t, err, errNoSession)
	_, err = readTranscript(ctx, mem, id, "c9")
	require.ErrorContains(t, err, `has no conversation "c9"`)
}

func TestSessionsAndEraseCommands(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}
	p := start(t, env)
	e := &adminEnv{p: p, up: up}
	e.chat(t, "web:ann:support", "My printer is on fire")
	e.chat(t, "web:bob:sales", "Ten licences please")
	e.chat(t, "api:ann:sales", "Any student discount?")

	out, err := runCommand(t, env, "sessions")
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 5, out)
	require.Regexp(t, `^SESSION\s+TITLE\s+CONVERSATION\s+MESSAGES\s+TOKENS\s+COST USD\s+LAST ACTIVE\s+ACTIVE$`, lines[0])
	require.Regexp(t, `^api:ann:sales\s+Any student discount\?\s+c1\s+2\s+\d+\s+0\.\d+\s+\S+ \S+\s+yes$`, lines[1])
	require.Equal(t, "3 of 3 sessions", lines[4])

	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"-user", "ann"}, []string{"api:ann:sales", "web:ann:support"}},
		{[]string{"--channel", "web", "--agent", "sales"}, []string{"web:bob:sales"}},
		{[]string{"-q", "PRINTER"}, []string{"web:ann:support"}},
		{[]string{"-limit", "1"}, []string{"api:ann:sales"}},
		{[]string{"-active", "false"}, nil},
	} {
		out, err := runCommand(t, env, append([]string{"sessions", "-json"}, tc.args...)...)
		require.NoError(t, err, tc.args)
		var l struct {
			Items []struct {
				ID string `json:"id"`
			} `json:"items"`
		}
		require.NoError(t, json.Unmarshal([]byte(out), &l))
		var ids []string
		for _, s := range l.Items {
			ids = append(ids, s.ID)
		}
		require.Equal(t, tc.want, ids, tc.args)
	}
	_, err = runCommand(t, env, "sessions", "-active", "maybe")
	require.ErrorContains(t, err, "-active must be true or false")
	_, err = runCommand(t, env, "sessions", "stray")
	require.ErrorContains(t, err, `unexpected argument "stray"`)

	out, err = runCommand(t, env, "erase", "web:ann:support")
	require.NoError(t, err)
	require.Contains(t, out, "erased web:ann:support: 1 conversation, 2 messages")
	_, err = runCommand(t, env, "erase", "web:ann:support")
	require.ErrorContains(t, err, `no session "web:ann:support"`)
	out, err = runCommand(t, env, "sessions", "-user", "ann")
	require.NoError(t, err)
	require.Contains(t, out, "1 of 1 sessions")
	require.NotContains(t, out, "web:ann:support")
	keys, err := rs.Client(t).Keys(context.Background(), "*web:ann:support*").Result()
	require.NoError(t, err)
	require.Empty(t, keys)
}

func TestCommandsNeedRedis(t *testing.T) {
	for _, name := range []string{"sessions", "transcript", "erase", "migrate"} {
		args := []string{name}
		if name == "transcript" || name == "erase" {
			args = append(args, "a:b:c")
		}
		_, err := runCommand(t, nil, args...)
		require.ErrorContains(t, err, "no Redis configured", name)
	}
	out, err := runCommand(t, nil, "transcript", "-h")
	require.ErrorIs(t, err, flag.ErrHelp)
	for _, want := range []string{"Usage: historyproxy transcript [flags] SESSION_ID", "-conversation", "-json", "-redis-url"} {
		require.Contains(t, out, want)
	}
	var help bytes.Buffer
	err = cli(context.Background(), []string{"-h"}, func(string) string { return "" }, io.Discard, &help)
	require.ErrorIs(t, err, flag.ErrHelp)
	for _, name := range []string{"sessions", "transcript SESSION_ID", "erase SESSION_ID", "migrate"} {
		require.Contains(t, help.String(), "historyproxy "+name)
	}
}

// TestMigrateCommand: a session stored by an older version (one stream per
// conversation) is moved by historyproxy migrate while the proxy runs, and
// its next request gets that history.
func TestMigrateCommand(t *testing.T) {
	rs := redistest.Start(t)
	rc := rs.Client(t)
	ctx := context.Background()
	const id = "chat:ann:support"
	base := "hp:{" + id + "}:"
	require.NoError(t, rc.ZAdd(ctx, base+"convs", redis.Z{Score: 1_700_000_000_000, Member: "c1"}).Err())
	for i, m := range []struct{ role, content string }{{"user", "My name is Ann."}, {"assistant", "Hello Ann."}} {
		require.NoError(t, rc.XAdd(ctx, &redis.XAddArgs{Stream: base + "conv:c1", ID: fmt.Sprintf("1700000000000-%d", i), Values: []any{
			"role", m.role, "content", m.content, "kind", "message", "tokens", "6", "created_ms", "1700000000000", "status", "complete",
		}}).Err())
	}
	require.NoError(t, rc.HSet(ctx, base+"session", "conversation", "c1", "is_active", "1", "created_ms", "1700000000000",
		"last_active_ms", "1700000000000", "messages", "2", "conversations", "1", "requests", "1").Err())
	require.NoError(t, rc.ZAdd(ctx, "hp:sessions", redis.Z{Score: 1_700_000_000_000, Member: id}).Err())

	up := fakeai.New(t)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}
	p := start(t, env)
	out, err := runCommand(t, env, "migrate")
	require.NoError(t, err)
	require.Equal(t, "migrated 1 session (1 conversation, 2 messages); 0 sessions already in the current layout\n", out)
	e := &adminEnv{p: p, up: up}
	require.Equal(t, "echo: What is my name? [messages=3]", e.chat(t, id, "What is my name?"), "the old conversation is the history")
	out, err = runCommand(t, env, "migrate")
	require.NoError(t, err)
	require.Equal(t, "migrated 0 sessions (0 conversations, 0 messages); 1 session already in the current layout\n", out)
	keys, err := rc.Keys(ctx, base+"conv*").Result()
	require.NoError(t, err)
	require.Equal(t, []string{base + "conversations"}, keys)
}

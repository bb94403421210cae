package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// openaiClient is the SDK's client of the proxy at addr, for session.
func openaiClient(addr, session string) *openai.Client {
	c := openai.NewClient(option.WithBaseURL("http://"+addr+"/v1/"), option.WithAPIKey("k"),
		option.WithHeader("X-Session-ID", session), option.WithMaxRetries(0))
	return &c
}

// writeConfigFile writes a YAML configuration for a test and returns its
// path.
func writeConfigFile(t *testing.T, yaml string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, []byte(yaml), 0o600))
	return path
}

// userText is the text of a message as the fake upstream received it.
func userText(m map[string]any) string {
	s, _ := m["content"].(string)
	return m["role"].(string) + ":" + s
}

// TestOrderedTurnsAcrossInstances: 20 turns fired at one session at once,
// through two proxy instances on one Redis, all succeed, are stored as 20
// whole turns one after the other, and each turn's upstream request
// carries every turn stored before it.
func TestOrderedTurnsAcrossInstances(t *testing.T) {
	up := fakeai.New(t)
	// The upstream takes a while, so that the requests overlap.
	up.SetDefault(func(req fakeai.ChatRequest) fakeai.Reply {
		r := fakeai.EchoReply(req)
		r.HeaderDelay = 20 * time.Millisecond
		return r
	})
	rs := redistest.Start(t)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}
	cfg := writeConfigFile(t, "defaults:\n  max_messages: 100\n  max_tokens: 100000\n")
	a, b := start(t, env, "-config", cfg), start(t, env, "-config", cfg)
	const session, turns = "chat:race@example.com:support", 20

	var wg sync.WaitGroup
	errs := make(chan error, turns)
	for i := range turns {
		p := a
		if i%2 == 1 {
			p = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := p.client(session)
			params := openai.ChatCompletionNewParams{Model: openai.ChatModelGPT4oMini,
				Messages: []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("be brief"), openai.UserMessage(fmt.Sprintf("turn %d", i))}}
			if i%4 < 2 {
				res, err := c.Chat.Completions.New(context.Background(), params)
				if err == nil && !strings.HasPrefix(res.Choices[0].Message.Content, "echo: turn") {
					err = fmt.Errorf("turn %d: reply %q", i, res.Choices[0].Message.Content)
				}
				errs <- err
				return
			}
			stream := c.Chat.Completions.NewStreaming(context.Background(), params)
			for stream.Next() {
			}
			errs <- stream.Err()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}

	// 20 whole turns, each a user message and its reply.
	entries, err := rs.Client(t).XRange(context.Background(), "hp:{"+session+"}:messages", "-", "+").Result()
	require.NoError(t, err)
	require.Len(t, entries, 2*turns)
	var order []string // the user messages, as stored
	for k := 0; k < turns; k++ {
		u, r := entries[2*k].Values, entries[2*k+1].Values
		require.Equal(t, "user", u["role"], "entry %d", 2*k)
		require.Equal(t, "assistant", r["role"], "entry %d", 2*k+1)
		require.True(t, strings.HasPrefix(r["content"].(string), "echo: "+u["content"].(string)+" "),
			"turn %d: reply %q does not follow its question %q", k, r["content"], u["content"])
		order = append(order, u["content"].(string))
	}

	// Turn k's upstream request carried turns 1..k-1, in the stored order.
	byTurn := map[string][]map[string]any{}
	for _, r := range up.Requests() {
		if r.Chat != nil {
			msgs := r.Chat.Messages
			byTurn[userText(msgs[len(msgs)-1])] = msgs
		}
	}
	for k, q := range order {
		msgs := byTurn["user:"+q]
		require.NotNil(t, msgs, "no upstream request for %q", q)
		want := []string{"system:be brief"}
		for j := range k {
			want = append(want, "user:"+order[j], "assistant:"+entries[2*j+1].Values["content"].(string))
		}
		want = append(want, "user:"+q)
		var got []string
		for _, m := range msgs {
			got = append(got, userText(m))
		}
		require.Equal(t, want, got, "turn %d (%q)", k+1, q)
	}
}

// busyAnswer sends one chat request and returns its status, Retry-After
// and error code.
func busyAnswer(t *testing.T, addr, session string, hdr map[string]string) (int, string, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"me too"}]}`))
	require.NoError(t, err)
	req.Header.Set("X-Session-ID", session)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	var body struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, resp.Header.Get("Retry-After"), body.Error.Code
}

// TestBusySessionAnswers: while a turn is generating, ordering: reject
// answers 409 conversation_busy at once and ordering: wait after
// ordering_timeout, both with Retry-After; X-History: off and another
// session are served meanwhile.
func TestBusySessionAnswers(t *testing.T) {
	for _, store := range []string{"memory", "redis"} {
		t.Run(store, func(t *testing.T) {
			up := fakeai.New(t)
			env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}
			if store == "redis" {
				env["HISTORYPROXY_REDIS_URL"] = redistest.Start(t).URL
			}
			cfg := writeConfigFile(t, "agents:\n  fast:\n    ordering: reject\n  slow:\n    ordering_timeout: 200ms\n")
			p := start(t, env, "-config", cfg)
			for _, agent := range []string{"fast", "slow"} {
				// A turn answered gives the agent its own label (the
				// rejections of an agent no answered request has named yet
				// count under "other", as for any request not forwarded).
				status, _, _ := busyAnswer(t, p.addrs.Proxy, "chat:warm:"+agent, nil)
				require.Equal(t, http.StatusOK, status)
			}
			for _, agent := range []string{"fast", "slow"} {
				session := "chat:ann:" + agent
				gate := make(chan struct{})
				up.Enqueue(fakeai.Reply{Content: "a long answer", Gate: gate, GateAfter: 1})
				stream := p.client(session).Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
					Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("first")}})
				require.True(t, stream.Next(), "the first turn streams")

				status, retry, code := busyAnswer(t, p.addrs.Proxy, session, nil)
				require.Equal(t, http.StatusConflict, status, agent)
				require.Equal(t, "conversation_busy", code)
				require.Equal(t, "1", retry)
				status, _, _ = busyAnswer(t, p.addrs.Proxy, session, map[string]string{"X-History": "off"})
				require.Equal(t, http.StatusOK, status, "X-History: off never waits")
				status, _, _ = busyAnswer(t, p.addrs.Proxy, "chat:bob:"+agent, nil)
				require.Equal(t, http.StatusOK, status, "another session is not held up")

				close(gate)
				for stream.Next() {
				}
				require.NoError(t, stream.Err())
				status, _, _ = busyAnswer(t, p.addrs.Proxy, session, nil)
				require.Equal(t, http.StatusOK, status, "the session is free once the turn is recorded")
			}
			metrics := scrapeMetrics(t, p.addrs.Admin)
			require.Equal(t, 1.0, metrics[`historyproxy_busy_rejections_total{agent="fast",channel="chat",reason="reject"}`])
			require.Equal(t, 0.0, metrics[`historyproxy_busy_rejections_total{agent="fast",channel="chat",reason="timeout"}`])
			require.Equal(t, 1.0, metrics[`historyproxy_busy_rejections_total{agent="slow",channel="chat",reason="timeout"}`])
			require.Equal(t, 0.0, metrics[`historyproxy_busy_rejections_total{agent="slow",channel="chat",reason="reject"}`])
			require.Equal(t, 0.0, metrics["historyproxy_active_generations"])
			require.Contains(t, metrics, `historyproxy_lease_wait_seconds_count{agent="fast",channel="chat"}`)
		})
	}
}

// TestLeaseHolderKilled: a process holding a session's turn is killed
// (SIGKILL) mid-stream; a request of the session waiting on another
// instance takes the turn over once the lease expires, and is served with
// the history as it was (the killed turn recorded nothing).
func TestLeaseHolderKilled(t *testing.T) {
	buildBinary(t) // skips in -short mode before anything starts
	up := fakeai.New(t)
	rs := redistest.Start(t)
	cfg := writeConfigFile(t, "store:\n  lease_ttl: 1s\n")
	gate := make(chan struct{})
	defer close(gate)
	up.Enqueue(fakeai.Reply{Content: "never finished", Gate: gate, GateAfter: 1})
	victim := startBinary(t, nil, "-upstream", up.URL, "-redis-url", rs.URL, "-config", cfg)
	other := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}, "-config", cfg)
	const session = "chat:kill@example.com:support"

	c := openaiClient(victim.addr, session)
	stream := c.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("doomed")}})
	require.True(t, stream.Next(), "the victim streams its first chunk")

	done := make(chan error, 1)
	var reply string
	go func() {
		res, err := other.client(session).Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
			Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("still there?")}})
		if err == nil {
			reply = res.Choices[0].Message.Content
		}
		done <- err
	}()
	rc := rs.Client(t)
	queue := "hp:{" + session + "}:queue"
	for deadline := time.Now().Add(20 * time.Second); rc.LLen(context.Background(), queue).Val() != 1; {
		require.True(t, time.Now().Before(deadline), "the second request never queued")
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("the second request did not wait for the turn: %v", err)
	case <-time.After(1500 * time.Millisecond):
		// The holder renews its 1 s lease: the waiter still waits.
	}

	require.NoError(t, victim.cmd.Process.Signal(syscall.SIGKILL))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("the waiting request never took the turn over")
	}
	require.Equal(t, "echo: still there? [messages=1]", reply, "the killed turn recorded nothing")
	n, err := rc.XLen(context.Background(), "hp:{"+session+"}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 2, n)
	require.Zero(t, rc.Exists(context.Background(), "hp:{"+session+"}:lease").Val(), "the turn was given back")
	require.Zero(t, rc.LLen(context.Background(), queue).Val(), "no one is left in the queue")
}

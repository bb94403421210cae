package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/tokens"
)

// countingObserver counts the retry queue's events.
type countingObserver struct {
	discard
	mu               sync.Mutex
	ok, failed, drop int
}

func (o *countingObserver) RetryAttempt(ok bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if ok {
		o.ok++
	} else {
		o.failed++
	}
}

func (o *countingObserver) RetryDropped() { o.mu.Lock(); o.drop++; o.mu.Unlock() }

func redisProxy(t *testing.T, rs *redistest.Server, up *fakeai.Server, mod func(*Options)) (*Proxy, *httptest.Server) {
	t.Helper()
	u, err := url.Parse(up.URL)
	require.NoError(t, err)
	// As main builds it: a context's deadline bounds each command.
	client := redis.NewClient(&redis.Options{Addr: rs.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	opt := Options{
		Upstream: u, Store: history.NewRedis(client, ""), Counter: sharedCounter, Catalog: tokens.NewCatalog(nil),
		Agent: defaultAgent, DefaultChannel: "api", DefaultAgent: "default",
		StoreTimeout: 300 * time.Millisecond, RetryQueue: 10000,
	}
	if mod != nil {
		mod(&opt)
	}
	px, err := New(opt)
	require.NoError(t, err)
	srv := httptest.NewServer(px.Handler())
	t.Cleanup(srv.Close)
	return px, srv
}

// TestRedisOutageLosesNoAcknowledgedTurn: under a steady load of
// multi-turn conversations the test's redis-server is killed, kept down,
// and started again on the same AOF data. Every turn answered 2xx must
// end up in Redis, in order, exactly once.
func TestRedisOutageLosesNoAcknowledgedTurn(t *testing.T) {
	rs := redistest.Start(t, redistest.WithAOF())
	up := fakeai.New(t)
	up.SetDefault(func(r fakeai.ChatRequest) fakeai.Reply {
		return fakeai.Reply{Content: "re: " + r.Messages[len(r.Messages)-1]["content"].(string)}
	})
	obs := &countingObserver{}
	px, srv := redisProxy(t, rs, up, func(o *Options) { o.Metrics = obs })

	const sessions = 4
	stop := make(chan struct{})
	acked := make([][]string, sessions)
	var degraded sync.Map
	var wg sync.WaitGroup
	for s := 0; s < sessions; s++ {
		wg.Add(1)
		go func() { // stops when stop is closed, or after 2000 turns
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				msg := fmt.Sprintf("s%d-t%d", s, i)
				req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(chatBody(user(msg))))
				req.Header.Set("X-Session-ID", fmt.Sprintf("load:u%d:a", s))
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					continue
				}
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					acked[s] = append(acked[s], msg)
					if resp.Header.Get("X-History") == "degraded" {
						degraded.Store(msg, true)
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}

	time.Sleep(500 * time.Millisecond)
	rs.Stop(t)
	time.Sleep(2 * time.Second) // down for a while, under load
	rs.Restart(t)
	time.Sleep(1 * time.Second)
	close(stop)
	wg.Wait()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(t, px.Close(ctx), "the retry queue drains once Redis is back")

	n := 0
	degraded.Range(func(any, any) bool { n++; return true })
	require.Positive(t, n, "some turns were answered while Redis was down")
	obs.mu.Lock()
	require.Positive(t, obs.failed, "retries failed while Redis was down")
	require.Zero(t, obs.drop)
	obs.mu.Unlock()

	store := history.NewRedis(rs.Client(t), "")
	for s := 0; s < sessions; s++ {
		msgs, err := store.Messages(context.Background(), fmt.Sprintf("load:u%d:a", s), "")
		require.NoError(t, err)
		var users []string
		for i, m := range msgs {
			if m.Role == history.RoleUser {
				users = append(users, m.Content)
				require.Less(t, i+1, len(msgs))
				require.Equal(t, "re: "+m.Content, msgs[i+1].Content, "each turn is whole")
			}
		}
		require.Equal(t, acked[s], users, "session %d: every acknowledged turn, in order, exactly once", s)
	}
}

func TestFailClosedRefusesWhenRedisIsDown(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	_, srv := redisProxy(t, rs, up, func(o *Options) { o.FailClosed = true })
	rs.Stop(t)
	resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(
		`{"model":"gpt-4o","user":"u1","messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assertOpenAIError(t, readAll(t, resp), "history_unavailable")
	require.Empty(t, up.Requests(), "nothing is forwarded")
}

func TestFailOpenServesWithoutHistoryAndRetries(t *testing.T) {
	rs := redistest.Start(t, redistest.WithAOF())
	up := fakeai.New(t)
	px, srv := redisProxy(t, rs, up, nil)
	rs.Stop(t)
	post := func(msg string) *http.Response {
		resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(
			`{"model":"gpt-4o","user":"u1","messages":[{"role":"user","content":"`+msg+`"}]}`))
		require.NoError(t, err)
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	r := post("while down")
	require.Equal(t, http.StatusOK, r.StatusCode)
	require.Equal(t, "degraded", r.Header.Get("X-History"))
	rs.Restart(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.True(t, px.retry.drain(ctx, 10*time.Second), "the queued turn is written once Redis is back")
	r = post("after")
	require.Equal(t, http.StatusOK, r.StatusCode)
	require.Empty(t, r.Header.Get("X-History"))
	require.Equal(t, "2", r.Header.Get("X-History-Messages"), "the queued turn was written and is injected")
}

func TestRetryQueueBoundDropsAndCounts(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	obs := &countingObserver{}
	px, srv := redisProxy(t, rs, up, func(o *Options) { o.RetryQueue = 2; o.Metrics = obs })
	rs.Stop(t)
	for i := 0; i < 4; i++ {
		resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(
			`{"model":"gpt-4o","user":"u1","messages":[{"role":"user","content":"x"}]}`))
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	obs.mu.Lock()
	require.Equal(t, 2, obs.drop, "two turns past the bound are dropped")
	obs.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	require.EqualError(t, px.Close(ctx), "2 turns could not be written to the store", "Close reports turns it could not write")
	obs.mu.Lock()
	require.Equal(t, 4, obs.drop, "the two left in the queue count as dropped too")
	obs.mu.Unlock()
	require.EqualValues(t, 4, px.LostTurns())
}

// TestRetryQueueByteBound: while Redis is down, turns wait in the retry
// queue until their bytes would pass store.retry_queue_bytes; the rest
// are dropped and counted, and the queued ones are written once Redis is
// back.
func TestRetryQueueByteBound(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	obs := &countingObserver{}
	const big = 300 << 10 // each turn holds its 300 KB question and the reply
	_, srv := redisProxy(t, rs, up, func(o *Options) { o.RetryQueueBytes = 1 << 20; o.Metrics = obs })
	rs.Stop(t)
	text := strings.Repeat("x", big)
	for i := range 5 {
		resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(
			fmt.Sprintf(`{"model":"gpt-4o","user":"u%d","messages":[{"role":"user","content":%q}]}`, i, text)))
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, "failing open, the answer goes out")
	}
	obs.mu.Lock()
	// The echo reply is as long: 600 KB a turn, one fits in 1 MiB.
	require.Equal(t, 4, obs.drop, "turns past the byte bound are dropped, however few")
	obs.mu.Unlock()
	rs.Restart(t)
	c := rs.Client(t)
	require.Eventually(t, func() bool { return c.Exists(context.Background(), "hp:{api:u0:default}:messages").Val() == 1 }, 20*time.Second, 20*time.Millisecond,
		"the queued turn is written once Redis is back")
	for i := 1; i < 5; i++ {
		require.Zero(t, c.Exists(context.Background(), fmt.Sprintf("hp:{api:u%d:default}:messages", i)).Val(), "turn %d was dropped", i)
	}
}

// TestCloseGivesUpOnlyWithoutProgress: Close keeps writing past
// its first attempts as long as turns go through, and gives up only when
// the store stops taking them.
func TestCloseGivesUpOnlyWithoutProgress(t *testing.T) {
	rs := redistest.Start(t, redistest.WithAOF())
	up := fakeai.New(t)
	obs := &countingObserver{}
	px, srv := redisProxy(t, rs, up, func(o *Options) { o.Metrics = obs })
	rs.Stop(t)
	for i := 0; i < 5; i++ {
		resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(
			fmt.Sprintf(`{"model":"gpt-4o","user":"u%d","messages":[{"role":"user","content":"x"}]}`, i)))
		require.NoError(t, err)
		resp.Body.Close()
	}
	rs.Restart(t)
	require.NoError(t, px.Close(context.Background()), "the store is back: every queued turn is written")
	obs.mu.Lock()
	require.Zero(t, obs.drop)
	obs.mu.Unlock()
	for i := 0; i < 5; i++ {
		n, err := rs.Client(t).XLen(context.Background(), fmt.Sprintf("hp:{api:u%d:default}:messages", i)).Result()
		require.NoError(t, err)
		require.EqualValues(t, 2, n)
	}
}

// TestRetryQueueOneBadSessionDoesNotBlockOthers: a turn that keeps failing
// for its own reason must not hold the other sessions' turns.
func TestRetryQueueOneBadSessionDoesNotBlockOthers(t *testing.T) {
	rs := redistest.Start(t)
	client := rs.Client(t)
	store := history.NewRedis(client, "")
	q := newRetryQueue(store, 10, 0, time.Second, discard{}, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The bad session's hash is a string: every append to it fails.
	require.NoError(t, client.Set(ctx, "hp:{c:bad:a}:session", "not a hash", 0).Err())
	turn := func(msg string) history.Turn {
		return history.Turn{NowMs: time.Now().UnixMilli(), IdempotencyKey: msg,
			Messages: []history.Message{{Role: history.RoleUser, Content: msg}}}
	}
	require.True(t, q.push(pendingTurn{session: "c:bad:a", turn: turn("b1")}))
	require.True(t, q.push(pendingTurn{session: "c:good:a", turn: turn("g1")}))
	go q.run(ctx)
	require.Eventually(t, func() bool {
		msgs, err := store.Messages(ctx, "c:good:a", "")
		return err == nil && len(msgs) == 1
	}, 5*time.Second, 20*time.Millisecond, "the good session's turn is written while the bad one keeps failing")
}

// TestFailClosedChecksTheStoreBeforeForwarding: a request that carries its
// own history needs no read, but it must still find the store answering
// before anything is forwarded once a failure was seen.
func TestFailClosedChecksTheStoreBeforeForwarding(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	_, srv := redisProxy(t, rs, up, func(o *Options) { o.FailClosed = true })
	own := `{"model":"gpt-4o","user":"u1","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]}`
	post := func(body string) int {
		resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	rs.Stop(t)
	// The first failure is found on the write, after the upstream answered.
	require.Equal(t, http.StatusServiceUnavailable, post(own))
	require.Len(t, up.Requests(), 1)
	// From then on, nothing is forwarded while the store is down.
	require.Equal(t, http.StatusServiceUnavailable, post(own))
	require.Len(t, up.Requests(), 1, "nothing forwarded once the store is known to be down")
	rs.Restart(t)
	require.Equal(t, http.StatusOK, post(own), "a ping finds the store back")
	require.Len(t, up.Requests(), 2)
}

// TestDegradedHeaderSentOnce: during an outage the read and the write of a
// whole reply both fail; the answer says so once, not "degraded, degraded".
func TestDegradedHeaderSentOnce(t *testing.T) {
	rs := redistest.Start(t)
	up := fakeai.New(t)
	_, srv := redisProxy(t, rs, up, nil)
	rs.Stop(t)
	for _, stream := range []bool{false, true} {
		resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(
			fmt.Sprintf(`{"model":"gpt-4o","user":"u1","stream":%t,"messages":[{"role":"user","content":"hi"}]}`, stream)))
		require.NoError(t, err)
		readAll(t, resp)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, []string{"degraded"}, resp.Header.Values("X-History"), "stream=%t", stream)
	}
}

// TestRepeatedKeyThroughRetryQueueCountsUsage: a client repeats a recorded
// request (same Idempotency-Key) while Redis is down; its turn waits in the
// retry queue. Once written, no second turn is stored, but the repeat's
// upstream call is counted, as for a repeat that meets a working store.
func TestRepeatedKeyThroughRetryQueueCountsUsage(t *testing.T) {
	rs := redistest.Start(t, redistest.WithAOF())
	up := fakeai.New(t)
	px, srv := redisProxy(t, rs, up, nil)
	const sid = "api:rep:default"
	post := func() *http.Response {
		req, err := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(
			`{"model":"gpt-4o","messages":[{"role":"user","content":"once"}]}`))
		require.NoError(t, err)
		req.Header.Set("X-Session-ID", sid)
		req.Header.Set("Idempotency-Key", "client-k1")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp
	}
	up.Enqueue(fakeai.Reply{Content: "one", Usage: &fakeai.Usage{PromptTokens: 10, CompletionTokens: 2}})
	require.Equal(t, http.StatusOK, post().StatusCode)

	rs.Stop(t)
	up.Enqueue(fakeai.Reply{Content: "one", Usage: &fakeai.Usage{PromptTokens: 10, CompletionTokens: 2}})
	r := post()
	require.Equal(t, http.StatusOK, r.StatusCode)
	require.Equal(t, "degraded", r.Header.Get("X-History"), "the repeat's turn waits in the queue")
	rs.Restart(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.True(t, px.retry.drain(ctx, 10*time.Second))

	s, ok, err := history.NewRedis(rs.Client(t), "").Session(context.Background(), sid)
	require.NoError(t, err)
	require.True(t, ok)
	require.EqualValues(t, 2, s.MessageCount, "the turn is stored once")
	require.EqualValues(t, 2, s.Totals.Requests, "both upstream calls are counted")
	require.EqualValues(t, 20, s.Totals.PromptTokens)
	require.EqualValues(t, 4, s.Totals.CompletionTokens)
}

// TestRetryQueueCountsARepeatOnce: the retry queue writes a turn whose
// first write went through although its answer was lost, and a client's
// repeat of it. The first adds nothing again; the repeat adds its usage
// once.
func TestRetryQueueCountsARepeatOnce(t *testing.T) {
	rs := redistest.Start(t)
	store := history.NewRedis(rs.Client(t), "")
	const sid = "api:lost:default"
	u := history.Usage{PromptTokens: 10, Requests: 1}
	turn := func(writeKey string) history.Turn {
		return history.Turn{NowMs: time.Now().UnixMilli(), IdempotencyKey: "client-k", WriteKey: writeKey, Usage: u,
			Messages: []history.Message{{Role: history.RoleUser, Content: "q"}, {Role: history.RoleAssistant, Content: "a"}}}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The first write reached Redis; the proxy saw a timeout and queued it.
	first := turn("w-first")
	_, err := store.Append(ctx, sid, first, history.Policy{})
	require.NoError(t, err)
	q := newRetryQueue(store, 10, 0, 5*time.Second, discard{}, slog.New(slog.DiscardHandler))
	require.True(t, q.push(pendingTurn{session: sid, turn: first}))
	require.True(t, q.push(pendingTurn{session: sid, turn: turn("w-repeat")}))
	go q.run(ctx)
	dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
	defer dcancel()
	require.True(t, q.drain(dctx, 10*time.Second))
	s, _, err := store.Session(ctx, sid)
	require.NoError(t, err)
	require.EqualValues(t, 2, s.MessageCount)
	require.EqualValues(t, 2, s.Totals.Requests, "the first write once, the repeat once")
	require.EqualValues(t, 20, s.Totals.PromptTokens)
}

// landsButTimesOut is a store whose writes land but answer a timeout, as
// a Redis that took the script after the proxy's deadline had passed.
type landsButTimesOut struct {
	Store
	fail atomic.Bool
}

func (s *landsButTimesOut) Append(ctx context.Context, session string, t history.Turn, p history.Policy) (history.AppendResult, error) {
	res, err := s.Store.Append(ctx, session, t, p)
	if err == nil && s.fail.Swap(false) {
		return res, fmt.Errorf("append: %w", context.DeadlineExceeded)
	}
	return res, err
}

// TestFailClosedRetryOfALandedWriteStoresOnce: failing closed, a write
// that timed out but landed answers 503 (or cuts the stream) and names the
// turn's key; a retry that carries it stores nothing twice.
func TestFailClosedRetryOfALandedWriteStoresOnce(t *testing.T) {
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("stream=%t", stream), func(t *testing.T) {
			store := &landsButTimesOut{}
			h := newHarness(t, func(o *Options) { store.Store = o.Store; o.Store = store; o.FailClosed = true })
			body := fmt.Sprintf(`{"model":"gpt-4o-mini","stream":%t,"messages":[%s]}`, stream, user("hi"))
			session := fmt.Sprintf("c:landed%t:a", stream)
			store.fail.Store(true)
			first := h.do(t, "/v1/chat/completions", body, map[string]string{"X-Session-ID": session})
			raw, err := io.ReadAll(first.Body) // a cut stream ends in an error
			require.Equal(t, stream, err != nil, "%v", err)
			got := string(raw)
			key := first.Header.Get("X-Message-ID")
			require.NotEmpty(t, key, "the answer names the turn's key")
			if stream {
				require.NotContains(t, got, "[DONE]", "the stream is cut before its end")
			} else {
				require.Equal(t, http.StatusServiceUnavailable, first.StatusCode)
				assertOpenAIError(t, got, "history_unavailable")
				require.Contains(t, got, "X-Message-ID: "+key)
			}
			require.Len(t, h.stored(t, session), 2, "the write landed")

			retry := h.do(t, "/v1/chat/completions", body, map[string]string{"X-Session-ID": session, "X-Message-ID": key})
			readAll(t, retry)
			require.Equal(t, http.StatusOK, retry.StatusCode)
			require.Equal(t, key, retry.Header.Get("X-Message-ID"))
			require.Len(t, h.stored(t, session), 2, "the retry stores the turn once")
		})
	}
}

// TestRetriedTurnIsToldAfterIt: a turn written from the retry queue once
// the store is back is handed to AfterTurn like one written at once, so
// its conversation's compaction and (for a first turn) its title are
// queued. It was not: a conversation begun during an outage never got its
// generated title.
func TestRetriedTurnIsToldAfterIt(t *testing.T) {
	rs := redistest.Start(t, redistest.WithAOF())
	up := fakeai.New(t)
	var mu sync.Mutex
	var told []Recorded
	px, srv := redisProxy(t, rs, up, func(o *Options) {
		o.AfterTurn = func(r Recorded) { mu.Lock(); told = append(told, r); mu.Unlock() }
	})
	rs.Stop(t)
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(
		`{"model":"gpt-4o","messages":[{"role":"user","content":"while down"}]}`))
	req.Header.Set("X-Session-ID", "web:ann:support")
	req.Header.Set("Authorization", "Bearer sk-client")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, "degraded", resp.Header.Get("X-History"))
	rs.Restart(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.True(t, px.retry.drain(ctx, 10*time.Second), "the queued turn is written once Redis is back")
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []Recorded{{Session: "web:ann:support", Channel: "web", Agent: "support", Conversation: "c1", Model: "gpt-4o",
		Auth: "Bearer sk-client", Unsummarized: 2, NewConversation: true}}, told)
}

package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/openai/openai-go/option"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/tokens"
)

// listPrices are OpenAI's list prices of the models the test uses, in
// nano-USD per token (USD per 1M tokens × 1000), written out here so the
// expected costs do not come from the code under test.
var listPrices = map[string]struct{ input, cached, output int64 }{
	"gpt-4o-mini": {input: 150, cached: 75, output: 600}, // $0.15, $0.075, $0.60
	"gpt-5-nano":  {input: 50, cached: 5, output: 400},   // $0.05, $0.005, $0.40
}

// totals are what one session was billed.
type totals struct {
	prompt, completion, cached, reasoning, history, requests, nanos int64
}

func (t *totals) add(model string, prompt, completion, cached, reasoning, history int64) {
	p := listPrices[model]
	t.prompt += prompt
	t.completion += completion
	t.cached += cached
	t.reasoning += reasoning
	t.history += history
	t.requests++
	t.nanos += (prompt-cached)*p.input + cached*p.cached + completion*p.output
}

// TestAccountingUnderMixedTraffic drives answered, rate-limited, failed,
// streamed, estimated and idempotently repeated requests through the whole
// program against a real redis-server, and checks that the session totals
// in Redis and the Prometheus counters both equal the exact sum of what the
// upstream billed (its usage figures, or the local estimate when it sent
// none) at list prices: no history tokens of failed requests, no framing in
// estimated completions, no rounding.
func TestAccountingUnderMixedTraffic(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL})
	ctx := context.Background()
	counter, err := tokens.New("")
	require.NoError(t, err)

	const alice, bob = "chat:alice@example.com:support", "web:bob:sales"
	want := map[string]*totals{alice: {}, bob: {}}
	sent := 0

	// chat sends one non-streaming request and returns the history tokens
	// the proxy injected; failures are returned, not fatal.
	chat := func(session, model, text string, opts ...option.RequestOption) (history int64, err error) {
		t.Helper()
		sent++
		var resp *http.Response
		_, err = p.client(session).Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model: model, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(text)},
		}, append(opts, option.WithResponseInto(&resp))...)
		require.NotNil(t, resp)
		h, perr := strconv.ParseInt(resp.Header.Get("X-History-Tokens"), 10, 64)
		require.NoError(t, perr)
		return h, err
	}
	stream := func(session, model, text string) (history int64, content string) {
		t.Helper()
		sent++
		var resp *http.Response
		s := p.client(session).Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
			Model: model, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(text)},
		}, option.WithResponseInto(&resp))
		var acc openai.ChatCompletionAccumulator
		for s.Next() {
			acc.AddChunk(s.Current())
		}
		require.NoError(t, s.Err())
		h, err := strconv.ParseInt(resp.Header.Get("X-History-Tokens"), 10, 64)
		require.NoError(t, err)
		return h, acc.Choices[0].Message.Content
	}
	usage := func(prompt, completion, cached, reasoning int) *fakeai.Usage {
		return &fakeai.Usage{PromptTokens: prompt, CompletionTokens: completion, CachedTokens: cached, ReasoningTokens: reasoning}
	}
	// estimate is the proxy's documented estimate without upstream usage:
	// the request's messages plus the injected history for the prompt, the
	// reply's content for the completion.
	estimate := func(model, text, reply string, history int64) (prompt, completion int64) {
		return int64(counter.Messages(model, []tokens.Message{{Role: "user", Content: text}})) + history,
			int64(counter.Text(model, reply))
	}

	// Alice: answered, streamed with cached tokens, then three failures that
	// carry her history, then an answer the upstream gives no usage for.
	up.Enqueue(fakeai.Reply{Content: "Hello Alice.", Usage: usage(100, 20, 0, 0)})
	h, err := chat(alice, "gpt-4o-mini", "Hi, I am Alice.")
	require.NoError(t, err)
	want[alice].add("gpt-4o-mini", 100, 20, 0, 0, h)

	up.Enqueue(fakeai.Reply{Content: "You are Alice.", Usage: usage(150, 30, 64, 0)})
	h, _ = stream(alice, "gpt-4o-mini", "Who am I?")
	require.Positive(t, h, "history was injected")
	want[alice].add("gpt-4o-mini", 150, 30, 64, 0, h)

	for _, status := range []int{http.StatusTooManyRequests, http.StatusInternalServerError, http.StatusTooManyRequests} {
		up.Enqueue(fakeai.Reply{Status: status})
		h, err := chat(alice, "gpt-4o-mini", "Still there?")
		require.Error(t, err)
		require.Positive(t, h, "history was injected into the failed request too")
	}

	const reply = "Hello there, world."
	up.Enqueue(fakeai.Reply{Raw: []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"` + reply + `"},"finish_reason":"stop"}]}`)})
	h, err = chat(alice, "gpt-4o-mini", "Say hello.")
	require.NoError(t, err)
	prompt, completion := estimate("gpt-4o-mini", "Say hello.", reply, h)
	want[alice].add("gpt-4o-mini", prompt, completion, 0, 0, h)

	// Bob: a reasoning reply, an idempotent request repeated (the upstream
	// was called twice, so both count), a streamed reply without usage, and
	// many tiny requests whose cost is a fraction of a micro-USD each.
	up.Enqueue(fakeai.Reply{Content: "Thought about it.", Usage: usage(10, 40, 0, 32)})
	h, err = chat(bob, "gpt-5-nano", "Think.")
	require.NoError(t, err)
	want[bob].add("gpt-5-nano", 10, 40, 0, 32, h)

	for range 2 {
		up.Enqueue(fakeai.Reply{Content: "Once.", Usage: usage(20, 5, 0, 0)})
		h, err = chat(bob, "gpt-5-nano", "Only once.", option.WithHeader("Idempotency-Key", "bob-1"))
		require.NoError(t, err)
		want[bob].add("gpt-5-nano", 20, 5, 0, 0, h)
	}

	up.Enqueue(fakeai.Reply{Raw: []byte(
		"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5-nano\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello there,\"},\"finish_reason\":null}]}\n\n" +
			"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5-nano\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world.\"},\"finish_reason\":\"stop\"}]}\n\n" +
			"data: [DONE]\n\n"),
		Header: http.Header{"Content-Type": {"text/event-stream"}}})
	h, got := stream(bob, "gpt-5-nano", "Greet me.")
	require.Equal(t, reply, got)
	prompt, completion = estimate("gpt-5-nano", "Greet me.", reply, h)
	want[bob].add("gpt-5-nano", prompt, completion, 0, 0, h)

	for range 7 {
		up.Enqueue(fakeai.Reply{Content: "k", Usage: usage(11, 1, 0, 0)}) // 950 nano-USD
		h, err = chat(bob, "gpt-5-nano", "tiny", option.WithHeader("X-History", "off"))
		require.NoError(t, err)
		require.Zero(t, h)
	}
	// X-History: off records nothing and keeps no session totals, but the
	// requests are billed to the channel, agent and model.
	stateless := totals{}
	for range 7 {
		stateless.add("gpt-5-nano", 11, 1, 0, 0, 0)
	}

	// Redis: each session's all-time totals.
	rc := rs.Client(t)
	for session, w := range want {
		hash, err := rc.HGetAll(ctx, "hp:{"+session+"}:session").Result()
		require.NoError(t, err)
		for field, v := range map[string]int64{
			"prompt_tokens": w.prompt, "completion_tokens": w.completion, "cached_tokens": w.cached,
			"history_tokens": w.history, "requests": w.requests, "cost_nanos": w.nanos,
		} {
			got := hash[field]
			if got == "" {
				got = "0" // a total never added to is absent
			}
			require.Equal(t, strconv.FormatInt(v, 10), got, "%s: Redis %s", session, field)
		}
	}

	// The repeated request stored its turn once.
	n, err := rc.XLen(ctx, "hp:{"+bob+"}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 6, n, "Think, Only once (once), Greet me: three turns")

	// Prometheus: once every request has been observed.
	var m map[string]float64
	require.Eventually(t, func() bool {
		m = scrapeMetrics(t, p.addrs.Admin)
		n := 0.0
		for k, v := range m {
			if strings.HasPrefix(k, "historyproxy_requests_total{") {
				n += v
			}
		}
		return n == float64(sent)
	}, 10*time.Second, 10*time.Millisecond, "every request observed")

	series := map[string]struct {
		session, channel, agent, model string
		extra                          totals // billed requests without a session
	}{
		alice: {alice, "chat", "support", "gpt-4o-mini", totals{}},
		bob:   {bob, "web", "sales", "gpt-5-nano", stateless},
	}
	for session, w := range want {
		s := series[session]
		typed := map[string]int64{"prompt": w.prompt, "completion": w.completion, "cached": w.cached, "reasoning": w.reasoning, "history": w.history}
		for typ, v := range typed {
			require.Equal(t, float64(v), m[`historyproxy_session_tokens_total{session="`+session+`",type="`+typ+`"}`], "%s: session %s tokens", session, typ)
		}
		require.Equal(t, float64(w.nanos)/1e9, m[`historyproxy_session_cost_usd_total{session="`+session+`"}`], "%s: session cost", session)

		all := *w
		all.prompt += s.extra.prompt
		all.completion += s.extra.completion
		all.requests += s.extra.requests
		all.nanos += s.extra.nanos
		labels := `agent="` + s.agent + `",channel="` + s.channel + `",model="` + s.model + `"`
		for typ, v := range map[string]int64{"prompt": all.prompt, "completion": all.completion, "cached": all.cached, "reasoning": all.reasoning, "history": all.history} {
			require.Equal(t, float64(v), m[`historyproxy_tokens_total{`+labels+`,purpose="chat",type="`+typ+`"}`], "%s: %s tokens", session, typ)
		}
		require.Equal(t, float64(all.nanos)/1e9, m[`historyproxy_cost_usd_total{`+labels+`,purpose="chat"}`], "%s: cost", session)
		require.Equal(t, float64(all.requests), m[`historyproxy_requests_total{`+labels+`,code="200"}`], "%s: answered requests", session)
	}
	require.Equal(t, 2.0, m[`historyproxy_requests_total{agent="support",channel="chat",model="gpt-4o-mini",code="429"}`])
	require.Equal(t, 1.0, m[`historyproxy_requests_total{agent="support",channel="chat",model="gpt-4o-mini",code="500"}`])
	require.Equal(t, 1.0, m[`historyproxy_estimated_usage_requests_total{agent="support",channel="chat",model="gpt-4o-mini"}`])
	require.Equal(t, 1.0, m[`historyproxy_estimated_usage_requests_total{agent="sales",channel="web",model="gpt-5-nano"}`])
	require.Equal(t, 2.0, m["historyproxy_sessions_tracked"])
}

// scrapeMetrics reads the admin listener's /metrics into a map from each
// series, as written in the exposition (name{labels...}), to its value.
func scrapeMetrics(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		require.NoError(t, err, line)
		out[reorderLabels(line[:i])] = v
	}
	require.NoError(t, sc.Err())
	return out
}

// reorderLabels moves a "code" or "type" label last, the order the test
// writes series in (the exposition sorts labels by name).
func reorderLabels(series string) string {
	name, labels, ok := strings.Cut(series, "{")
	if !ok {
		return series
	}
	parts := strings.Split(strings.TrimSuffix(labels, "}"), ",")
	var head, tail []string
	for _, p := range parts {
		if strings.HasPrefix(p, "code=") || strings.HasPrefix(p, "type=") {
			tail = append(tail, p)
		} else {
			head = append(head, p)
		}
	}
	return name + "{" + strings.Join(append(head, tail...), ",") + "}"
}

// TestFinePricesRefusedAtStart: a configured price finer than a nano-USD
// per token stops start-up with a message naming it, instead of being
// rounded (to zero, for 0.0004).
func TestFinePricesRefusedAtStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, []byte("models:\n  my-model:\n    input: 0.0004\n    output: 0.6\n"), 0o600))
	err := run(context.Background(), []string{"-config", path, "-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0"},
		func(string) string { return "" }, io.Discard, nil)
	require.ErrorContains(t, err, "models.my-model.input: 0.0004 has more than 3 decimals")
}

// agreeing checks that the session's all-time totals in Redis equal its
// Prometheus series, and that its channel, agent and model series hold the
// same (the session is their only traffic), once sent requests have been
// observed. It returns the Redis totals.
func agreeing(t *testing.T, p *program, rs *redistest.Server, session, channel, agent, model string, sent int) map[string]int64 {
	t.Helper()
	var m map[string]float64
	require.Eventually(t, func() bool {
		m = scrapeMetrics(t, p.addrs.Admin)
		n := 0.0
		for k, v := range m {
			if strings.HasPrefix(k, "historyproxy_requests_total{") {
				n += v
			}
		}
		return n == float64(sent)
	}, 10*time.Second, 10*time.Millisecond, "every request observed")
	hash, err := rs.Client(t).HGetAll(context.Background(), "hp:{"+session+"}:session").Result()
	require.NoError(t, err)
	redis := map[string]int64{}
	for _, f := range []string{"prompt_tokens", "completion_tokens", "cached_tokens", "history_tokens", "requests", "cost_nanos"} {
		if v := hash[f]; v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			require.NoError(t, err, f)
			redis[f] = n
		}
	}
	labels := `agent="` + agent + `",channel="` + channel + `",model="` + model + `"`
	for typ, field := range map[string]string{"prompt": "prompt_tokens", "completion": "completion_tokens", "cached": "cached_tokens", "history": "history_tokens"} {
		require.Equal(t, float64(redis[field]), m[`historyproxy_session_tokens_total{session="`+session+`",type="`+typ+`"}`], "session %s tokens: Prometheus against Redis %s", typ, field)
		require.Equal(t, float64(redis[field]), m[`historyproxy_tokens_total{`+labels+`,purpose="chat",type="`+typ+`"}`], "%s tokens: Prometheus against Redis %s", typ, field)
	}
	require.Equal(t, float64(redis["cost_nanos"])/1e9, m[`historyproxy_session_cost_usd_total{session="`+session+`"}`], "session cost: Prometheus against Redis")
	require.Equal(t, float64(redis["cost_nanos"])/1e9, m[`historyproxy_cost_usd_total{`+labels+`,purpose="chat"}`], "cost: Prometheus against Redis")
	return redis
}

// TestReplyCutAfterHeadersCountsNowhere: an upstream that answers 200 and
// then breaks off the body of a whole reply gets the client a 502, and the
// proxy read no reply, so nothing is billed (README, What counts), neither
// in Redis nor in Prometheus. Prometheus counted an estimate of it while
// Redis did not.
func TestReplyCutAfterHeadersCountsNowhere(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL})
	ctx := context.Background()
	const session = "chat:carol:support"
	params := func(text string) openai.ChatCompletionNewParams {
		return openai.ChatCompletionNewParams{Model: "gpt-4o-mini", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(text)}}
	}

	up.Enqueue(fakeai.Reply{Content: "Hello Carol.", Usage: &fakeai.Usage{PromptTokens: 100, CompletionTokens: 20}})
	_, err := p.client(session).Chat.Completions.New(ctx, params("Hi, I am Carol."))
	require.NoError(t, err)

	// The headers promise more body than comes: the connection ends early.
	partial := []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hel`)
	up.Enqueue(fakeai.Reply{Raw: partial, Header: http.Header{"Content-Length": {strconv.Itoa(len(partial) + 500)}}})
	_, err = p.client(session).Chat.Completions.New(ctx, params("Still there?"))
	var apiErr *openai.Error
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, http.StatusBadGateway, apiErr.StatusCode)

	redis := agreeing(t, p, rs, session, "chat", "support", "gpt-4o-mini", 2)
	want := map[string]int64{"prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 0, "history_tokens": 0, "requests": 1, "cost_nanos": 100*150 + 20*600}
	for f, v := range want {
		require.Equal(t, v, redis[f], "Redis %s: the first request only", f)
	}
}

// TestNaNPriceRefusedAtStart: a price of .nan (YAML's not-a-number) passed
// every check (not negative, not above the maximum, no decimals in "NaN")
// and became a cost of -2^63 nano-USD per token, counted negative in Redis
// and dropped by Prometheus. It stops start-up like any other bad price.
func TestNaNPriceRefusedAtStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, []byte("models:\n  my-model:\n    input: .nan\n    output: 0.6\n"), 0o600))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Should it start after all, it stops at once and the check below fails.
	err := run(ctx, []string{"-config", path, "-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0"},
		func(string) string { return "" }, io.Discard, func(addrs) { cancel() })
	require.ErrorContains(t, err, "models.my-model.input: NaN is not a number")
}

// TestEstimatedUsageCountsEveryChoice: without usage from the upstream, a
// request with n = 2 is estimated at what was generated, both choices, as
// the API bills them; only choice 0 is recorded. The estimate counted
// choice 0 alone.
func TestEstimatedUsageCountsEveryChoice(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL})
	ctx := context.Background()
	counter, err := tokens.New("")
	require.NoError(t, err)
	const model, first, second = "gpt-4o-mini", "Hello there, world.", "Good morning to you, friend."
	chunk := func(index int, delta string) string {
		return `data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":` +
			strconv.Itoa(index) + `,"delta":{"content":"` + delta + `"},"finish_reason":null}]}` + "\n\n"
	}
	tests := []struct {
		name   string
		stream bool
		reply  fakeai.Reply
	}{
		{"whole reply", false, fakeai.Reply{Raw: []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[` +
			`{"index":0,"message":{"role":"assistant","content":"` + first + `"},"finish_reason":"stop"},` +
			`{"index":1,"message":{"role":"assistant","content":"` + second + `"},"finish_reason":"stop"}]}`)}},
		{"stream", true, fakeai.Reply{Raw: []byte(chunk(0, "Hello there,") + chunk(1, "Good morning") + chunk(1, " to you, friend.") + chunk(0, " world.") +
			`data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"delta":{},"finish_reason":"stop"}]}` + "\n\n" +
			"data: [DONE]\n\n"), Header: http.Header{"Content-Type": {"text/event-stream"}}}},
	}
	sent := 0
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			agent := strings.ReplaceAll(tc.name, " ", "-") // series of their own
			session := "chat:n2:" + agent
			params := openai.ChatCompletionNewParams{Model: model, N: openai.Int(2),
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Greet me twice.")}}
			up.Enqueue(tc.reply)
			sent++
			if tc.stream {
				s := p.client(session).Chat.Completions.NewStreaming(ctx, params)
				for s.Next() {
				}
				require.NoError(t, s.Err())
			} else {
				_, err := p.client(session).Chat.Completions.New(ctx, params)
				require.NoError(t, err)
			}
			redis := agreeing(t, p, rs, session, "chat", agent, model, sent)
			want := int64(counter.Text(model, first) + counter.Text(model, second))
			require.Equal(t, want, redis["completion_tokens"], "both choices were generated and billed")
		})
	}
}

// TestXGzipWholeReplyIsRecordedAndBilled: x-gzip is gzip (RFC 9110), and
// the proxy reads a stream in either; a whole reply in x-gzip was neither
// decoded nor recorded nor billed, anywhere.
func TestXGzipWholeReplyIsRecordedAndBilled(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL})
	const session = "chat:erin:support"
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	_, err := zw.Write([]byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Packed."},"finish_reason":"stop"}],"usage":{"prompt_tokens":40,"completion_tokens":3,"total_tokens":43}}`))
	require.NoError(t, err)
	require.NoError(t, zw.Close())
	up.Enqueue(fakeai.Reply{Raw: zipped.Bytes(), Header: http.Header{"Content-Encoding": {"x-gzip"}}})

	req, err := http.NewRequest(http.MethodPost, "http://"+p.addrs.Proxy+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Pack it."}]}`))
	require.NoError(t, err)
	req.Header.Set("X-Session-ID", session)
	resp, err := http.DefaultTransport.RoundTrip(req) // no transparent decoding: the bytes as relayed
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, zipped.Bytes(), body, "relayed as it came")

	redis := agreeing(t, p, rs, session, "chat", "support", "gpt-4o-mini", 1)
	for f, v := range map[string]int64{"prompt_tokens": 40, "completion_tokens": 3, "requests": 1, "cost_nanos": 40*150 + 3*600} {
		require.Equal(t, v, redis[f], "Redis %s", f)
	}
	n, err := rs.Client(t).XLen(context.Background(), "hp:{"+session+"}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 2, n, "the turn is recorded")
}

package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/tokens"
)

// TestNewIndexesAreTheNewMessages: the indexes countNew counts at are those
// of the messages a turn records.
func TestNewIndexesAreTheNewMessages(t *testing.T) {
	for name, body := range map[string]string{
		"one user":          chatBody(user("a")),
		"system first":      `{"model":"m","messages":[{"role":"system","content":"s"},` + user("a") + `]}`,
		"own history":       `{"model":"m","messages":[` + user("a") + `,{"role":"assistant","content":"b"},` + user("c") + `,{"role":"developer","content":"d"}]}`,
		"tool results":      `{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"1","content":"r"}]}`,
		"system in between": `{"model":"m","messages":[` + user("a") + `,{"role":"system","content":"s"},` + user("b") + `]}`,
	} {
		req, aerr := parseChat([]byte(body), limits{})
		require.Nil(t, aerr, name)
		var got []history.Message
		for _, i := range newIndexes(req) {
			got = append(got, req.Messages[i].msg)
		}
		require.Equal(t, req.newMessages(), got, name)
	}
}

// TestLongWordDoesNotSpendTheStoreDeadline: a message that is one long
// word (tiktoken's merge is quadratic in it: 64 KiB took seconds) is
// counted before the store's deadline starts, and at a bounded cost, so a
// healthy Redis takes the turn: no 503 failing closed, no degraded answer
// failing open.
func TestLongWordDoesNotSpendTheStoreDeadline(t *testing.T) {
	word := strings.Repeat("abcdefghij", 64<<10/10)
	for _, failClosed := range []bool{true, false} {
		for _, stream := range []bool{false, true} {
			t.Run(fmt.Sprintf("fail_closed=%t stream=%t", failClosed, stream), func(t *testing.T) {
				rs := redistest.Start(t)
				up := fakeai.New(t)
				// The store's deadline must outlast a few Redis round trips
				// (the first call dials and loads the scripts), yet be
				// shorter than counting the word the way this test guards
				// against (its whole cost, 64 KiB in one piece: seconds).
				// A fixed 300 ms failed under a load of 17 on 2 cores with
				// the race detector: Redis did not answer in time. So the
				// deadline follows the machine's present speed: half of what
				// counting 64 KiB of ordinary words takes (what the word
				// costs when cut as it should be: 1.7 s under that load),
				// 300 ms at least, as before. A count of the word in one
				// piece (quadratic) inside the deadline still spends it many
				// times over, and a bounded count whole inside it, twice.
				prose := strings.Repeat("The patient was stable, and the doctor said so. ", len(word)/48)
				t0 := time.Now()
				sharedCounter.Meter(context.Background(), "gpt-4o", -1).Text(prose)
				timeout := max(300*time.Millisecond, time.Since(t0)/2)
				_, srv := redisProxy(t, rs, up, func(o *Options) { o.FailClosed, o.StoreTimeout = failClosed, timeout })
				session := fmt.Sprintf("c:word%t%t:a", failClosed, stream)
				req, err := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(
					fmt.Sprintf(`{"model":"gpt-4o","stream":%t,"messages":[%s]}`, stream, user(word))))
				require.NoError(t, err)
				req.Header.Set("X-Session-ID", session)
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				body := readAll(t, resp)
				require.Equal(t, http.StatusOK, resp.StatusCode, body)
				require.Empty(t, resp.Header.Get("X-History"), "not degraded")
				if stream {
					require.True(t, strings.HasSuffix(strings.TrimSpace(body), "data: [DONE]"), "the stream ends whole")
				}
				msgs, err := history.NewRedis(rs.Client(t), "").Messages(context.Background(), session, "")
				require.NoError(t, err)
				require.Len(t, msgs, 2)
				// Exact, or in part estimated when the reply came before
				// counting was done.
				require.InEpsilon(t, sharedCounter.Message("gpt-4o", tokens.Message{Role: "user", Content: word}), msgs[0].Tokens, 0.05)
			})
		}
	}
}

// TestCountingStopsWhenTheClientIsGone: a request nobody records and whose
// client left is not tokenized any more; its usage (the upstream sent
// none) is estimated from its size. While the client is there, it is
// counted.
func TestCountingStopsWhenTheClientIsGone(t *testing.T) {
	prompt := strings.Repeat("The patient was stable, and the doctor said so. ", 100)
	exact := sharedCounter.Messages("gpt-4o", []tokens.Message{{Role: "user", Content: prompt}})
	body := `{"model":"gpt-4o","stream":true,"messages":[` + user(prompt) + `]}`
	t.Run("client stays", func(t *testing.T) {
		h, reg := metricsHarness(t)
		h.up.Enqueue(fakeai.Reply{Raw: []byte(noUsageSSE), Header: http.Header{"Content-Type": {"text/event-stream"}}})
		resp := h.do(t, "/v1/chat/completions", body, nil)
		readAll(t, resp)
		require.Eventually(t, func() bool {
			got, _ := gathered(t, reg, "historyproxy_tokens_total", map[string]string{"model": "gpt-4o", "type": "prompt"})
			return got > 0
		}, 10*time.Second, 10*time.Millisecond)
		got, _ := gathered(t, reg, "historyproxy_tokens_total", map[string]string{"model": "gpt-4o", "type": "prompt"})
		require.EqualValues(t, exact, got, "counted")
	})
	t.Run("client gone", func(t *testing.T) {
		h, reg := metricsHarness(t)
		gate := make(chan struct{})
		defer close(gate)
		h.up.Enqueue(fakeai.Reply{Deltas: []string{"a", " b", " c"}, Gate: gate, GateAfter: 2})
		ctx, cancel := context.WithCancel(context.Background())
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL+"/v1/chat/completions", strings.NewReader(body))
		require.NoError(t, err)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		_, err = resp.Body.Read(make([]byte, 64))
		require.NoError(t, err)
		cancel()
		resp.Body.Close()
		require.Eventually(t, func() bool {
			got, _ := gathered(t, reg, "historyproxy_tokens_total", map[string]string{"model": "gpt-4o", "type": "prompt"})
			return got > 0
		}, 10*time.Second, 10*time.Millisecond)
		got, _ := gathered(t, reg, "historyproxy_tokens_total", map[string]string{"model": "gpt-4o", "type": "prompt"})
		require.NotEqualValues(t, exact, got, "not tokenized once the client left")
		require.InDelta(t, len(prompt)/4, got, 20, "estimated from its size")
	})
}

// TestRequestMemoryIsBounded: serving a 16 MiB request allocates a small
// multiple of its body, whatever the text: ordinary words, or one word of
// 16 MiB. (Tokenizing it whole allocated over a hundred times the text,
// and the word took hours.) What is allocated bounds what is held at once.
func TestRequestMemoryIsBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("serves 64 MiB of requests")
	}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}`)
	}))
	t.Cleanup(up.Close)
	u, err := url.Parse(up.URL + "/v1")
	require.NoError(t, err)
	px, err := New(Options{Upstream: u, Store: history.NewMemory(), Counter: sharedCounter, Catalog: tokens.NewCatalog(nil),
		Agent: defaultAgent, DefaultChannel: "api", DefaultAgent: "default"})
	require.NoError(t, err)
	srv := httptest.NewServer(px.Handler())
	t.Cleanup(srv.Close)

	for name, text := range map[string]string{
		"words":    strings.Repeat("The patient was stable, and the doctor said: come back in 3 weeks. ", (16<<20)/68),
		"one word": strings.Repeat("x", 16<<20),
	} {
		t.Run(name, func(t *testing.T) {
			body := []byte(`{"model":"gpt-4o","messages":[` + user(text) + `]}`)
			post := func() {
				req, err := http.NewRequest(http.MethodPost, srv.URL+"/v1/chat/completions", bytes.NewReader(body))
				require.NoError(t, err)
				req.Header.Set("X-Session-ID", "c:memory:a")
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				readAll(t, resp)
				require.Equal(t, http.StatusOK, resp.StatusCode)
			}
			post() // warm up: connections, encoders
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			post()
			runtime.ReadMemStats(&after)
			got := after.TotalAlloc - before.TotalAlloc
			t.Logf("a %d-byte request allocated %d bytes (%.1f×)", len(body), got, float64(got)/float64(len(body)))
			require.Less(t, got, uint64(8*len(body)))
		})
	}
}

// TestMaxInflightBytes: past MaxInflightBytes of chat bodies at once, a
// request gets 503 with Retry-After and nothing is forwarded; once the
// bytes are released, requests pass again.
func TestMaxInflightBytes(t *testing.T) {
	h := newHarness(t, func(o *Options) { o.MaxInflightBytes = 1 << 20 })
	gate := make(chan struct{})
	open := sync.OnceFunc(func() { close(gate) })
	t.Cleanup(open) // a failing test must not leave the stream held
	h.up.Enqueue(fakeai.Reply{Content: "held", Gate: gate})
	// Streams, so the first one is held open by the gate.
	big := `{"model":"gpt-4o-mini","stream":true,"messages":[` + user(strings.Repeat("word ", 600<<10/5)) + `]}`

	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the first request holds 600 KB until the gate opens
		defer wg.Done()
		resp, err := http.Post(h.srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(big))
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	require.Eventually(t, func() bool { return len(h.up.Requests()) == 1 }, 10*time.Second, 10*time.Millisecond)

	post := func(body io.Reader) *http.Response {
		resp, err := http.Post(h.srv.URL+"/v1/chat/completions", "application/json", body)
		require.NoError(t, err)
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	for name, body := range map[string]io.Reader{
		"known length":   strings.NewReader(big),
		"unknown length": io.MultiReader(strings.NewReader(big)), // chunked: reserved as it arrives
	} {
		resp := post(body)
		require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, name)
		require.Equal(t, "1", resp.Header.Get("Retry-After"), name)
		assertOpenAIError(t, readAll(t, resp), "overloaded")
	}
	require.Len(t, h.up.Requests(), 1, "nothing more forwarded")
	small := post(strings.NewReader(chatBody(user("small"))))
	readAll(t, small)
	require.Equal(t, http.StatusOK, small.StatusCode, "a small request still fits")

	open()
	wg.Wait()
	// A short reply: the default echoes the 600 KB back as 120,000 stream
	// events, which took minutes under the race detector on a loaded
	// machine and is not what this request shows.
	h.up.Enqueue(fakeai.Reply{Content: "released"})
	resp := post(strings.NewReader(big))
	readAll(t, resp)
	require.Equal(t, http.StatusOK, resp.StatusCode, "the bytes were released")
}

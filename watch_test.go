package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// sseEvent is one server-sent event of a watch.
type sseEvent struct {
	id, kind string
	data     map[string]any
}

// watcher reads a watch stream.
type watcher struct {
	resp   *http.Response
	r      *bufio.Reader
	events chan sseEvent
	done   chan error
}

// openWatch opens GET /admin/v1/sessions/{id}/watch, with a Last-Event-ID
// when last is not "".
func openWatch(t *testing.T, admin, session, last string) *watcher {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+admin+"/admin/v1/sessions/"+url.PathEscape(session)+"/watch", nil)
	require.NoError(t, err)
	if last != "" {
		req.Header.Set("Last-Event-ID", last)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	w := &watcher{resp: resp, r: bufio.NewReader(resp.Body), events: make(chan sseEvent, 1024), done: make(chan error, 1)}
	go w.read() // ends when the stream ends or is closed
	t.Cleanup(w.close)
	return w
}

func (w *watcher) read() {
	var e sseEvent
	for {
		line, err := w.r.ReadString('\n')
		if err != nil {
			close(w.events)
			w.done <- err
			return
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "":
			if e.kind != "" {
				w.events <- e
			}
			e = sseEvent{}
		case strings.HasPrefix(line, "id: "):
			e.id = line[4:]
		case strings.HasPrefix(line, "event: "):
			e.kind = line[7:]
		case strings.HasPrefix(line, "data: "):
			_ = json.Unmarshal([]byte(line[6:]), &e.data)
		}
	}
}

func (w *watcher) close() { w.resp.Body.Close() }

// next returns the next event, failing after a generous wait.
func (w *watcher) next(t *testing.T) sseEvent {
	t.Helper()
	select {
	case e, ok := <-w.events:
		require.True(t, ok, "the watch ended")
		require.NotEmpty(t, e.id, "every event has an id")
		return e
	case <-time.After(20 * time.Second):
		t.Fatal("no event in 20s")
	}
	return sseEvent{}
}

// TestWatchAcrossInstances: a watch on one instance sees a turn made
// through the other: its deltas while the reply streams, its messages and
// the end of the generation; a watch that reconnects mid-reply with the
// last id it got misses nothing and gets nothing twice; an id too old
// gives a snapshot.
func TestWatchAcrossInstances(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}
	a, b := start(t, env), start(t, env)
	const session = "chat:watched@example.com:support"

	w := openWatch(t, a.addrs.Admin, session, "")
	snap := w.next(t)
	require.Equal(t, "snapshot", snap.kind)
	require.Equal(t, false, snap.data["generating"])
	require.Empty(t, snap.data["items"])

	gate := make(chan struct{})
	up.Enqueue(fakeai.Reply{Deltas: []string{"Hello", " there,", " dear", " friend."}, Gate: gate, GateAfter: 3})
	stream := b.client(session).Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("greet me")}})
	var seen strings.Builder
	e := w.next(t)
	require.Equal(t, "delta", e.kind, "the reply streams to the watch")
	require.NotEmpty(t, e.data["generation"])
	seen.WriteString(e.data["content"].(string))
	w.close() // the watcher's connection drops mid-reply

	close(gate)
	for stream.Next() {
	}
	require.NoError(t, stream.Err())

	w2 := openWatch(t, a.addrs.Admin, session, e.id)
	var kinds []string
	for {
		e2 := w2.next(t)
		kinds = append(kinds, e2.kind)
		switch e2.kind {
		case "delta":
			require.Nil(t, e2.data["replace"], "a resumed watch continues the reply")
			seen.WriteString(e2.data["content"].(string))
		case "message":
			require.Equal(t, "c1", e2.data["conversation"])
		}
		if e2.kind == "complete" {
			require.Equal(t, e.data["generation"], e2.data["generation"])
			break
		}
	}
	require.Equal(t, "Hello there, dear friend.", seen.String(), "no gap, no duplicate")
	require.Equal(t, []string{"message", "message", "complete"}, kinds[len(kinds)-3:])

	// A turn that is not streamed shows as its messages and the end.
	_, err := b.client(session).Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("again")}})
	require.NoError(t, err)
	m := w2.next(t)
	require.Equal(t, "message", m.kind)
	require.Equal(t, "again", m.data["content"])
	require.Equal(t, "message", w2.next(t).kind)
	require.Equal(t, "complete", w2.next(t).kind)

	// An id whose events are gone gives a fresh snapshot.
	w3 := openWatch(t, a.addrs.Admin, session, "1-0_1-0")
	s3 := w3.next(t)
	require.Equal(t, "snapshot", s3.kind)
	require.Len(t, s3.data["items"], 4)
	// A bad id is refused.
	resp, err := http.Get("http://" + a.addrs.Admin + "/admin/v1/sessions/" + url.PathEscape(session) + "/watch?last_event_id=nope")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
}

// TestThousandWatches opens 1,000 watches of one session on one instance
// (the built binary) and measures what they take: Redis connections (one
// blocking read for the session, not one per watch; the store's pool
// grows with the burst of starts, up to its size, whatever the number of
// watches) and the process's memory and goroutines per watch, from its
// own metrics. Every watch gets the next message.
func TestThousandWatches(t *testing.T) {
	buildBinary(t) // skips in -short mode before anything starts
	up := fakeai.New(t)
	rs := redistest.Start(t)
	p := startBinary(t, nil, "-upstream", up.URL, "-redis-url", rs.URL)
	rc := rs.Client(t)
	ctx := context.Background()
	// clients counts the connections to Redis, and those blocked reading
	// a stream.
	clients := func() (all, xread int) {
		list, err := rc.ClientList(ctx).Result()
		require.NoError(t, err)
		return strings.Count(list, "\n"), strings.Count(list, "cmd=xread")
	}
	const session, n = "chat:crowd@example.com:support", 1000
	tr := &http.Transport{MaxIdleConnsPerHost: n}
	hc := &http.Client{Transport: tr}
	t.Cleanup(tr.CloseIdleConnections)

	// One watch first, so that the session's reader exists.
	first := openWatch(t, p.admin, session, "")
	require.Equal(t, "snapshot", first.next(t).kind)
	all0, _ := clients()
	m0 := scrapeMetrics(t, p.admin)

	ws := make([]*watcher, n)
	var wg sync.WaitGroup
	for i := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest(http.MethodGet, "http://"+p.admin+"/admin/v1/sessions/"+url.PathEscape(session)+"/watch", nil)
			resp, err := hc.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			w := &watcher{resp: resp, r: bufio.NewReader(resp.Body), events: make(chan sseEvent, 16), done: make(chan error, 1)}
			go w.read()
			ws[i] = w
		}()
	}
	wg.Wait()
	for _, w := range ws {
		require.NotNil(t, w)
		t.Cleanup(w.close)
		require.Equal(t, "snapshot", w.next(t).kind)
	}
	all1, xread := clients()
	m1 := scrapeMetrics(t, p.admin)
	heap := m1["go_memstats_heap_inuse_bytes"] - m0["go_memstats_heap_inuse_bytes"]
	t.Logf("%d watches of one session: Redis connections %d before, %d after, %d of them in a blocking read; "+
		"the process's heap in use +%.1f MB (%.0f bytes per watch), resident +%.1f MB, goroutines +%.0f",
		n, all0, all1, xread, heap/1e6, heap/n,
		(m1["process_resident_memory_bytes"]-m0["process_resident_memory_bytes"])/1e6, m1["go_goroutines"]-m0["go_goroutines"])
	require.Equal(t, 1, xread, "1,000 watches of one session share one blocking read")
	require.LessOrEqual(t, all1-all0, 10*runtime.NumCPU(), "the store's pool, not a connection per watch")
	require.Equal(t, float64(n+1), m1["historyproxy_watches_open"])

	c := openaiClient(p.addr, session)
	_, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hello, everyone")}})
	require.NoError(t, err)
	for i, w := range ws {
		e := w.next(t)
		require.Equal(t, "message", e.kind, "watch %d", i)
		require.Equal(t, "hello, everyone", e.data["content"], fmt.Sprint("watch ", i))
	}
}

// leaveAfterFirstChunk sends a streamed turn through the proxy at addr and
// goes away once its first words arrived.
func leaveAfterFirstChunk(t *testing.T, addr, session string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"a long story, please"}]}`))
	require.NoError(t, err)
	req.Header.Set("X-Session-ID", session)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for {
		line, err := br.ReadString('\n')
		require.NoError(t, err)
		if strings.Contains(line, "Once") {
			return // the first words arrived
		}
	}
}

// storyReply is a long streamed reply the fake upstream holds after its
// first words until gate is closed.
func storyReply(gate chan struct{}) (fakeai.Reply, string) {
	words := []string{"Once"}
	for range 200 {
		words = append(words, " upon", " a", " time")
	}
	return fakeai.Reply{Deltas: words, Gate: gate, GateAfter: 2}, strings.Join(words, "")
}

// TestFinishAfterClientLeaves: with on_client_disconnect: finish, a
// client that goes away after the first chunk leaves the reply going: it
// is read to its end, stored complete, and a watch (on another instance)
// sees all of it.
func TestFinishAfterClientLeaves(t *testing.T) {
	up := fakeai.New(t)
	rs := redistest.Start(t)
	env := map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL}
	cfg := writeConfigFile(t, "agents:\n  writer:\n    on_client_disconnect: finish\n")
	a, b := start(t, env, "-config", cfg), start(t, env, "-config", cfg)
	const session = "chat:gone@example.com:writer"
	w := openWatch(t, b.addrs.Admin, session, "")
	require.Equal(t, "snapshot", w.next(t).kind)

	gate := make(chan struct{})
	reply, want := storyReply(gate)
	up.Enqueue(reply)
	leaveAfterFirstChunk(t, a.addrs.Proxy, session)
	close(gate)

	var text strings.Builder
	var got []sseEvent
	for {
		e := w.next(t)
		got = append(got, e)
		if e.kind == "delta" {
			if e.data["replace"] == true {
				text.Reset()
			}
			text.WriteString(e.data["content"].(string))
		}
		if e.kind == "complete" {
			break
		}
	}
	require.Equal(t, want, text.String(), "the watch saw the whole reply being written")
	last := got[len(got)-2]
	require.Equal(t, "message", last.kind)
	require.Equal(t, want, last.data["content"])
	require.Equal(t, "complete", last.data["status"], "stored complete")

	n, err := rs.Client(t).XLen(context.Background(), "hp:{"+session+"}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 2, n)
	require.Eventually(t, func() bool {
		m := scrapeMetrics(t, a.addrs.Admin)
		return m[`historyproxy_tokens_total{agent="writer",channel="chat",model="gpt-4o-mini",purpose="chat",type="completion"}`] > 0
	}, 20*time.Second, 10*time.Millisecond, "its tokens count, as any reply's")
}

// TestFinishDrain: a drain waits for a reply whose client went away
// (on_client_disconnect: finish) within drain_timeout, and cuts it, stored
// incomplete, past it.
func TestFinishDrain(t *testing.T) {
	for _, opens := range []bool{true, false} {
		t.Run(fmt.Sprintf("upstream ends=%t", opens), func(t *testing.T) {
			up := fakeai.New(t)
			rs := redistest.Start(t)
			cfg := writeConfigFile(t, "defaults:\n  on_client_disconnect: finish\n")
			p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": rs.URL},
				"-config", cfg, "-drain-timeout", "2s")
			const session = "chat:drained@example.com:support"
			gate := make(chan struct{})
			reply, want := storyReply(gate)
			up.Enqueue(reply)
			leaveAfterFirstChunk(t, p.addrs.Proxy, session)

			p.stop() // the drain begins
			select {
			case err := <-p.done:
				t.Fatalf("the program stopped (%v) with a reply in flight", err)
			case <-time.After(300 * time.Millisecond):
			}
			if opens {
				close(gate)
			} else {
				defer close(gate)
			}
			select {
			case err := <-p.done:
				require.NoError(t, err)
				close(p.done)
			case <-time.After(20 * time.Second):
				t.Fatal("the program did not stop")
			}
			entries, err := rs.Client(t).XRange(context.Background(), "hp:{"+session+"}:messages", "-", "+").Result()
			require.NoError(t, err)
			require.Len(t, entries, 2)
			if opens {
				require.Equal(t, want, entries[1].Values["content"])
				require.NotContains(t, entries[1].Values, "status", "complete: the default, left out")
			} else {
				require.Equal(t, "Once", entries[1].Values["content"], "cut at the drain timeout")
				require.Equal(t, "incomplete", entries[1].Values["status"])
			}
		})
	}
}

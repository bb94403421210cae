package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/benchfix"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// The floor must do what a history proxy cannot avoid, and no less: read
// the window before forwarding, and store the turn before the client sees
// the end of the reply; otherwise it is not a floor.
func TestFloor(t *testing.T) {
	ctx := context.Background()
	rs := redistest.Start(t)
	rdb := rs.Client(t)
	// The upstream keeps a stream's connection open after [DONE] until the
	// test lets go, so that only a turn stored before [DONE] was relayed
	// can be there when the client reads it.
	release := make(chan struct{})
	_, events, _ := benchfix.Replies(0)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if !strings.Contains(string(body), `"stream":true`) {
			r.Body = io.NopCloser(strings.NewReader(string(body)))
			benchfix.Upstream().ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		for _, e := range events {
			_, _ = w.Write(e)
		}
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer up.Close()
	upURL, err := url.Parse(up.URL)
	require.NoError(t, err)
	srv := httptest.NewServer(newFloor(upURL, rdb, DefaultPrefix, 2))
	defer srv.Close()

	const session = "bench:floor@example.com:support"
	stream := DefaultPrefix + ":{" + session + "}"
	for range 3 {
		require.NoError(t, rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"role", "user", "content", "hi"}}).Err())
	}
	post := func(body []byte, session string) *http.Response {
		req, err := benchfix.NewRequest(srv.URL+"/v1/chat/completions", body, session)
		require.NoError(t, err)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		return resp
	}

	t.Run("whole reply", func(t *testing.T) {
		resp := post(benchfix.RequestBody(false), session)
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "2", resp.Header.Get("X-History-Messages"), "window of -window entries")
		// Stored before the first byte of the body was relayed.
		require.EqualValues(t, 4, rdb.XLen(ctx, stream).Val())
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		last := rdb.XRevRangeN(ctx, stream, "+", "-", 1).Val()[0]
		require.Equal(t, string(benchfix.RequestBody(false)), last.Values["request"])
		require.Equal(t, string(body), last.Values["reply"])
	})

	t.Run("stream", func(t *testing.T) {
		defer close(release)
		resp := post(benchfix.RequestBody(true), session)
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		var relayed strings.Builder
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			relayed.WriteString(sc.Text() + "\n")
			if sc.Text() == "data: [DONE]" {
				break
			}
		}
		require.NoError(t, sc.Err())
		require.Contains(t, relayed.String(), "data: [DONE]")
		// Stored before [DONE] reached the client.
		require.EqualValues(t, 5, rdb.XLen(ctx, stream).Val())
		last := rdb.XRevRangeN(ctx, stream, "+", "-", 1).Val()[0]
		require.Equal(t, relayed.String()+"\n", last.Values["reply"], "the reply's bytes, as relayed")
	})

	t.Run("no session", func(t *testing.T) {
		resp := post(benchfix.RequestBody(false), "")
		defer resp.Body.Close()
		require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	})
}

package load

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestPercentile(t *testing.T) {
	ms := func(xs ...int) []time.Duration {
		out := make([]time.Duration, len(xs))
		for i, x := range xs {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	hundred := make([]int, 100)
	for i := range hundred {
		hundred[i] = i + 1
	}
	for _, tc := range []struct {
		name   string
		sorted []time.Duration
		q      float64
		want   time.Duration
	}{
		{"none", nil, 0.5, 0},
		{"one", ms(7), 0.99, 7 * time.Millisecond},
		{"median of four is the second (nearest rank)", ms(1, 2, 3, 4), 0.5, 2 * time.Millisecond},
		{"p99 of 100 is the 99th", ms(hundred...), 0.99, 99 * time.Millisecond},
		{"max", ms(1, 2, 3), 1, 3 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Percentile(tc.sorted, tc.q); got != tc.want {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestRun(t *testing.T) {
	var withSession atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Session-ID") != "" {
			withSession.Add(1)
		}
		w.Header().Set("X-History-Messages", r.URL.Query().Get("history"))
		if r.URL.Query().Has("fail") {
			w.WriteHeader(http.StatusBadGateway)
		}
		_, _ = w.Write([]byte("data: {}\n\n"))
	}))
	defer srv.Close()
	ctx := context.Background()

	res, err := Run(ctx, Config{URL: srv.URL + "?history=20", Body: []byte("{}"), Concurrency: 3, Requests: 5,
		WantHistory: "20", Session: func(w, i int) string { return "bench:c" + string(rune('0'+w)) + ":a" }})
	require.NoError(t, err)
	require.Equal(t, 15, res.Requests)
	require.Equal(t, []int{5, 5, 5}, res.PerClient)
	require.Len(t, res.Latency, 15)
	require.Len(t, res.TTFB, 15)
	require.LessOrEqual(t, res.TTFB[0], res.Latency[14])
	require.EqualValues(t, 15, withSession.Load())

	// A proxy that lost the history, or failed, must not look fast.
	_, err = Run(ctx, Config{URL: srv.URL + "?history=0", Body: []byte("{}"), Concurrency: 2, Requests: 3, WantHistory: "20"})
	require.ErrorContains(t, err, `X-History-Messages "0", want 20`)
	_, err = Run(ctx, Config{URL: srv.URL + "?fail", Body: []byte("{}"), Concurrency: 2, Duration: time.Second})
	require.ErrorContains(t, err, "status 502")
}

func TestHold(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("data: {}\n\n"))
		w.(http.Flusher).Flush()
		if r.URL.Query().Has("pause") {
			<-r.Context().Done()
		}
	}))
	defer srv.Close()
	client := &http.Client{Transport: NewTransport(8)}
	defer client.CloseIdleConnections()
	hold := func(url string) *Held {
		t.Helper()
		h, err := Hold(context.Background(), client, 8, func(ctx context.Context, i int) (*http.Request, error) {
			return NewRequest(ctx, url, []byte("{}"), "", nil)
		})
		require.NoError(t, err)
		return h
	}

	h := hold(srv.URL + "?pause")
	require.Zero(t, h.Ended(), "paused streams are all open")
	h.Close()

	// Streams that are not paused end by themselves, and Ended says so
	// (once they have: Close waits for them).
	h = hold(srv.URL)
	h.wg.Wait()
	require.Equal(t, 8, h.Ended())
	h.Close()
}

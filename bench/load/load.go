// Package load is the benchmark's closed-loop load generator: a fixed
// number of clients, each sending its next request as soon as the previous
// answer has been read to the end, for a duration or a number of requests.
// It records each request's latency to the end of the body and to the
// first byte of the body (the time to first token, for a stream).
//
// Closed loop means the offered load adapts to the server: requests/s is
// what the server sustains at that concurrency, and latency includes no
// queueing in the generator.
package load

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Config is one run.
type Config struct {
	// URL is the chat completions URL the requests go to.
	URL string
	// Body is every request's body.
	Body []byte
	// Concurrency is the number of clients, at least 1.
	Concurrency int
	// Duration ends the run: no request starts after it has passed.
	// Ignored when Requests is set.
	Duration time.Duration
	// Requests, when positive, is how many requests each client sends.
	Requests int
	// Session names the X-Session-ID of client w's i-th request of the run
	// (from 0); nil sends none.
	Session func(w, i int) string
	// Header is added to every request.
	Header http.Header
	// WantHistory, when set, is the X-History-Messages every answer must
	// carry, so that a proxy that did not find the stored history fails
	// the run instead of looking fast.
	WantHistory string
	// Client sends the requests; nil means a client from NewTransport.
	Client *http.Client
}

// Result is what a run measured. Latencies are sorted.
type Result struct {
	Requests  int
	PerClient []int         // requests each client sent
	Elapsed   time.Duration // from the first request's start to the last answer's end
	Latency   []time.Duration
	TTFB      []time.Duration // to the first byte of the body
}

// Rate is requests per second.
func (r Result) Rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Requests) / r.Elapsed.Seconds()
}

// Percentile is the q-quantile (0 < q <= 1) of sorted latencies by the
// nearest-rank method; 0 for none.
func Percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*q+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// NewTransport is a transport for n concurrent clients on loopback: enough
// idle connections that none reconnects, and no compression, so that no
// gzip work is added to what is measured.
func NewTransport(n int) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 0
	t.MaxIdleConnsPerHost = max(n, 2)
	t.DisableCompression = true
	return t
}

// Run sends the run's requests and waits for their answers. The first
// failure (a transport error, a status other than 200, a wrong
// X-History-Messages) stops it and is returned.
func Run(ctx context.Context, c Config) (Result, error) {
	if c.Concurrency < 1 {
		return Result{}, fmt.Errorf("load: concurrency %d, want at least 1", c.Concurrency)
	}
	if c.Requests <= 0 && c.Duration <= 0 {
		return Result{}, errors.New("load: neither a duration nor a number of requests")
	}
	client := c.Client
	if client == nil {
		client = &http.Client{Transport: NewTransport(c.Concurrency)}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	type samples struct{ total, ttfb []time.Duration }
	per := make([]samples, c.Concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(c.Duration)
	for w := range per {
		wg.Add(1)
		go func() { // ends after its requests, at the deadline, or at the first failure
			defer wg.Done()
			buf := make([]byte, 32<<10)
			s := &per[w]
			for i := 0; ; i++ {
				if c.Requests > 0 && i >= c.Requests || c.Requests <= 0 && !time.Now().Before(deadline) || ctx.Err() != nil {
					return
				}
				session := ""
				if c.Session != nil {
					session = c.Session(w, i)
				}
				total, ttfb, err := do(ctx, client, c, session, buf)
				if err != nil {
					cancel(fmt.Errorf("client %d, request %d: %w", w, i, err))
					return
				}
				s.total, s.ttfb = append(s.total, total), append(s.ttfb, ttfb)
			}
		}()
	}
	wg.Wait()
	res := Result{Elapsed: time.Since(start)}
	if err := context.Cause(ctx); err != nil {
		return res, err
	}
	for _, s := range per {
		res.PerClient = append(res.PerClient, len(s.total))
		res.Latency = append(res.Latency, s.total...)
		res.TTFB = append(res.TTFB, s.ttfb...)
	}
	res.Requests = len(res.Latency)
	slices.Sort(res.Latency)
	slices.Sort(res.TTFB)
	return res, nil
}

// do sends one request and reads its answer to the end into buf.
func do(ctx context.Context, client *http.Client, c Config, session string, buf []byte) (total, ttfb time.Duration, err error) {
	req, err := NewRequest(ctx, c.URL, c.Body, session, c.Header)
	if err != nil {
		return 0, 0, err
	}
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		return 0, 0, fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	for {
		k, err := resp.Body.Read(buf)
		if k > 0 && ttfb == 0 {
			ttfb = time.Since(t0)
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return 0, 0, fmt.Errorf("read answer: %w", err)
		}
	}
	total = time.Since(t0)
	if c.WantHistory != "" && resp.Header.Get("X-History-Messages") != c.WantHistory {
		return 0, 0, fmt.Errorf("X-History-Messages %q, want %s (X-History %q)",
			resp.Header.Get("X-History-Messages"), c.WantHistory, resp.Header.Get("X-History"))
	}
	return total, ttfb, nil
}

// NewRequest is the POST of a chat completion body to url as a client
// sends it: JSON, a bearer key (the fake upstream checks none), and the
// session, when not empty, in X-Session-ID.
func NewRequest(ctx context.Context, url string, body []byte, session string, header http.Header) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer sk-bench")
	if session != "" {
		req.Header.Set("X-Session-ID", session)
	}
	return req, nil
}

// Held is a set of streams held open at once.
type Held struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	ended  atomic.Int64 // streams that ended before Close
}

// Hold opens n streaming requests at once (reqs builds the i-th) and
// returns when every one has delivered the first byte of its body, so that
// all n are open on the server together, or when ctx ends. The caller's
// upstream must keep them open (see benchfix.PauseHeader). Close ends them.
func Hold(ctx context.Context, client *http.Client, n int, reqs func(ctx context.Context, i int) (*http.Request, error)) (*Held, error) {
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	h := &Held{cancel: cancel}
	opened := make(chan error, n)
	for i := range n {
		h.wg.Add(1)
		go func() { // ends when its stream ends or Close cancels it
			defer h.wg.Done()
			req, err := reqs(ctx, i)
			if err != nil {
				opened <- err
				return
			}
			resp, err := client.Do(req)
			if err != nil {
				opened <- err
				return
			}
			defer resp.Body.Close()
			var b [1]byte
			if _, err := io.ReadFull(resp.Body, b[:]); err != nil {
				opened <- fmt.Errorf("stream %d: status %d: %w", i, resp.StatusCode, err)
				return
			}
			if resp.StatusCode != http.StatusOK {
				opened <- fmt.Errorf("stream %d: status %d", i, resp.StatusCode)
				return
			}
			opened <- nil
			_, _ = io.Copy(io.Discard, resp.Body)
			if ctx.Err() == nil {
				h.ended.Add(1)
			}
		}()
	}
	for range n {
		var err error
		select {
		case err = <-opened:
		case <-parent.Done():
			err = fmt.Errorf("hold %d streams: %w", n, parent.Err())
		}
		if err != nil {
			h.Close()
			return nil, err
		}
	}
	return h, nil
}

// Ended is how many streams have ended by themselves so far: more than
// none means the upstream did not hold them open, and the streams were
// never all open at once.
func (h *Held) Ended() int { return int(h.ended.Load()) }

// Close cancels the held streams and waits for them to end.
func (h *Held) Close() {
	h.cancel()
	h.wg.Wait()
}

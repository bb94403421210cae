// Package bench holds historyproxy's overhead harness: the proxy, with the
// memory store and with a real Redis, next to a bare httputil.ReverseProxy,
// in front of the same fixed-reply upstream, driven by concurrent clients.
// It is benchmarks only, so `go test ./...` just compiles it. See README.md.
package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/internal/benchfix"
	"github.com/historyproxy/historyproxy/internal/redistest"
	"github.com/historyproxy/historyproxy/metrics"
	"github.com/historyproxy/historyproxy/proxy"
	"github.com/historyproxy/historyproxy/tokens"
)

// The workload (a typical request in a session whose stored window holds
// benchfix.HistoryLen messages, all injected), the fixed-reply upstream and
// the bare baseline are internal/benchfix's, the same as the proxy
// package's serial benchmarks use.

// maxRounds: the requests of a run are split into up to this many rounds,
// each running a block on the bare proxy and a block on historyproxy
// (alternating which goes first), so that noise on the shared machine hits
// both alike.
const maxRounds = 10

// historyproxy is the proxy as main wires it (metrics included), on store.
func historyproxy(b *testing.B, up *url.URL, store proxy.Store) http.Handler {
	b.Helper()
	px, err := proxy.New(proxy.Options{
		Upstream: up, Store: store, Counter: benchfix.Counter(), Catalog: tokens.NewCatalog(nil),
		Agent: func(string) proxy.Agent {
			return proxy.Agent{Mode: proxy.ModePerUser, MaxTokens: 8000, MaxMessages: benchfix.HistoryLen, OutputReserve: 1024}
		},
		Metrics: metrics.New(prometheus.NewRegistry(), 0), DefaultChannel: "api", DefaultAgent: "default",
		Transport: benchfix.Transport(),
	})
	if err != nil {
		b.Fatal(err)
	}
	return px.Handler()
}

// sample is one request's latencies: to the response headers and to the
// end of the body.
type sample struct{ ttfb, total time.Duration }

// post sends one chat completion, reads the whole answer, and checks it.
func post(c *http.Client, target string, body []byte, session string, wantHistory string) (sample, error) {
	req, err := benchfix.NewRequest(target, body, session)
	if err != nil {
		return sample{}, err
	}
	t0 := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return sample{}, err
	}
	ttfb := time.Since(t0)
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	s := sample{ttfb: ttfb, total: time.Since(t0)}
	switch {
	case err != nil:
	case resp.StatusCode != http.StatusOK:
		err = fmt.Errorf("status %d", resp.StatusCode)
	case wantHistory != "" && resp.Header.Get("X-History-Messages") != wantHistory:
		err = fmt.Errorf("X-History-Messages %q, want %s (X-History %q)", resp.Header.Get("X-History-Messages"),
			wantHistory, resp.Header.Get("X-History"))
	}
	return s, err
}

// target is one proxy under test with its clients' sessions.
type target struct {
	url      string
	sessions [][]string // per client; nil for the bare proxy
	want     string     // expected X-History-Messages
	next     []int      // per client: requests sent so far
	samples  []sample
	wall     time.Duration
	bytes    uint64
	allocs   uint64
}

// run sends n requests from clients concurrent clients, each its share,
// and records their latencies.
func (t *target) run(b *testing.B, c *http.Client, body []byte, n int) {
	b.Helper()
	clients := len(t.next)
	var wg sync.WaitGroup
	var failed atomic.Pointer[error]
	samples := make([][]sample, clients)
	t0 := time.Now()
	for w := 0; w < clients; w++ {
		share := n*(w+1)/clients - n*w/clients
		wg.Add(1)
		go func() { // ends after share requests, or at the first error
			defer wg.Done()
			out := make([]sample, 0, share)
			for range share {
				session := "bench:bare@example.com:support"
				if t.sessions != nil {
					session = t.sessions[w][t.next[w]/benchfix.TurnsPerSession]
				}
				t.next[w]++
				s, err := post(c, t.url, body, session, t.want)
				if err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
				out = append(out, s)
			}
			samples[w] = out
		}()
	}
	wg.Wait()
	t.wall += time.Since(t0)
	if err := failed.Load(); err != nil {
		b.Fatalf("%s: %v", t.url, *err)
	}
	for _, s := range samples {
		t.samples = append(t.samples, s...)
	}
}

// seed gives each of clients clients enough fresh sessions, each holding
// the history, for n requests (plus warm-up) at benchfix.TurnsPerSession
// turns each.
func seed(b *testing.B, store proxy.Store, clients, n int) [][]string {
	b.Helper()
	per := (n/clients+maxRounds+1+2)/benchfix.TurnsPerSession + 1
	seedHistory := benchfix.History(benchfix.HistoryLen)
	out := make([][]string, clients)
	var wg sync.WaitGroup
	errs := make([]error, clients)
	for w := range out {
		wg.Add(1)
		go func() { // ends after per sessions
			defer wg.Done()
			for i := 0; i < per; i++ {
				id := fmt.Sprintf("bench:client%d-s%d@example.com:support", w, i)
				_, err := store.Append(context.Background(), id, history.Turn{Messages: seedHistory}, history.Policy{})
				if err != nil {
					errs[w] = err
					return
				}
				out[w] = append(out[w], id)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	return out
}

// percentile is the q-quantile (0 < q <= 1) of sorted durations, by the
// nearest-rank method, in µs.
func percentile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*q+0.999999) - 1
	return float64(sorted[min(max(i, 0), len(sorted)-1)].Nanoseconds()) / 1e3
}

func sortedLatencies(ss []sample, ttfb bool) []time.Duration {
	out := make([]time.Duration, len(ss))
	for i, s := range ss {
		out[i] = s.total
		if ttfb {
			out[i] = s.ttfb
		}
	}
	slices.Sort(out)
	return out
}

// BenchmarkOverhead compares historyproxy with a bare ReverseProxy, both in
// front of the same upstream, for each store, reply kind and number of
// concurrent clients. b.N requests go through each of the two proxies,
// interleaved in rounds. ns/op, B/op and allocs/op are historyproxy's
// (the whole process: client, proxy and upstream); the bare proxy's are
// reported as bare-ns/op, bare-B/op and bare-allocs/op. Latencies are
// per request, in µs, end of body (p50, p99) and response headers (ttfb);
// an overhead is historyproxy's percentile minus the bare one.
func BenchmarkOverhead(b *testing.B) {
	upURL := benchfix.StartUpstream(b)
	bareSrv := httptest.NewServer(benchfix.Bare(upURL))
	defer bareSrv.Close()

	// One redis-server for the whole benchmark, when there is one; each run
	// takes a fresh key prefix.
	var redisSrv *redistest.Server
	if _, err := exec.LookPath("redis-server"); err == nil {
		redisSrv = redistest.Start(b)
	}
	var prefixes atomic.Int64

	for _, storeName := range []string{"memory", "redis"} {
		for _, kind := range []string{"json", "sse"} {
			for _, clients := range []int{1, 8} {
				name := fmt.Sprintf("store=%s/reply=%s/clients=%d", storeName, kind, clients)
				b.Run(name, func(b *testing.B) {
					var store proxy.Store
					switch storeName {
					case "memory":
						store = history.NewMemory()
					case "redis":
						if redisSrv == nil {
							b.Skip("redis-server not installed: apt-get install -y redis-server")
						}
						c := redisSrv.Client(b)
						store = history.NewRedis(c, "hpbench"+strconv.FormatInt(prefixes.Add(1), 10))
					}
					hpSrv := httptest.NewServer(historyproxy(b, upURL, store))
					defer hpSrv.Close()
					overhead(b, bareSrv.URL, hpSrv.URL, store, benchfix.RequestBody(kind == "sse"), clients)
				})
			}
		}
	}
}

func overhead(b *testing.B, bareURL, hpURL string, store proxy.Store, body []byte, clients int) {
	c := &http.Client{Transport: benchfix.Transport(), Timeout: 30 * time.Second}
	defer c.CloseIdleConnections()
	n := b.N
	bareT := &target{url: bareURL + "/v1/chat/completions", next: make([]int, clients)}
	hpT := &target{url: hpURL + "/v1/chat/completions", next: make([]int, clients),
		sessions: seed(b, store, clients, n), want: strconv.Itoa(benchfix.HistoryLen)}

	// Warm up: open every client's connections, then forget the samples.
	bareT.run(b, c, body, 2*clients)
	hpT.run(b, c, body, 2*clients)
	bareT.samples, bareT.wall, hpT.samples, hpT.wall = nil, 0, nil, 0

	rounds := min(maxRounds, max(1, n/(20*clients)))
	var ms runtime.MemStats
	b.ReportAllocs()
	b.ResetTimer()
	for r := 0; r < rounds; r++ {
		chunk := n*(r+1)/rounds - n*r/rounds
		runBare := func() {
			b.StopTimer()
			runtime.ReadMemStats(&ms)
			bytes0, allocs0 := ms.TotalAlloc, ms.Mallocs
			bareT.run(b, c, body, chunk)
			runtime.ReadMemStats(&ms)
			bareT.bytes += ms.TotalAlloc - bytes0
			bareT.allocs += ms.Mallocs - allocs0
			b.StartTimer()
		}
		if r%2 == 0 {
			runBare()
			hpT.run(b, c, body, chunk)
		} else {
			hpT.run(b, c, body, chunk)
			runBare()
		}
	}
	b.StopTimer()

	bt, ht := sortedLatencies(bareT.samples, false), sortedLatencies(hpT.samples, false)
	bf, hf := sortedLatencies(bareT.samples, true), sortedLatencies(hpT.samples, true)
	b.ReportMetric(percentile(ht, 0.50), "p50-us")
	b.ReportMetric(percentile(ht, 0.99), "p99-us")
	b.ReportMetric(percentile(bt, 0.50), "bare-p50-us")
	b.ReportMetric(percentile(bt, 0.99), "bare-p99-us")
	b.ReportMetric(percentile(ht, 0.50)-percentile(bt, 0.50), "p50-overhead-us")
	b.ReportMetric(percentile(ht, 0.99)-percentile(bt, 0.99), "p99-overhead-us")
	b.ReportMetric(percentile(hf, 0.50)-percentile(bf, 0.50), "ttfb-p50-overhead-us")
	b.ReportMetric(float64(bareT.wall.Nanoseconds())/float64(n), "bare-ns/op")
	b.ReportMetric(float64(bareT.bytes)/float64(n), "bare-B/op")
	b.ReportMetric(float64(bareT.allocs)/float64(n), "bare-allocs/op")
}

// BenchmarkStoreAppend is the store's write of one turn (a user message and
// the reply, with an idempotency key, as the proxy sends it) to a session
// that already took turnsPerDay keyed turns in the last 24 hours, at a
// steady rate: every timed Append lets exactly one old key expire, so the
// session's set of idempotency keys keeps its size whatever b.N is.
// turnsPerDay=0 appends without a key. MemoryStore drops expired keys by
// scanning all of them on every Append, under its one lock.
func BenchmarkStoreAppend(b *testing.B) {
	var redisSrv *redistest.Server
	if _, err := exec.LookPath("redis-server"); err == nil {
		redisSrv = redistest.Start(b)
	}
	turn := benchfix.History(2)
	for _, bc := range []struct {
		store       string
		turnsPerDay int
	}{{"memory", 0}, {"memory", 1_000}, {"memory", 10_000}, {"redis", 0}, {"redis", 10_000}} {
		b.Run(fmt.Sprintf("store=%s/turns-per-day=%d", bc.store, bc.turnsPerDay), func(b *testing.B) {
			var store proxy.Store
			if bc.store == "memory" {
				store = history.NewMemory()
			} else {
				if redisSrv == nil {
					b.Skip("redis-server not installed")
				}
				store = history.NewRedis(redisSrv.Client(b), fmt.Sprintf("hpappend%d", time.Now().UnixNano()))
			}
			ctx := context.Background()
			const session = "bench:long@example.com:support"
			day := history.IdempotencyWindow.Milliseconds()
			base := time.Now().UnixMilli() - day
			step := int64(1)
			if bc.turnsPerDay > 0 {
				step = day / int64(bc.turnsPerDay)
			}
			appendTurn := func(i int) error {
				t := history.Turn{Messages: turn, NowMs: base + int64(i)*step}
				if bc.turnsPerDay > 0 {
					t.IdempotencyKey = "hp-bench-" + strconv.Itoa(i)
				}
				_, err := store.Append(ctx, session, t, history.Policy{})
				return err
			}
			for i := 0; i < bc.turnsPerDay; i++ {
				if err := appendTurn(i); err != nil {
					b.Fatal(err)
				}
			}
			i := bc.turnsPerDay
			b.ReportAllocs()
			for b.Loop() {
				if err := appendTurn(i); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

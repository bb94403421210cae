// Package harness is historyproxy's end-to-end benchmark. It builds
// historyproxy the way a user does, starts it and its references as
// separate processes on loopback (a fake upstream, a bare reverse proxy, a
// floor proxy and a real redis-server), drives each with the closed-loop
// load generator of package load, and prints one table per scenario with
// every path side by side. The paths of a scenario run interleaved, in
// rounds, and the tables show medians over the rounds, so that noise on a
// shared machine hits all paths alike. See bench/README.md.
package harness

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/bench/load"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

// The modes a Config can run.
const (
	ModeJSON = "json" // whole replies
	ModeSSE  = "sse"  // streamed replies
	ModeHold = "hold" // many streams held open at once, for memory
)

// Config says what to run. Defaults and Short give the two usual ones.
type Config struct {
	Modes       []string      // ModeJSON, ModeSSE, ModeHold
	Concurrency []int         // clients, per scenario
	Stored      []int         // messages stored in each session before a run, per scenario
	Rounds      int           // rounds per scenario; the tables show their medians
	Duration    time.Duration // of one path's run in one round
	Requests    int           // when positive, a run is this many requests per client instead of Duration
	Warmup      int           // requests per client before a path's first round
	HoldStreams int           // streams held open at once in ModeHold

	// Baseline, when set, is another historyproxy binary (an earlier
	// build) run beside this one with the Redis store, as the path
	// "baseline Redis": a change measured against what it changes, in
	// the same rounds.
	Baseline string

	// HoldProfiles, when set, is a directory: in ModeHold historyproxy
	// (and the baseline) run with -admin-pprof, and while the streams are
	// open their heap profile and goroutine list are written there
	// (<path>-heap.pb.gz, after a collection; <path>-heap.txt, the same
	// as text ending with the runtime's memory statistics just after it;
	// <path>-goroutine.txt), to see what each stream holds. The profiler costs nothing while idle, and both builds run
	// with it.
	HoldProfiles string

	Upstream benchfix.UpstreamOptions // the fake upstream's delays and chunks
	Markdown bool                     // tables in Markdown instead of aligned text
	Command  string                   // the command line, printed in the header

	Stdout io.Writer // the tables
	Stderr io.Writer // progress

	// binDir, when set, holds the programs already built (by build), so
	// that the package's tests build them once.
	binDir string
}

// Defaults is the full benchmark of issue 10: both reply kinds at 1, 16
// and 64 clients, with 20 and with 10,000 stored messages, 3 rounds of 5 s,
// and 1,000 streams held open.
func Defaults() Config {
	return Config{
		Modes:       []string{ModeJSON, ModeSSE, ModeHold},
		Concurrency: []int{1, 16, 64},
		Stored:      []int{benchfix.HistoryLen, 10_000},
		Rounds:      3,
		Duration:    5 * time.Second,
		Warmup:      20,
		HoldStreams: 1000,
		Upstream:    benchfix.UpstreamOptions{Chunks: benchfix.StreamChunks},
		Stdout:      os.Stdout,
		Stderr:      os.Stderr,
	}
}

// Short is a smoke test of every part in a few seconds: both reply kinds
// and the held streams, with every path, but one small scenario each and
// runs too short for their figures to mean anything. Its runs are a fixed
// number of requests, not a duration, so that it takes little CPU from
// whatever else the machine runs (go test ./... runs packages in
// parallel).
func Short() Config {
	c := Defaults()
	c.Concurrency = []int{2}
	// More than the window, so that the seeding of long conversations
	// runs too.
	c.Stored = []int{3 * benchfix.HistoryLen}
	c.Rounds = 1
	c.Requests = 20
	c.Warmup = 3
	c.HoldStreams = 10
	return c
}

// Path names, in the order the tables list them.
const (
	pathDirect   = "direct"
	pathBare     = "bare"
	pathFloor    = "floor"
	pathHPMemory = "historyproxy memory"
	pathHPRedis  = "historyproxy Redis"
	pathBaseline = "baseline Redis" // Config.Baseline
)

// The key prefixes of the floor's and historyproxy's data in the shared
// redis-server.
const (
	floorPrefix    = "floor"
	hpPrefix       = "hp"
	baselinePrefix = "hpbase"
)

// Run builds the programs, starts redis-server, runs every scenario Config
// asks for and prints its table. The processes' logs are kept in a
// temporary directory, which is named on failure and removed on success.
func Run(ctx context.Context, c Config) (err error) {
	if c.Rounds < 1 || c.Duration <= 0 && c.Requests <= 0 || len(c.Concurrency) == 0 && hasLoad(c.Modes) || len(c.Stored) == 0 && hasLoad(c.Modes) {
		return errors.New("harness: nothing to run: need rounds, a duration, clients and stored counts")
	}
	for _, m := range c.Modes {
		if m != ModeJSON && m != ModeSSE && m != ModeHold {
			return fmt.Errorf("harness: mode %q: want %s, %s or %s", m, ModeJSON, ModeSSE, ModeHold)
		}
	}
	root, err := repoRoot(ctx)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "hpbench-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\n(process logs: %s)", err, dir)
			return
		}
		_ = os.RemoveAll(dir)
	}()

	bins := c.binDir
	if bins == "" {
		fmt.Fprintln(c.Stderr, "building historyproxy and the benchmark's servers ...")
		if err := build(ctx, root, dir); err != nil {
			return err
		}
		bins = dir
	}
	redisProc, err := startRedis(ctx, dir)
	if err != nil {
		return err
	}
	defer redisProc.stop()
	rdb := redis.NewClient(&redis.Options{Addr: redisProc.addr, PoolSize: 16})
	defer rdb.Close()

	h := &harness{cfg: c, dir: dir, bins: bins, redis: redisProc, rdb: rdb}
	h.header(ctx, root)
	id := 0
	for _, mode := range c.Modes {
		if mode == ModeHold {
			continue
		}
		for _, clients := range c.Concurrency {
			for _, stored := range c.Stored {
				id++
				s := scenario{id: id, stream: mode == ModeSSE, clients: clients, stored: stored}
				if err := h.runScenario(ctx, s); err != nil {
					return fmt.Errorf("%s: %w", s, err)
				}
			}
		}
	}
	if slices.Contains(c.Modes, ModeHold) {
		if err := h.runHold(ctx, id+1); err != nil {
			return fmt.Errorf("hold %d streams: %w", c.HoldStreams, err)
		}
	}
	return nil
}

func hasLoad(modes []string) bool {
	return slices.Contains(modes, ModeJSON) || slices.Contains(modes, ModeSSE)
}

// harness is one Run.
type harness struct {
	cfg   Config
	dir   string // logs
	bins  string // the built programs
	redis *proc
	rdb   *redis.Client
}

// scenario is one table: a reply kind, a number of clients and a stored
// conversation length.
type scenario struct {
	id      int // keeps session names apart between scenarios
	stream  bool
	clients int
	stored  int
}

func (s scenario) String() string {
	kind := "json"
	if s.stream {
		kind = "sse"
	}
	return fmt.Sprintf("%s · %d clients · %d stored messages", kind, s.clients, s.stored)
}

// header prints what the figures were taken on.
func (h *harness) header(ctx context.Context, root string) {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	redisVersion, _ := exec.CommandContext(ctx, "redis-server", "--version").Output()
	rev, _ := exec.CommandContext(ctx, "git", "-C", root, "describe", "--always", "--dirty").Output()
	loadavg := "unknown"
	if b, err := os.ReadFile("/proc/loadavg"); err == nil && len(strings.Fields(string(b))) >= 3 {
		loadavg = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	u := h.cfg.Upstream
	fmt.Fprintf(h.cfg.Stdout, "historyproxy %s · %s · %s, %d CPUs · %s · %s\n", strings.TrimSpace(string(rev)),
		time.Now().UTC().Format("2006-01-02 15:04 MST"), cpu, runtime.NumCPU(), runtime.Version(),
		strings.Join(strings.Fields(string(redisVersion))[:min(3, len(strings.Fields(string(redisVersion))))], " "))
	fmt.Fprintf(h.cfg.Stdout, "upstream: delay %s, %d chunks, chunk delay %s · load average before: %s\n",
		u.Delay, cmp.Or(u.Chunks, benchfix.StreamChunks), u.ChunkDelay, loadavg)
	if h.cfg.Command != "" {
		fmt.Fprintf(h.cfg.Stdout, "command: %s\n", h.cfg.Command)
	}
}

// env is the processes of one scenario: each started afresh, so that no
// scenario inherits another's memory or stored conversations.
type env struct {
	upstream, bare, floor, hpMemory, hpRedis *proc
	baseline                                 *proc // nil without Config.Baseline
}

func (e *env) stop() {
	for _, p := range []*proc{e.baseline, e.hpRedis, e.hpMemory, e.floor, e.bare, e.upstream} {
		p.stop()
	}
}

// start starts the scenario's processes and empties Redis. With pprof,
// historyproxy and the baseline serve Go's profiler on their admin
// listener.
func (h *harness) start(ctx context.Context, pprof bool) (e *env, err error) {
	if err := h.rdb.FlushAll(ctx).Err(); err != nil {
		return nil, fmt.Errorf("flush redis: %w", err)
	}
	e = &env{}
	defer func() {
		if err != nil {
			e.stop()
		}
	}()
	u := h.cfg.Upstream
	if e.upstream, err = startServer(ctx, "fakeupstream", h.bin(binUpstream), []string{"-delay", u.Delay.String(),
		"-chunks", fmt.Sprint(cmp.Or(u.Chunks, benchfix.StreamChunks)), "-chunk-delay", u.ChunkDelay.String()}, h.dir); err != nil {
		return nil, err
	}
	up := "http://" + e.upstream.addr
	var hpArgs []string
	if pprof {
		hpArgs = []string{"-admin-pprof"}
	}
	redisURL := "redis://" + h.redis.addr + "/0"
	if e.bare, err = startServer(ctx, "bareproxy", h.bin(binBare), []string{"-upstream", up}, h.dir); err != nil {
		return nil, err
	}
	if e.floor, err = startServer(ctx, "floorproxy", h.bin(binFloor), []string{"-upstream", up, "-redis-url", redisURL,
		"-prefix", floorPrefix, "-window", fmt.Sprint(benchfix.HistoryLen)}, h.dir); err != nil {
		return nil, err
	}
	// The memory store's default cap (256 MiB) is below what the 64-client
	// scenarios with 10,000 stored messages hold: past it the store erases
	// the least recently active sessions, and their next request carries
	// no history. The benchmark measures the store holding everything.
	memConfig := filepath.Join(h.dir, "historyproxy-memory.yaml")
	if err = os.WriteFile(memConfig, []byte("store:\n  memory_max_bytes: 4294967296\n"), 0o600); err != nil {
		return nil, fmt.Errorf("write the memory instance's configuration: %w", err)
	}
	if e.hpMemory, err = startHistoryproxy(ctx, "historyproxy-memory", h.bin(binHistoryproxy),
		append([]string{"-config", memConfig, "-upstream", up + "/v1"}, hpArgs...), h.dir); err != nil {
		return nil, err
	}
	if e.hpRedis, err = startHistoryproxy(ctx, "historyproxy-redis", h.bin(binHistoryproxy),
		append([]string{"-upstream", up + "/v1", "-redis-url", redisURL, "-redis-prefix", hpPrefix}, hpArgs...), h.dir); err != nil {
		return nil, err
	}
	if h.cfg.Baseline != "" {
		if e.baseline, err = startHistoryproxy(ctx, "baseline-redis", h.cfg.Baseline,
			append([]string{"-upstream", up + "/v1", "-redis-url", redisURL, "-redis-prefix", baselinePrefix}, hpArgs...), h.dir); err != nil {
			return nil, err
		}
	}
	return e, nil
}

func (h *harness) bin(name string) string { return filepath.Join(h.bins, name) }

// path is one way to the upstream, as the tables compare them.
type path struct {
	name  string
	url   string // chat completions
	proc  *proc  // the process whose CPU and memory are the path's
	redis bool   // uses Redis, whose CPU is then reported with it
	seed  seeder // nil: no stored history
}

const chatPath = "/v1/chat/completions"

func (h *harness) paths(e *env) []*path {
	ps := []*path{
		{name: pathDirect, url: "http://" + e.upstream.addr + chatPath, proc: e.upstream},
		{name: pathBare, url: "http://" + e.bare.addr + chatPath, proc: e.bare},
		{name: pathFloor, url: "http://" + e.floor.addr + chatPath, proc: e.floor, redis: true,
			seed: seedFloor(h.rdb, floorPrefix)},
		{name: pathHPMemory, url: "http://" + e.hpMemory.addr + chatPath, proc: e.hpMemory,
			seed: seedHTTP("http://" + e.hpMemory.addr + chatPath)},
		{name: pathHPRedis, url: "http://" + e.hpRedis.addr + chatPath, proc: e.hpRedis, redis: true,
			seed: seedHistory(h.rdb, hpPrefix)},
	}
	if e.baseline != nil {
		ps = append(ps, &path{name: pathBaseline, url: "http://" + e.baseline.addr + chatPath, proc: e.baseline, redis: true,
			seed: seedHistory(h.rdb, baselinePrefix)})
	}
	return ps
}

// pool hands out a path's sessions to the clients of a scenario. A client
// moves on to a fresh session, seeded with the scenario's stored messages,
// every perSession requests, so that a conversation keeps about the
// scenario's length however many requests a run sends. Sessions are
// seeded before a run, as many as the run is expected to need; a client
// that needs more starts over with its first one (counted in reused).
type pool struct {
	tag        string // unique per scenario and path
	stored     int
	perSession int
	seed       seeder
	seeded     []int // per client: sessions seeded
	used       []int // per client: requests sent in the scenario
	reused     atomic.Int64
}

func newPool(tag string, clients, stored int, seed seeder) *pool {
	// Short conversations stay short (at most 100 messages more than
	// seeded); long ones may double.
	return &pool{tag: tag, stored: stored, perSession: max(50, stored/2), seed: seed,
		seeded: make([]int, clients), used: make([]int, clients)}
}

func (p *pool) name(client, n int) string {
	return fmt.Sprintf("bench:%s-c%d-n%d@example.com:support", p.tag, client, n)
}

// session is the session of the client's i-th request of the coming run.
func (p *pool) session(client, i int) string {
	n := (p.used[client] + i) / p.perSession
	if n >= p.seeded[client] {
		p.reused.Add(1)
		n %= p.seeded[client]
	}
	return p.name(client, n)
}

// ensure seeds sessions so that each client can send more requests.
func (p *pool) ensure(ctx context.Context, more int) error {
	var fresh []string
	for c := range p.seeded {
		for ; p.seeded[c]*p.perSession < p.used[c]+more; p.seeded[c]++ {
			fresh = append(fresh, p.name(c, p.seeded[c]))
		}
	}
	if len(fresh) == 0 {
		return nil
	}
	return p.seed(ctx, fresh, p.stored)
}

// advance records a run's requests per client.
func (p *pool) advance(perClient []int) {
	for c, n := range perClient {
		p.used[c] += n
	}
}

// runScenario runs every path of s, interleaved in rounds, and prints the
// table.
func (h *harness) runScenario(ctx context.Context, s scenario) error {
	e, err := h.start(ctx, false)
	if err != nil {
		return err
	}
	defer e.stop()
	paths := h.paths(e)
	body := benchfix.RequestBody(s.stream)
	want := fmt.Sprint(min(s.stored, benchfix.HistoryLen))

	type state struct {
		pool   *pool
		client *http.Client
		rate   float64 // the last run's requests/s, to size the next run's seeding
		rounds []result
	}
	st := make([]*state, len(paths))
	for i, p := range paths {
		st[i] = &state{client: &http.Client{Transport: load.NewTransport(s.clients)}}
		defer st[i].client.CloseIdleConnections()
		if p.seed != nil {
			st[i].pool = newPool(fmt.Sprintf("%d-%d", s.id, i), s.clients, s.stored, p.seed)
		}
	}
	runCfg := func(i int) load.Config {
		c := load.Config{URL: paths[i].url, Body: body, Concurrency: s.clients, Client: st[i].client}
		if pl := st[i].pool; pl != nil {
			c.Session, c.WantHistory = pl.session, want
		}
		return c
	}

	fmt.Fprintf(h.cfg.Stderr, "%s: seeding and warming up ...\n", s)
	for i := range paths {
		c := runCfg(i)
		// At least one request: its rate sizes the first round's seeding.
		c.Requests = max(1, h.cfg.Warmup)
		if pl := st[i].pool; pl != nil {
			if err := pl.ensure(ctx, c.Requests); err != nil {
				return fmt.Errorf("%s: %w", paths[i].name, err)
			}
		}
		res, err := load.Run(ctx, c)
		if err != nil {
			return fmt.Errorf("%s: warm-up: %w", paths[i].name, err)
		}
		st[i].rate = res.Rate()
		if pl := st[i].pool; pl != nil {
			pl.advance(res.PerClient)
		}
	}
	for r := range h.cfg.Rounds {
		fmt.Fprintf(h.cfg.Stderr, "%s: round %d of %d\n", s, r+1, h.cfg.Rounds)
		// Each round starts with another path, so that none always runs
		// first or last.
		for j := range paths {
			i := (j + r) % len(paths)
			c := runCfg(i)
			c.Duration, c.Requests = h.cfg.Duration, h.cfg.Requests
			if pl := st[i].pool; pl != nil {
				// Seed for half as many requests again as the last run's
				// rate promises.
				more := int(st[i].rate*h.cfg.Duration.Seconds()*1.5)/s.clients + 2
				if c.Requests > 0 {
					more = c.Requests
				}
				if err := pl.ensure(ctx, more); err != nil {
					return fmt.Errorf("%s: %w", paths[i].name, err)
				}
			}
			res, err := h.measure(ctx, paths[i], c)
			if err != nil {
				return fmt.Errorf("%s: round %d: %w", paths[i].name, r+1, err)
			}
			st[i].rate = res.rate
			st[i].rounds = append(st[i].rounds, res)
			if pl := st[i].pool; pl != nil {
				pl.advance(res.perClient)
			}
		}
	}

	rows := make([]row, len(paths))
	var notes []string
	for i, p := range paths {
		rows[i] = row{name: p.name, rounds: st[i].rounds}
		if pl := st[i].pool; pl != nil && pl.reused.Load() > 0 {
			notes = append(notes, fmt.Sprintf("%s: %d requests went to a session a second time (seeding fell short of the rate)",
				p.name, pl.reused.Load()))
		}
	}
	run := h.cfg.Duration.String()
	if h.cfg.Requests > 0 {
		run = fmt.Sprintf("%d requests per client", h.cfg.Requests)
	}
	title := fmt.Sprintf("%s · medians of %d round(s) of %s", s, h.cfg.Rounds, run)
	fmt.Fprintln(h.cfg.Stdout)
	writeTable(h.cfg.Stdout, title, loadTable(rows, s.stream), h.cfg.Markdown)
	for _, n := range notes {
		fmt.Fprintln(h.cfg.Stdout, "note:", n)
	}
	return nil
}

// result is one path's run in one round.
type result struct {
	rate      float64 // requests/s
	p50, p99  time.Duration
	ttfb      time.Duration // p50 to the first byte of the body
	cpu       time.Duration // the path's process, per request
	redisCPU  time.Duration // redis-server, per request; -1 when the path does not use Redis
	peakBytes int64         // the path's process, during the run
	perClient []int         // requests each client sent
}

// measure runs c against p, with the CPU time of p's process (and of
// redis-server) and its peak resident memory over the run.
func (h *harness) measure(ctx context.Context, p *path, c load.Config) (result, error) {
	if err := p.proc.resetPeak(); err != nil {
		return result{}, fmt.Errorf("reset peak RSS: %w", err)
	}
	cpu0, err0 := p.proc.cpu()
	rcpu0, err1 := h.redis.cpu()
	res, err := load.Run(ctx, c)
	if err != nil {
		return result{}, err
	}
	cpu1, err2 := p.proc.cpu()
	rcpu1, err3 := h.redis.cpu()
	_, peak, err4 := p.proc.memory()
	if err := errors.Join(err0, err1, err2, err3, err4); err != nil {
		return result{}, err
	}
	n := max(res.Requests, 1)
	out := result{
		rate: res.Rate(), perClient: res.PerClient,
		p50: load.Percentile(res.Latency, 0.50), p99: load.Percentile(res.Latency, 0.99),
		ttfb: load.Percentile(res.TTFB, 0.50),
		cpu:  (cpu1 - cpu0) / time.Duration(n), redisCPU: -1, peakBytes: peak,
	}
	if p.redis {
		out.redisCPU = (rcpu1 - rcpu0) / time.Duration(n)
	}
	return out, nil
}

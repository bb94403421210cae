package harness

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/historyproxy/historyproxy/bench/load"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

// holdTimeout bounds how long opening the held streams may take.
const holdTimeout = 2 * time.Minute

// runHold opens HoldStreams streams at once through each path, each in its
// own session with the usual stored history, and reports the resident
// memory of the path's process before and while they are open. The
// upstream pauses every stream after its first content chunk
// (benchfix.PauseHeader) until the harness lets go of them; the proxies
// then see their clients leave, as in a real cut stream.
//
// It runs Config.Rounds rounds, each with every process started afresh,
// and the table shows medians: one reading of a process's memory moves by
// several percent with where its collector stood when the last stream
// opened.
func (h *harness) runHold(ctx context.Context, id int) error {
	n := h.cfg.HoldStreams
	type reading struct{ idle, open, opened []float64 }
	var names []string
	got := map[string]*reading{}
	for r := range h.cfg.Rounds {
		fmt.Fprintf(h.cfg.Stderr, "hold: round %d of %d\n", r+1, h.cfg.Rounds)
		// The profiles are the last round's.
		profiles := ""
		if r == h.cfg.Rounds-1 {
			profiles = h.cfg.HoldProfiles
		}
		e, err := h.start(ctx, profiles != "")
		if err != nil {
			return err
		}
		paths := h.paths(e)
		if names == nil {
			for _, p := range paths {
				names = append(names, p.name)
				got[p.name] = &reading{}
			}
		}
		// In the same order every round: direct's process is the
		// upstream, which serves every path's streams after its own.
		for i := range paths {
			idle, open, opened, err := h.holdPath(ctx, paths[i], fmt.Sprintf("%d-%d-%d", id, r, i), profiles)
			if err != nil {
				e.stop()
				return fmt.Errorf("round %d: %s: %w", r+1, paths[i].name, err)
			}
			g := got[paths[i].name]
			g.idle, g.open, g.opened = append(g.idle, idle), append(g.open, open), append(g.opened, opened)
		}
		e.stop()
	}
	cells := [][]string{{"path", "RSS idle MB", fmt.Sprintf("RSS with %d open MB", n), "KB/stream", "RSS open ÷bare", "opened in s"}}
	bare := got[pathBare].open
	for _, name := range names {
		g := got[name]
		perStream := make([]float64, len(g.open))
		for r := range g.open {
			perStream[r] = (g.open[r] - g.idle[r]) / float64(n) / (1 << 10)
		}
		cells = append(cells, []string{name, fmt.Sprintf("%.1f", median(g.idle)/(1<<20)),
			fmt.Sprintf("%.1f", median(g.open)/(1<<20)), fmt.Sprintf("%.1f", median(perStream)),
			ratioTo(name, g.open, bare), fmt.Sprintf("%.2f", median(g.opened))})
	}
	fmt.Fprintln(h.cfg.Stdout)
	writeTable(h.cfg.Stdout, fmt.Sprintf("hold · %d streams open at once · %d stored messages each · medians of %d round(s)",
		n, benchfix.HistoryLen, h.cfg.Rounds), cells, h.cfg.Markdown)
	return nil
}

// holdPath opens the held streams through p, in sessions named after tag,
// and returns p's resident memory (bytes) before and with them open, and
// how long opening them took (seconds). With profiles, it saves p's
// profiles there meanwhile.
func (h *harness) holdPath(ctx context.Context, p *path, tag, profiles string) (idle, open, opened float64, err error) {
	n := h.cfg.HoldStreams
	fmt.Fprintf(h.cfg.Stderr, "hold: %s: %d streams ...\n", p.name, n)
	session := func(k int) string { return fmt.Sprintf("bench:hold%s-%d@example.com:support", tag, k) }
	if p.seed != nil {
		pl := newPool(tag, n, benchfix.HistoryLen, p.seed)
		if err := pl.ensure(ctx, 1); err != nil {
			return 0, 0, 0, err
		}
		session = func(k int) string { return pl.name(k, 0) }
	}
	rssIdle, _, err := p.proc.memory()
	if err != nil {
		return 0, 0, 0, err
	}
	body := benchfix.RequestBody(true)
	header := http.Header{benchfix.PauseHeader: {holdTimeout.String()}}
	client := &http.Client{Transport: load.NewTransport(n)}
	defer client.CloseIdleConnections()
	hctx, cancel := context.WithTimeout(ctx, holdTimeout)
	defer cancel()
	t0 := time.Now()
	held, err := load.Hold(hctx, client, n, func(ctx context.Context, k int) (*http.Request, error) {
		return load.NewRequest(ctx, p.url, body, session(k), header)
	})
	took := time.Since(t0)
	if err != nil {
		return 0, 0, 0, err
	}
	defer held.Close()
	rssOpen, _, err := p.proc.memory()
	if err == nil && profiles != "" && p.proc.admin != "" {
		err = saveProfiles(hctx, profiles, p)
	}
	if ended := held.Ended(); err == nil && ended > 0 {
		err = fmt.Errorf("%d of %d streams ended before they were let go: were they paused (%s)?",
			ended, n, benchfix.PauseHeader)
	}
	return float64(rssIdle), float64(rssOpen), took.Seconds(), err
}

// saveProfiles writes p's heap profile and goroutine list, taken from its
// admin listener's profiler, to dir (Config.HoldProfiles). heap.txt ends
// with the runtime's memory statistics just after the heap profile's
// collection: HeapAlloc is the live heap, Stack the goroutines' stacks.
func saveProfiles(ctx context.Context, dir string, p *path) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	name := strings.ReplaceAll(p.name, " ", "-")
	// In this order: the text's statistics are those just after the
	// profile's collection, the live heap.
	for _, f := range [][2]string{{"goroutine.txt", "goroutine?debug=1"}, {"heap.pb.gz", "heap?gc=1"}, {"heap.txt", "heap?debug=1"}} {
		if err := fetch(ctx, "http://"+p.proc.admin+"/debug/pprof/"+f[1], filepath.Join(dir, name+"-"+f[0])); err != nil {
			return fmt.Errorf("profile %s: %w", p.name, err)
		}
	}
	return nil
}

func fetch(ctx context.Context, url, file string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// ratioTo is ratio(open, bare) for a proxy's row; direct's process is the
// upstream, not a proxy: "-".
func ratioTo(name string, open, bare []float64) string {
	if name == pathDirect {
		return "-"
	}
	return ratio(open, bare)
}

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
func (h *harness) runHold(ctx context.Context, id int) error {
	e, err := h.start(ctx, h.cfg.HoldProfiles != "")
	if err != nil {
		return err
	}
	defer e.stop()
	n := h.cfg.HoldStreams
	body := benchfix.RequestBody(true)
	header := http.Header{benchfix.PauseHeader: {holdTimeout.String()}}
	cells := [][]string{{"path", "RSS idle MB", fmt.Sprintf("RSS with %d open MB", n), "KB/stream", "RSS open ÷bare", "opened in s"}}
	var bareOpen int64
	for i, p := range h.paths(e) {
		fmt.Fprintf(h.cfg.Stderr, "hold: %s: %d streams ...\n", p.name, n)
		session := func(k int) string { return fmt.Sprintf("bench:hold%d-%d@example.com:support", id, k) }
		if p.seed != nil {
			pl := newPool(fmt.Sprintf("%d-%d", id, i), n, benchfix.HistoryLen, p.seed)
			if err := pl.ensure(ctx, 1); err != nil {
				return fmt.Errorf("%s: %w", p.name, err)
			}
			session = func(k int) string { return pl.name(k, 0) }
		}
		idle, _, err := p.proc.memory()
		if err != nil {
			return err
		}
		client := &http.Client{Transport: load.NewTransport(n)}
		hctx, cancel := context.WithTimeout(ctx, holdTimeout)
		t0 := time.Now()
		held, err := load.Hold(hctx, client, n, func(ctx context.Context, k int) (*http.Request, error) {
			return load.NewRequest(ctx, p.url, body, session(k), header)
		})
		opened := time.Since(t0)
		var open int64
		if err == nil {
			open, _, err = p.proc.memory()
			if err == nil && h.cfg.HoldProfiles != "" && p.proc.admin != "" {
				err = saveProfiles(hctx, h.cfg.HoldProfiles, p)
			}
			if ended := held.Ended(); err == nil && ended > 0 {
				err = fmt.Errorf("%d of %d streams ended before they were let go: were they paused (%s)?",
					ended, n, benchfix.PauseHeader)
			}
			held.Close()
		}
		cancel()
		client.CloseIdleConnections()
		if err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		if p.name == pathBare {
			bareOpen = open
		}
		ratio := "-"
		if bareOpen > 0 {
			ratio = fmt.Sprintf("%.2fx", float64(open)/float64(bareOpen))
		}
		cells = append(cells, []string{p.name, fmt.Sprintf("%.1f", float64(idle)/(1<<20)),
			fmt.Sprintf("%.1f", float64(open)/(1<<20)), fmt.Sprintf("%.1f", float64(open-idle)/float64(n)/(1<<10)),
			ratio, fmt.Sprintf("%.2f", opened.Seconds())})
	}
	fmt.Fprintln(h.cfg.Stdout)
	writeTable(h.cfg.Stdout, fmt.Sprintf("hold · %d streams open at once · %d stored messages each", n, benchfix.HistoryLen),
		cells, h.cfg.Markdown)
	return nil
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

package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// buildDir holds the programs the tests build, once, for all of them.
var buildDir string

func TestMain(m *testing.M) {
	var err error
	if buildDir, err = os.MkdirTemp("", "hpbench-test-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(buildDir)
	os.Exit(code)
}

var buildOnce = sync.OnceValue(func() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	root, err := repoRoot(ctx)
	if err != nil {
		return err
	}
	return build(ctx, root, buildDir)
})

// built skips the test where it cannot run (in -short, or without
// redis-server outside CI) and returns the directory of the built
// programs.
func built(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and starts historyproxy, its references and redis-server")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("redis-server not installed")
		}
		t.Skip("redis-server not installed: apt-get install -y redis-server")
	}
	if err := buildOnce(); err != nil {
		t.Fatal(err)
	}
	return buildDir
}

// TestShort runs the whole harness in its shortest mode, so that it
// cannot rot: every program builds and starts, every path answers with
// the stored history in place (load.Config.WantHistory), and every table
// has a row per path with figures in it. The figures themselves are not
// checked: a run this short on a shared machine measures nothing.
func TestShort(t *testing.T) {
	c := Short()
	c.binDir = built(t)
	var out, progress bytes.Buffer
	c.Stdout, c.Stderr = &out, &progress
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := Run(ctx, c); err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	t.Logf("\n%s", out.String())

	tables := map[string]bool{}
	var title string
	for line := range strings.Lines(out.String()) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "json ·"), strings.HasPrefix(line, "sse ·"), strings.HasPrefix(line, "hold ·"):
			title = strings.Fields(line)[0]
			tables[title] = true
		case title != "":
			for _, p := range []string{pathDirect, pathBare, pathFloor, pathHPMemory, pathHPRedis} {
				rest, ok := strings.CutPrefix(line, p+" ")
				if !ok {
					continue
				}
				// The first figure: requests/s, or the idle RSS for hold.
				v, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
				if err != nil || v <= 0 {
					t.Errorf("%s table, %s: first figure %q, want a positive number", title, p, strings.Fields(rest)[0])
				}
				tables[title+"/"+p] = true
			}
		}
	}
	for _, table := range []string{"json", "sse", "hold"} {
		for _, p := range []string{pathDirect, pathBare, pathFloor, pathHPMemory, pathHPRedis} {
			if !tables[table+"/"+p] {
				t.Errorf("no %s row in the %s table", p, table)
			}
		}
	}
}

// TestHoldProfiles: with HoldProfiles, the held streams leave each
// historyproxy's heap profile, its memory statistics and its goroutines,
// taken while the streams are open: the goroutine list holds them.
func TestHoldProfiles(t *testing.T) {
	c := Short()
	c.binDir = built(t)
	c.Modes, c.HoldStreams, c.HoldProfiles = []string{ModeHold}, 5, t.TempDir()
	var out, progress bytes.Buffer
	c.Stdout, c.Stderr = &out, &progress
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := Run(ctx, c); err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	for _, p := range []string{pathHPMemory, pathHPRedis} {
		name := filepath.Join(c.HoldProfiles, strings.ReplaceAll(p, " ", "-"))
		for file, want := range map[string]string{"-heap.pb.gz": "", "-heap.txt": "# Stack = ", "-goroutine.txt": "(*streamBody).Read"} {
			b, err := os.ReadFile(name + file)
			if err != nil || len(b) == 0 || !bytes.Contains(b, []byte(want)) {
				t.Errorf("%s%s: %d bytes, %v; want it holding %q", name, file, len(b), err, want)
			}
		}
	}
}

func TestLoadTable(t *testing.T) {
	r := func(rate float64, p50ms, p99ms float64, cpuUS int) result {
		return result{rate: rate, p50: time.Duration(p50ms * float64(time.Millisecond)),
			p99: time.Duration(p99ms * float64(time.Millisecond)), cpu: time.Duration(cpuUS) * time.Microsecond, redisCPU: -1}
	}
	rows := []row{
		{name: pathDirect, rounds: []result{r(1000, 1, 2, 10), r(900, 1.2, 2, 10), r(1100, 1, 3, 10)}},
		{name: pathFloor, rounds: []result{r(500, 2, 4, 100), r(400, 2.2, 4, 120), r(600, 2, 5, 80)}},
		{name: pathHPRedis, rounds: []result{r(250, 3, 8, 200), r(200, 3.2, 6, 300), r(300, 5, 9, 160)}},
	}
	got := loadTable(rows, false)
	want := [][]string{
		{"path", "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "TTFB ms", "CPU µs/req", "Redis µs/req", "peak RSS MB",
			"req/s ÷floor", "+p50 ÷floor", "+p99 ÷floor", "CPU ÷floor"},
		{pathDirect, "1000", "1.00", "2.00", "-", "-", "-", "10", "-", "0.0", "2.00x", "-", "-", "-"},
		{pathFloor, "500", "2.00", "4.00", "+1.00", "+2.00", "-", "100", "-", "0.0", "1.00x", "1.00x", "1.00x", "1.00x"},
		// Added p50 per round: 2, 2, 4 (median 2) over the floor's 1, 1,
		// 1: 2x. Added p99: 6, 4, 6 over 2, 2, 2: 3x, 2x, 3x.
		{pathHPRedis, "250", "3.20", "8.00", "+2.00", "+6.00", "-", "200", "-", "0.0", "0.50x", "2.00x", "3.00x", "2.00x"},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got\n%q\nwant\n%q", got, want)
	}
}

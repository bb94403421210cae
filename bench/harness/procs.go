package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/bench/internal/serve"
)

// startTimeout bounds how long a process may take to be ready.
const startTimeout = 30 * time.Second

// userHZ is the unit of /proc/<pid>/stat's utime and stime: USER_HZ, which
// Linux fixes at 100 for user space whatever the kernel's tick.
const userHZ = 100

// The programs the harness builds, by the name go build gives them.
const (
	binHistoryproxy = "historyproxy"
	binUpstream     = "fakeupstream"
	binBare         = "bareproxy"
	binFloor        = "floorproxy"
)

// repoRoot is the directory of the go.mod of the working directory's
// module: the harness builds the repository it runs from.
func repoRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside a Go module: run from the historyproxy repository")
	}
	return filepath.Dir(mod), nil
}

// build compiles historyproxy (the repository's main package, as a user
// builds it) and the benchmark's small servers into dir.
func build(ctx context.Context, root, dir string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator),
		".", "./bench/cmd/"+binUpstream, "./bench/cmd/"+binBare, "./bench/cmd/"+binFloor)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %w\n%s", err, out)
	}
	return nil
}

// proc is one server process the harness started, with what /proc says of
// it.
type proc struct {
	name  string
	addr  string // host:port it serves on
	admin string // historyproxy's admin listener (host:port); "" for the others
	log   string // file holding its stdout and stderr
	cmd   *exec.Cmd
	done  chan struct{} // closed when it has exited
}

// launch starts bin with args, its output going to a file in logDir. The
// process dies with the harness (Pdeathsig) should the harness be killed.
func launch(name, bin string, args []string, logDir string) (*proc, *os.File, error) {
	logPath := filepath.Join(logDir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p := &proc{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	return p, f, nil
}

func (p *proc) start(f *os.File) error {
	if err := p.cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	go func() { // ends when the process exits
		_ = p.cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return nil
}

// startServer starts one of the benchmark's servers on a loopback port of
// its choosing and learns the port from its first line of output.
func startServer(ctx context.Context, name, bin string, args []string, logDir string) (*proc, error) {
	p, f, err := launch(name, bin, append([]string{"-listen", "127.0.0.1:0"}, args...), logDir)
	if err != nil {
		return nil, err
	}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		f.Close()
		return nil, err
	}
	if err := p.start(f); err != nil {
		return nil, err
	}
	addr := make(chan string, 1)
	go func() { // ends at the server's exit (end of its stdout)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), serve.ListeningPrefix); ok {
				addr <- a
			}
		}
	}()
	select {
	case p.addr = <-addr:
		return p, nil
	case <-p.done:
		return nil, fmt.Errorf("%s exited at start: %s", name, p.tail())
	case <-time.After(startTimeout):
	case <-ctx.Done():
	}
	p.stop()
	return nil, fmt.Errorf("%s did not start within %s: %s", name, startTimeout, p.tail())
}

// startHistoryproxy starts the built historyproxy on free loopback ports
// (it does not print the port it bound) and waits until its admin listener
// says it is ready. It retries on other ports should one be taken between
// the probe and the bind.
func startHistoryproxy(ctx context.Context, name, bin string, args []string, logDir string) (*proc, error) {
	var lastErr error
	for range 3 {
		ports, err := freePorts(2)
		if err != nil {
			return nil, err
		}
		addr, admin := "127.0.0.1:"+strconv.Itoa(ports[0]), "127.0.0.1:"+strconv.Itoa(ports[1])
		p, f, err := launch(name, bin, append([]string{"-listen", addr, "-admin-listen", admin}, args...), logDir)
		if err != nil {
			return nil, err
		}
		p.addr, p.admin = addr, admin
		if err := p.start(f); err != nil {
			return nil, err
		}
		if lastErr = waitReady(ctx, p, "http://"+admin+"/readyz"); lastErr == nil {
			return p, nil
		}
		p.stop()
	}
	return nil, lastErr
}

// waitReady polls url until it answers 200.
func waitReady(ctx context.Context, p *proc, url string) error {
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited at start: %s", p.name, p.tail())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s not ready within %s: %s", p.name, startTimeout, p.tail())
}

// startRedis starts redis-server on a free loopback port, without
// persistence, and waits until it answers PING.
func startRedis(ctx context.Context, logDir string) (*proc, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("redis-server not found (apt-get install redis-server): %w", err)
	}
	dir := filepath.Join(logDir, "redis")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var lastErr error
	for range 3 {
		ports, err := freePorts(1)
		if err != nil {
			return nil, err
		}
		p, f, err := launch("redis-server", bin, []string{"--port", strconv.Itoa(ports[0]), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir, "--daemonize", "no"}, logDir)
		if err != nil {
			return nil, err
		}
		p.cmd.Stdout = p.cmd.Stderr
		p.addr = "127.0.0.1:" + strconv.Itoa(ports[0])
		if err := p.start(f); err != nil {
			return nil, err
		}
		if lastErr = waitPing(ctx, p); lastErr == nil {
			return p, nil
		}
		p.stop()
	}
	return nil, lastErr
}

func waitPing(ctx context.Context, p *proc) error {
	c := redis.NewClient(&redis.Options{Addr: p.addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		if c.Ping(ctx).Err() == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("redis-server exited at start: %s", p.tail())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("redis-server not answering within %s: %s", startTimeout, p.tail())
}

// freePorts finds n free loopback ports by binding them at once.
func freePorts(n int) ([]int, error) {
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports, nil
}

// stop sends SIGTERM and waits for the exit, killing the process after
// five seconds.
func (p *proc) stop() {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// tail is the end of the process's log, for error messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// cpu is the CPU time the process has used so far, user and system, all
// its threads (/proc/<pid>/stat utime + stime).
func (p *proc) cpu() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces:
	// count the fields after its closing one (field 3 onwards).
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", p.cmd.Process.Pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[14-3], 10, 64)
	stime, err2 := strconv.ParseInt(f[15-3], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", p.cmd.Process.Pid, err)
	}
	return time.Duration(utime+stime) * time.Second / userHZ, nil
}

// memory is the process's resident set now (VmRSS) and at its peak
// (VmHWM), in bytes.
func (p *proc) memory() (rss, peak int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, 0, err
	}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok || k != "VmRSS" && k != "VmHWM" {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/status %s: %w", p.cmd.Process.Pid, k, err)
		}
		if k == "VmRSS" {
			rss = kb << 10
		} else {
			peak = kb << 10
		}
	}
	return rss, peak, nil
}

// resetPeak makes VmHWM start again from the current resident set
// (clear_refs "5", Linux 4.0 and later), so that a peak belongs to one run.
func (p *proc) resetPeak() error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p.cmd.Process.Pid), []byte("5"), 0)
}

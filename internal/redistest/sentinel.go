package redistest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// Sentinel is a redis-server process in Sentinel mode, owned by a test.
type Sentinel struct {
	Addr string // 127.0.0.1:port

	proc *process
}

// StartSentinel starts a Sentinel on a free loopback port that monitors
// master under name (quorum 1, down after 1s), waits until it answers
// SENTINEL get-master-addr-by-name with master's address, and stops it in
// t.Cleanup. It runs redis-server --sentinel, so no redis-sentinel binary
// is needed. A TLS master is not supported.
func StartSentinel(t testing.TB, master *Server, name string) *Sentinel {
	t.Helper()
	if master.tls != nil {
		t.Fatalf("redistest: StartSentinel does not support a TLS master")
	}
	bin := lookPath(t, "redis-server")
	dir := t.TempDir()
	conf := filepath.Join(dir, "sentinel.conf")

	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("redistest: find free port: %v", err)
		}
		// Sentinel rewrites its config file (its id, what it learns), so
		// the file must be its own and writable; a retry starts afresh.
		text := fmt.Sprintf("port %d\nbind 127.0.0.1\n"+
			"sentinel monitor %s 127.0.0.1 %d 1\n"+
			"sentinel down-after-milliseconds %s 1000\n",
			port, name, master.port, name)
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatalf("redistest: write sentinel config: %v", err)
		}
		s := &Sentinel{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
		if lastErr = s.run(bin, dir, conf, name, master.Addr); lastErr == nil {
			t.Cleanup(s.proc.stop)
			return s
		}
	}
	t.Fatalf("redistest: start sentinel: %v", lastErr)
	return nil
}

func (s *Sentinel) run(bin, dir, conf, name, masterAddr string) error {
	p, err := startProcess(bin, dir, []string{conf, "--sentinel"})
	if err != nil {
		return err
	}
	ready := func() error {
		reply, err := do(s.Addr, nil, "SENTINEL", "get-master-addr-by-name", name)
		if err != nil {
			return err
		}
		if len(reply) != 2 || net.JoinHostPort(reply[0], reply[1]) != masterAddr {
			return fmt.Errorf("get-master-addr-by-name %s answered %q, want %s", name, reply, masterAddr)
		}
		return nil
	}
	if err := waitReady(ready, p.done); err != nil {
		p.stop()
		return fmt.Errorf("%s --sentinel on %s: %w\n%s", bin, s.Addr, err, p.out.String())
	}
	s.proc = p
	return nil
}

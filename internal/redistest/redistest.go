// Package redistest starts real redis-server processes for tests: a
// standalone server or a three-master Redis Cluster on loopback ports, each
// owned by the test that started it and stopped in its Cleanup.
//
// Tests talk to a real server rather than a fake so that Lua scripts,
// streams, expiry and Cluster slot rules behave exactly as in production.
package redistest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// startTimeout bounds how long a server may take to answer PING.
const startTimeout = 10 * time.Second

// clusterTimeout bounds how long joining a cluster may take, until every
// node reports cluster_state:ok; gossip is slower than a single start.
const clusterTimeout = 30 * time.Second

// Option changes how Start runs redis-server.
type Option func(*options)

type options struct {
	aof bool
	// extra arguments, used by StartCluster.
	args []string
}

// WithAOF turns on the append-only file with fsync on every write, so that
// data written before Stop is there again after Restart.
func WithAOF() Option {
	return func(o *options) { o.aof = true }
}

// Server is a redis-server process owned by a test.
type Server struct {
	Addr string // 127.0.0.1:port
	URL  string // redis://127.0.0.1:port/0
	Dir  string // data directory, kept across Stop and Restart

	port int
	args []string

	mu   sync.Mutex
	proc *process // nil when stopped
}

// process is one run of redis-server.
type process struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{} // closed when the process has exited
}

// Start starts redis-server on a free loopback port with its data dir in
// t.TempDir(), waits until it answers PING, and stops it in t.Cleanup. It
// skips the test when redis-server is not installed, unless the CI
// environment variable is "true", where a missing server is a failure.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	bin := lookPath(t, "redis-server")
	dir := t.TempDir()

	// Another process may take the free port between our probe and
	// redis-server's bind; try a few ports before giving up.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("redistest: find free port: %v", err)
		}
		s := &Server{
			Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
			URL:  fmt.Sprintf("redis://127.0.0.1:%d/0", port),
			Dir:  dir,
			port: port,
		}
		s.args = serverArgs(port, dir, o)
		if lastErr = s.run(bin); lastErr == nil {
			t.Cleanup(s.kill)
			return s
		}
	}
	t.Fatalf("redistest: start redis-server: %v", lastErr)
	return nil
}

func serverArgs(port int, dir string, o options) []string {
	args := []string{
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--save", "",
		"--dir", dir,
		"--daemonize", "no",
	}
	if o.aof {
		args = append(args, "--appendonly", "yes", "--appendfsync", "always")
	} else {
		args = append(args, "--appendonly", "no")
	}
	return append(args, o.args...)
}

// lookPath finds a Redis binary, skipping or failing the test without it.
func lookPath(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("redistest: %s not found on PATH; CI must install it (apt-get install -y redis-server): %v", name, err)
	}
	t.Skip("redis-server not installed: apt-get install -y redis-server")
	return ""
}

// freePort asks the kernel for a free loopback port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// run starts the process and waits until it answers PING. On failure the
// process is killed and the error carries the server's own output.
func (s *Server) run(bin string) error {
	out := &syncBuffer{}
	cmd := exec.Command(bin, s.args...)
	cmd.Dir = s.Dir
	cmd.Stdout = out
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("exec %s: %w", bin, err)
	}
	p := &process{cmd: cmd, out: out, done: make(chan struct{})}
	// This goroutine stops when the process exits (killed by Stop or
	// Cleanup, or by itself on a bad start).
	go func() {
		_ = cmd.Wait()
		close(p.done)
	}()
	s.mu.Lock()
	s.proc = p
	s.mu.Unlock()

	if err := waitPing(s.Addr, p.done); err != nil {
		s.kill()
		return fmt.Errorf("%s on %s: %w\n%s", bin, s.Addr, err, out.String())
	}
	return nil
}

// waitPing polls addr until PING answers, the process exits, or
// startTimeout passes. It speaks RESP over a plain connection: a go-redis
// client would retry and log each refused dial while the server starts.
func waitPing(addr string, exited <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	for {
		err := ping(addr)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no PING answer after %s: %w", startTimeout, err)
		}
		select {
		case <-exited:
			return errors.New("redis-server exited during start")
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		// -LOADING while the AOF is read back, for instance.
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

// kill sends SIGKILL and waits for the process to exit. It does nothing
// when the server is already stopped.
func (s *Server) kill() {
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Client returns a client of the server, closed in t.Cleanup. The database
// is not flushed.
func (s *Server) Client(t testing.TB) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: s.Addr})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Stop kills the process with SIGKILL, as a crash would, and keeps the data
// directory for Restart.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.kill()
}

// Restart starts the server again on the same port and data directory.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.kill()
	bin := lookPath(t, "redis-server")
	if err := s.run(bin); err != nil {
		t.Fatalf("redistest: restart redis-server: %v", err)
	}
}

// Cluster is a real 3-master Redis Cluster on loopback ports.
type Cluster struct {
	Addrs []string
}

// StartCluster starts three redis-server processes in cluster mode, joins
// them with redis-cli --cluster create (no replicas), waits until every node
// reports cluster_state:ok, and stops them in t.Cleanup.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	cli := lookPath(t, "redis-cli")
	c := &Cluster{}
	for i := 0; i < 3; i++ {
		// The cluster bus would default to port+10000, which may be past
		// 65535 or taken; give it its own free port.
		busPort, err := freePort()
		if err != nil {
			t.Fatalf("redistest: find free port: %v", err)
		}
		s := Start(t, func(o *options) {
			o.args = []string{
				"--cluster-enabled", "yes",
				"--cluster-config-file", "nodes.conf",
				"--cluster-node-timeout", "2000",
				"--cluster-port", strconv.Itoa(busPort),
			}
		})
		c.Addrs = append(c.Addrs, s.Addr)
	}

	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redistest: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	for _, addr := range c.Addrs {
		if err := waitClusterOK(ctx, addr); err != nil {
			t.Fatalf("redistest: cluster node %s: %v", addr, err)
		}
	}
	return c
}

// waitClusterOK polls CLUSTER INFO on addr until it says cluster_state:ok.
func waitClusterOK(ctx context.Context, addr string) error {
	c := redis.NewClient(&redis.Options{Addr: addr})
	defer c.Close()
	var info string
	for {
		var err error
		info, err = c.ClusterInfo(ctx).Result()
		if err == nil && strings.Contains(info, "cluster_state:ok") {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster_state not ok: %w (last info: %q)", ctx.Err(), info)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Client returns a cluster client that knows every node, closed in
// t.Cleanup.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	t.Helper()
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs})
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// syncBuffer collects a process's output; the process writes it from its
// own goroutine while a failed start reads it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Package redistest starts real redis-server processes for tests: a
// standalone server (plain or TLS), a three-master Redis Cluster or a
// Sentinel on loopback ports, each owned by the test that started it and
// stopped in its Cleanup.
//
// Tests talk to a real server rather than a fake so that Lua scripts,
// streams, expiry and Cluster slot rules behave exactly as in production.
package redistest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
	tls bool
	// extra arguments, used by StartCluster.
	args []string
}

// WithAOF turns on the append-only file with fsync on every write, so that
// data written before Stop is there again after Restart.
func WithAOF() Option {
	return func(o *options) { o.aof = true }
}

// WithTLS makes the server speak TLS only: a test CA and a server
// certificate for 127.0.0.1 and localhost are generated into its data
// directory, Server.URL is rediss://, Server.CAFile names the CA and Client
// trusts it. Clients need no certificate of their own. The test is skipped
// when redis-server was built without TLS support.
func WithTLS() Option {
	return func(o *options) { o.tls = true }
}

// Server is a redis-server process owned by a test.
type Server struct {
	Addr string // 127.0.0.1:port
	URL  string // redis://127.0.0.1:port/0, or rediss:// WithTLS
	Dir  string // data directory, kept across Stop and Restart
	// CAFile is the PEM file of the CA that signed the server's
	// certificate WithTLS, empty otherwise.
	CAFile string

	port int
	args []string
	tls  *tls.Config // client side, nil without TLS

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
	var clientTLS *tls.Config
	if o.tls {
		var err error
		if clientTLS, err = writeCerts(dir); err != nil {
			t.Fatalf("redistest: TLS certificates: %v", err)
		}
	}

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
			tls:  clientTLS,
		}
		if o.tls {
			s.URL = fmt.Sprintf("rediss://127.0.0.1:%d/0", port)
			s.CAFile = filepath.Join(dir, caFile)
		}
		s.args = serverArgs(port, dir, o)
		if lastErr = s.run(bin); lastErr == nil {
			t.Cleanup(s.kill)
			return s
		}
		var se *startError
		if o.tls && errors.As(lastErr, &se) && tlsUnsupported(se.out) {
			t.Skipf("redistest: %s was built without TLS support (build it with BUILD_TLS=yes, or install a distribution package that has it): %v", bin, lastErr)
		}
	}
	t.Fatalf("redistest: start redis-server: %v", lastErr)
	return nil
}

// tlsUnsupported tells whether a failed start's output says that
// redis-server has no TLS: Redis 6 and 7.0 built without it do not know the
// tls-* directives; 7.2 and later lack the "tls" connection type (or its
// module).
func tlsUnsupported(out string) bool {
	out = strings.ToLower(out)
	if !strings.Contains(out, "tls") {
		return false
	}
	for _, sign := range []string{
		"bad directive",
		"unrecognized option",
		"missing implement of connection type tls",
		"connection listener of tls",
		"tls is not supported",
		"not built with tls",
	} {
		if strings.Contains(out, sign) {
			return true
		}
	}
	return false
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
	if o.tls {
		// TLS only: the plain port is off, so nothing reaches the
		// server without TLS.
		args[1] = "0"
		args = append(args,
			"--tls-port", strconv.Itoa(port),
			"--tls-cert-file", filepath.Join(dir, certFile),
			"--tls-key-file", filepath.Join(dir, keyFile),
			"--tls-ca-cert-file", filepath.Join(dir, caFile),
			"--tls-auth-clients", "no",
		)
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
	p, err := startProcess(bin, s.Dir, s.args)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.proc = p
	s.mu.Unlock()

	if err := waitReady(func() error { return ping(s.Addr, s.tls) }, p.done); err != nil {
		s.kill()
		return &startError{err: fmt.Errorf("%s on %s: %w", bin, s.Addr, err), out: p.out.String()}
	}
	return nil
}

// startError is a failed start with the server's own output.
type startError struct {
	err error
	out string
}

func (e *startError) Error() string { return e.err.Error() + "\n" + e.out }
func (e *startError) Unwrap() error { return e.err }

// startProcess starts bin in dir, collecting its output.
func startProcess(bin, dir string, args []string) (*process, error) {
	out := &syncBuffer{}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout = out
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("exec %s: %w", bin, err)
	}
	p := &process{cmd: cmd, out: out, done: make(chan struct{})}
	// This goroutine stops when the process exits (killed by Stop or
	// Cleanup, or by itself on a bad start).
	go func() {
		_ = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// stop sends SIGKILL and waits for the process to exit.
func (p *process) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// waitReady polls check until it succeeds, the process exits, or
// startTimeout passes. The checks speak RESP over a plain (or TLS)
// connection: a go-redis client would retry and log each refused dial while
// the server starts.
func waitReady(check func() error, exited <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s: %w", startTimeout, err)
		}
		select {
		case <-exited:
			return fmt.Errorf("redis-server exited during start (last check: %v)", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// ping sends PING to addr, over TLS when tc is not nil.
func ping(addr string, tc *tls.Config) error {
	reply, err := do(addr, tc, "PING")
	if err != nil {
		return err
	}
	if len(reply) != 1 || reply[0] != "PONG" {
		return fmt.Errorf("PING answered %q", reply)
	}
	return nil
}

// do sends one command to addr on a new connection and reads the reply: a
// simple string, a bulk string, or an array of bulk strings (a nil bulk
// or array reads as no element). An error reply (-LOADING while the AOF is
// read back, for instance) is an error.
func do(addr string, tc *tls.Config, args ...string) ([]string, error) {
	d := &net.Dialer{Timeout: time.Second}
	var conn net.Conn
	var err error
	if tc != nil {
		conn, err = tls.DialWithDialer(d, "tcp", addr, tc)
	} else {
		conn, err = d.Dial("tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))

	var req bytes.Buffer
	fmt.Fprintf(&req, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&req, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := conn.Write(req.Bytes()); err != nil {
		return nil, err
	}
	r := bufio.NewReader(conn)
	line, err := readLine(r)
	if err != nil {
		return nil, err
	}
	switch {
	case line == "":
		return nil, errors.New("empty reply")
	case line[0] == '+':
		return []string{line[1:]}, nil
	case line[0] == '-':
		return nil, fmt.Errorf("error reply %q", line[1:])
	case line[0] == '$':
		b, err := readBulk(r, line)
		if err != nil || b == nil {
			return nil, err
		}
		return []string{*b}, nil
	case line[0] == '*':
		n, err := strconv.Atoi(line[1:])
		if err != nil {
			return nil, fmt.Errorf("bad array header %q", line)
		}
		var reply []string
		for i := 0; i < n; i++ {
			line, err := readLine(r)
			if err != nil {
				return nil, err
			}
			if line == "" || line[0] != '$' {
				return nil, fmt.Errorf("array element %q is not a bulk string", line)
			}
			b, err := readBulk(r, line)
			if err != nil {
				return nil, err
			}
			if b != nil {
				reply = append(reply, *b)
			}
		}
		return reply, nil
	}
	return nil, fmt.Errorf("unexpected reply %q", line)
}

func readLine(r *bufio.Reader) (string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(line, "\r\n"), nil
}

// readBulk reads the body of a bulk string whose header is line; nil for
// a nil bulk ($-1).
func readBulk(r *bufio.Reader, line string) (*string, error) {
	n, err := strconv.Atoi(line[1:])
	if err != nil {
		return nil, fmt.Errorf("bad bulk header %q", line)
	}
	if n < 0 {
		return nil, nil
	}
	buf := make([]byte, n+2)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, err
	}
	b := string(buf[:n])
	return &b, nil
}

// kill sends SIGKILL and waits for the process to exit. It does nothing
// when the server is already stopped.
func (s *Server) kill() {
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p != nil {
		p.stop()
	}
}

// Client returns a client of the server, closed in t.Cleanup; WithTLS it
// connects with TLS and trusts the test CA. The database is not flushed.
func (s *Server) Client(t testing.TB) *redis.Client {
	t.Helper()
	opts := &redis.Options{Addr: s.Addr}
	if s.tls != nil {
		opts.TLSConfig = s.tls.Clone()
	}
	c := redis.NewClient(opts)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Stop kills the process with SIGKILL, as a crash would, and keeps the data
// directory for Restart.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.kill()
}

// Pause stops the process with SIGSTOP: connections are still accepted by
// the kernel but nothing is answered, as with a server stuck on a long
// command or a host that froze. Resume, Stop or Cleanup end it.
func (s *Server) Pause(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGSTOP)
}

// Resume lets a paused server go on with SIGCONT.
func (s *Server) Resume(t testing.TB) {
	t.Helper()
	s.signal(t, syscall.SIGCONT)
}

func (s *Server) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	s.mu.Lock()
	p := s.proc
	s.mu.Unlock()
	if p == nil {
		t.Fatalf("redistest: %v: the server is stopped", sig)
	}
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("redistest: %v: %v", sig, err)
	}
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

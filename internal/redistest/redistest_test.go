package redistest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestStartPing(t *testing.T) {
	s := Start(t)
	if !strings.HasPrefix(s.Addr, "127.0.0.1:") {
		t.Fatalf("got addr %q, want a 127.0.0.1 address", s.Addr)
	}
	if want := "redis://" + s.Addr + "/0"; s.URL != want {
		t.Errorf("got URL %q, want %q", s.URL, want)
	}

	ctx := context.Background()
	c := s.Client(t)
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("ping: %v", err)
	}
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("set: %v", err)
	}
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Errorf("got %q, %v, want %q", got, err, "v")
	}

	// Without WithAOF the server keeps nothing on disk.
	cfg, err := c.ConfigGet(ctx, "appendonly").Result()
	if err != nil {
		t.Fatalf("config get: %v", err)
	}
	if got := cfg["appendonly"]; got != "no" {
		t.Errorf("got appendonly %q, want %q", got, "no")
	}
}

func TestStopRefusesConnections(t *testing.T) {
	s := Start(t)
	s.Stop(t)
	conn, err := net.DialTimeout("tcp", s.Addr, time.Second)
	if err == nil {
		conn.Close()
		t.Fatalf("got a connection to %s after Stop, want refused", s.Addr)
	}
}

func TestPauseAcceptsButDoesNotAnswer(t *testing.T) {
	s := Start(t)
	s.Pause(t)
	conn, err := net.DialTimeout("tcp", s.Addr, time.Second)
	if err != nil {
		t.Fatalf("dial a paused server: %v, want the kernel to accept", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		t.Fatalf("write: %v", err)
	}
	var ne net.Error
	if _, err := conn.Read(make([]byte, 16)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("got %v reading from a paused server, want a timeout", err)
	}
	s.Resume(t)
	if err := s.Client(t).Ping(context.Background()).Err(); err != nil {
		t.Fatalf("ping after Resume: %v", err)
	}
}

func TestRestart(t *testing.T) {
	tests := []struct {
		name string
		opts []Option
		want int64 // keys left after restart
	}{
		{name: "aof keeps data", opts: []Option{WithAOF()}, want: 1},
		{name: "no aof loses data", want: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := Start(t, tt.opts...)
			ctx := context.Background()
			c := s.Client(t)
			if err := c.Set(ctx, "survivor", "yes", 0).Err(); err != nil {
				t.Fatalf("set: %v", err)
			}
			s.Stop(t)
			if err := ping(s.Addr, nil); err == nil {
				t.Fatalf("got PING answer after Stop, want an error")
			}
			s.Restart(t)
			got, err := c.Exists(ctx, "survivor").Result()
			if err != nil {
				t.Fatalf("exists: %v", err)
			}
			if got != tt.want {
				t.Errorf("got %d keys after restart, want %d", got, tt.want)
			}
		})
	}
}

func TestCluster(t *testing.T) {
	cl := StartCluster(t)
	if len(cl.Addrs) != 3 {
		t.Fatalf("got %d nodes, want 3", len(cl.Addrs))
	}
	ctx := context.Background()
	c := cl.Client(t)

	// Keys on slots owned by different masters all read back.
	owners := map[string]bool{}
	for i := 0; i < 30; i++ {
		key := fmt.Sprintf("key-%d", i)
		if err := c.Set(ctx, key, i, 0).Err(); err != nil {
			t.Fatalf("set %s: %v", key, err)
		}
		got, err := c.Get(ctx, key).Int()
		if err != nil || got != i {
			t.Errorf("get %s: got %d, %v, want %d", key, got, err, i)
		}
		shard, err := c.MasterForKey(ctx, key)
		if err != nil {
			t.Fatalf("master for %s: %v", key, err)
		}
		owners[shard.Options().Addr] = true
	}
	if len(owners) != 3 {
		t.Errorf("got keys on masters %v, want all three used", owners)
	}
}

func TestTLS(t *testing.T) {
	s := Start(t, WithTLS())
	if want := "rediss://" + s.Addr + "/0"; s.URL != want {
		t.Errorf("got URL %q, want %q", s.URL, want)
	}
	pem, err := os.ReadFile(s.CAFile)
	if err != nil {
		t.Fatalf("read CA file: %v", err)
	}

	ctx := context.Background()
	c := s.Client(t)
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("set over TLS: %v", err)
	}
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Errorf("got %q, %v, want %q", got, err, "v")
	}

	// The URL and the CA file are all another client needs.
	opts, err := redis.ParseURL(s.URL)
	if err != nil {
		t.Fatalf("parse URL: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", s.CAFile)
	}
	opts.TLSConfig.RootCAs = pool
	opts.MaxRetries = -1
	byURL := redis.NewClient(opts)
	defer byURL.Close()
	if got, err := byURL.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Errorf("client from URL and CA file: got %q, %v, want %q", got, err, "v")
	}

	// TLS only: plain RESP gets no answer, and a client that does not
	// trust the test CA refuses the server.
	if err := ping(s.Addr, nil); err == nil {
		t.Errorf("got PONG over plain TCP, want TLS required")
	}
	err = ping(s.Addr, &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: x509.NewCertPool()})
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Errorf("got %v from a client without the CA, want an unknown authority error", err)
	}

	// Restart keeps TLS.
	s.Restart(t)
	if err := c.Ping(ctx).Err(); err != nil {
		t.Errorf("ping over TLS after restart: %v", err)
	}
}

func TestTLSUnsupportedOutput(t *testing.T) {
	for out, want := range map[string]bool{
		"*** FATAL CONFIG FILE ERROR (Redis 7.0.15) ***\nReading the configuration file, at line 2\n>>> 'tls-port \"6380\"'\nBad directive or wrong number of arguments": true,
		"# Missing implement of connection type tls":                                                           true,
		"# Failed to load certificate: redis.crt: error:80000002:system library::No such file or directory":    false,
		"# Warning: Could not create server TCP listening socket 127.0.0.1:6380: bind: Address already in use": false,
	} {
		if got := tlsUnsupported(out); got != want {
			t.Errorf("tlsUnsupported(%q) = %v, want %v", out, got, want)
		}
	}
}

func TestSentinel(t *testing.T) {
	m := Start(t)
	sn := StartSentinel(t, m, "mymaster")
	if !strings.HasPrefix(sn.Addr, "127.0.0.1:") {
		t.Fatalf("got addr %q, want a 127.0.0.1 address", sn.Addr)
	}
	ctx := context.Background()

	sc := redis.NewSentinelClient(&redis.Options{Addr: sn.Addr})
	defer sc.Close()
	got, err := sc.GetMasterAddrByName(ctx, "mymaster").Result()
	if err != nil {
		t.Fatalf("get-master-addr-by-name: %v", err)
	}
	if len(got) != 2 || net.JoinHostPort(got[0], got[1]) != m.Addr {
		t.Errorf("sentinel names master %q, want %s", got, m.Addr)
	}

	// A failover client finds the master through the sentinel.
	fc := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: "mymaster", SentinelAddrs: []string{sn.Addr}})
	defer fc.Close()
	if err := fc.Set(ctx, "via-sentinel", "yes", 0).Err(); err != nil {
		t.Fatalf("set through sentinel: %v", err)
	}
	if v, err := m.Client(t).Get(ctx, "via-sentinel").Result(); err != nil || v != "yes" {
		t.Errorf("master has %q, %v, want %q", v, err, "yes")
	}
}

package redistest

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"
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
			if err := ping(s.Addr); err == nil {
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

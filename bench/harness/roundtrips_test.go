package harness

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/bench/load"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

// TestRedisRoundTrips counts the Redis round trips of one chat request
// through the built historyproxy binary, whole and streamed, with a
// 20-message history stored: the binary talks to redis-server through a
// relay that counts what each connection sends between two answers.
//
// Issue 10's target is one round trip to read (the window, before
// forwarding) and one to write (the turn, before the end of the reply is
// relayed), the floor's two. That is what the code does today, with the
// session's turn lease (ordering: wait, the default) taken and given back
// inside those two: the read is one EVALSHA of the script that takes the
// lease and reads the window, the write one pipeline of the append
// script's EVALSHA (which gives the lease back) and the ZADDs of the global session indexes
// (outside the script: they are on other Cluster slots). This test holds
// it there: a change that adds a round trip per request fails here.
func TestRedisRoundTrips(t *testing.T) {
	bins := built(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	redisProc, err := startRedis(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(redisProc.stop)
	relay := startRelay(t, redisProc.addr)
	up, err := startServer(ctx, "fakeupstream", filepath.Join(bins, binUpstream), nil, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.stop)
	hp, err := startHistoryproxy(ctx, "historyproxy", filepath.Join(bins, binHistoryproxy),
		[]string{"-upstream", "http://" + up.addr + "/v1", "-redis-url", "redis://" + relay.addr() + "/0"}, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hp.stop)

	// The history goes straight to redis-server, past the relay.
	rdb := redis.NewClient(&redis.Options{Addr: redisProc.addr})
	defer rdb.Close()
	const session = "bench:roundtrips@example.com:support"
	if err := seedHistory(rdb, hpPrefix)(ctx, []string{session}, benchfix.HistoryLen); err != nil {
		t.Fatal(err)
	}

	client := &http.Client{Transport: load.NewTransport(1)}
	defer client.CloseIdleConnections()
	send := func(stream bool) {
		t.Helper()
		_, err := load.Run(ctx, load.Config{URL: "http://" + hp.addr + chatPath, Body: benchfix.RequestBody(stream),
			Concurrency: 1, Requests: 1, Client: client, WantHistory: strconv.Itoa(benchfix.HistoryLen),
			Session: func(int, int) string { return session }})
		if err != nil {
			t.Fatal(err)
		}
	}
	// The first requests open the connections and load the scripts
	// (EVALSHA, NOSCRIPT, EVAL): that happens once per server, not per
	// request.
	send(false)
	send(true)

	const requests = 3
	for _, stream := range []bool{false, true} {
		relay.reset()
		for range requests {
			send(stream)
		}
		trips := relay.commands()
		t.Logf("stream=%t: %d round trips for %d requests: %q", stream, len(trips), requests, trips)
		if len(trips) != 2*requests {
			t.Fatalf("stream=%t: %d round trips to Redis for %d requests, want 2 per request (one read, one write): %q",
				stream, len(trips), requests, trips)
		}
	}
}

// relay is a TCP relay in front of redis-server that records, per round
// trip, what the client sent: everything a connection sends after an
// answer (or at its start) and before the next answer is one round trip,
// however many commands it pipelines.
type relay struct {
	l      net.Listener
	target string

	mu    sync.Mutex
	trips []*bytes.Buffer
	open  map[int]*bytes.Buffer // per connection: its round trip in progress, nil once answered
	conns int
}

func startRelay(t *testing.T, target string) *relay {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{l: l, target: target, open: map[int]*bytes.Buffer{}}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() { // ends when the listener is closed
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			r.mu.Lock()
			id := r.conns
			r.conns++
			r.mu.Unlock()
			wg.Add(1)
			go func() { defer wg.Done(); r.serve(id, c) }()
		}
	}()
	return r
}

func (r *relay) addr() string { return r.l.Addr().String() }

// serve relays one connection until either side closes it.
func (r *relay) serve(id int, c net.Conn) {
	defer c.Close()
	s, err := net.Dial("tcp", r.target)
	if err != nil {
		return
	}
	defer s.Close()
	done := make(chan struct{}, 2)
	go func() { // client to server; ends when either side closes
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				r.mu.Lock()
				if r.open[id] == nil {
					r.open[id] = new(bytes.Buffer)
					r.trips = append(r.trips, r.open[id])
				}
				r.open[id].Write(buf[:n])
				r.mu.Unlock()
				if _, werr := s.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { // server to client; ends when either side closes
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 64<<10)
		for {
			n, err := s.Read(buf)
			if n > 0 {
				r.mu.Lock()
				r.open[id] = nil
				r.mu.Unlock()
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	<-done
}

func (r *relay) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.trips = nil
}

// commands lists the round trips since the last reset, each as the names
// of its commands. Every round trip counts, the session's or not: nothing
// else talks to Redis while the test's requests run (no health check is
// polled, and the proxy runs no background job).
func (r *relay) commands() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([][]string, len(r.trips))
	for i, b := range r.trips {
		out[i] = commandNames(b.Bytes())
	}
	return out
}

// commandNames reads the RESP arrays of bulk strings a client sends and
// returns the first element of each, upper-cased; "?" for bytes it cannot
// read.
func commandNames(b []byte) []string {
	var names []string
	for len(b) > 0 {
		n, rest, err := respLine(b, '*')
		if err != nil {
			return append(names, "?")
		}
		for i := range n {
			size, after, err := respLine(rest, '$')
			if err != nil || len(after) < size+2 {
				return append(names, "?")
			}
			if i == 0 {
				names = append(names, strings.ToUpper(string(after[:size])))
			}
			rest = after[size+2:]
		}
		b = rest
	}
	return names
}

// respLine reads a line "<kind><integer>\r\n".
func respLine(b []byte, kind byte) (int, []byte, error) {
	end := bytes.Index(b, []byte("\r\n"))
	if len(b) == 0 || b[0] != kind || end < 0 {
		return 0, nil, errors.New("not a RESP line")
	}
	n, err := strconv.Atoi(string(b[1:end]))
	return n, b[end+2:], err
}

// Command hpload is the benchmark's closed-loop load generator on its own,
// for driving one server by hand: concurrent clients, each sending the
// benchmark's chat request (internal/benchfix) as soon as its previous
// answer has been read to the end, for a duration or a number of requests.
// hpbench uses the same generator (package load) in-process.
//
//	hpload -url http://127.0.0.1:8080/v1/chat/completions -c 16 -d 5s -stream
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/historyproxy/historyproxy/bench/load"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

func main() {
	fs := flag.NewFlagSet("hpload", flag.ExitOnError)
	url := fs.String("url", "http://127.0.0.1:8080/v1/chat/completions", "chat completions URL")
	clients := fs.Int("c", 16, "concurrent clients")
	duration := fs.Duration("d", 5*time.Second, "duration of the run")
	requests := fs.Int("n", 0, "requests per client (instead of -d)")
	stream := fs.Bool("stream", false, "ask for streamed replies")
	session := fs.String("session", "bench:load@example.com:support",
		"X-Session-ID; each client sends its own, with -<client number> added to the user part (empty: none)")
	want := fs.String("want-history", "", "X-History-Messages every answer must carry (empty: not checked)")
	_ = fs.Parse(os.Args[1:])

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c := load.Config{URL: *url, Body: benchfix.RequestBody(*stream), Concurrency: *clients,
		Duration: *duration, Requests: *requests, WantHistory: *want}
	if *session != "" {
		c.Session = func(w, _ int) string { return clientSession(*session, w) }
	}
	res, err := load.Run(ctx, c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "hpload:", err)
		os.Exit(1)
	}
	ms := func(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }
	fmt.Printf("requests %d in %s: %.0f req/s\n", res.Requests, res.Elapsed.Round(time.Millisecond), res.Rate())
	fmt.Printf("latency  p50 %s  p90 %s  p99 %s  max %s\n", ms(load.Percentile(res.Latency, 0.5)),
		ms(load.Percentile(res.Latency, 0.9)), ms(load.Percentile(res.Latency, 0.99)), ms(load.Percentile(res.Latency, 1)))
	fmt.Printf("first byte of the body  p50 %s  p99 %s\n", ms(load.Percentile(res.TTFB, 0.5)), ms(load.Percentile(res.TTFB, 0.99)))
}

// clientSession gives client w its own session: "-w" is added to the user
// part of channel:user:agent (or to the whole id when it is not of that
// form).
func clientSession(session string, w int) string {
	if p := strings.Split(session, ":"); len(p) == 3 {
		return p[0] + ":" + p[1] + "-" + strconv.Itoa(w) + ":" + p[2]
	}
	return session + "-" + strconv.Itoa(w)
}

// Command hpbench is historyproxy's end-to-end benchmark: from the
// repository, it builds historyproxy and the benchmark's servers, starts
// them with a redis-server on loopback, and prints one table per scenario
// comparing going direct to the upstream, a bare reverse proxy, the floor
// (the bare hop plus the two Redis round trips a history proxy cannot
// avoid) and historyproxy with its memory and its Redis store. See
// bench/README.md for what each column means.
//
//	go run ./bench/cmd/hpbench                     # everything (about 27 minutes)
//	go run ./bench/cmd/hpbench -short              # a smoke test of every part
//	go run ./bench/cmd/hpbench -mode json -c 16 -stored 20
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/historyproxy/historyproxy/bench/harness"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "hpbench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	d := harness.Defaults()
	fs := flag.NewFlagSet("hpbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	short := fs.Bool("short", false, "a smoke test of every path and mode in seconds: one tiny scenario each (flags given with it still apply)")
	modes := fs.String("mode", strings.Join(d.Modes, ","), "modes to run: json, sse (load scenarios), hold (streams held open)")
	clients := fs.String("c", ints(d.Concurrency), "concurrent clients, one scenario each")
	stored := fs.String("stored", ints(d.Stored), "messages stored per session before a run, one scenario each")
	rounds := fs.Int("rounds", d.Rounds, "rounds per scenario (the tables show medians)")
	duration := fs.Duration("d", d.Duration, "duration of one path's run in a round")
	requests := fs.Int("n", d.Requests, "requests per client in one path's run in a round, instead of -d")
	warmup := fs.Int("warmup", d.Warmup, "requests per client before a path's first round")
	hold := fs.Int("hold", d.HoldStreams, "streams held open at once in mode hold")
	delay := fs.Duration("delay", d.Upstream.Delay, "the fake upstream's wait before its response headers")
	chunks := fs.Int("chunks", d.Upstream.Chunks, "content chunks of a streamed reply")
	chunkDelay := fs.Duration("chunk-delay", d.Upstream.ChunkDelay, "the fake upstream's wait before each streamed event after the first")
	markdown := fs.Bool("markdown", false, "print Markdown tables")
	baseline := fs.String("baseline", "", "another historyproxy binary (an earlier build) to run beside this one, with Redis, as the path \"baseline Redis\"")
	holdProfiles := fs.String("hold-profiles", "", "a directory: in mode hold, historyproxy runs with -admin-pprof and its heap profile and goroutines with the streams open are written there")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}

	c := d
	if *short {
		c = harness.Short()
	}
	// The flags given override the defaults (or -short's).
	var errs []error
	fs.Visit(func(f *flag.Flag) {
		var err error
		switch f.Name {
		case "mode":
			c.Modes = strings.Split(*modes, ",")
		case "c":
			c.Concurrency, err = parseInts(f.Name, *clients)
		case "stored":
			c.Stored, err = parseInts(f.Name, *stored)
		case "rounds":
			c.Rounds = *rounds
		case "d":
			c.Duration, c.Requests = *duration, 0
		case "n":
			c.Requests = *requests
		case "warmup":
			c.Warmup = *warmup
		case "hold":
			c.HoldStreams = *hold
		case "delay":
			c.Upstream.Delay = *delay
		case "chunks":
			c.Upstream.Chunks = *chunks
		case "chunk-delay":
			c.Upstream.ChunkDelay = *chunkDelay
		}
		errs = append(errs, err)
	})
	if err := errors.Join(errs...); err != nil {
		return err
	}
	c.Markdown = *markdown
	c.Baseline = *baseline
	c.HoldProfiles = *holdProfiles
	c.Command = strings.Join(append([]string{"go run ./bench/cmd/hpbench"}, args...), " ")
	c.Stdout, c.Stderr = stdout, stderr
	return harness.Run(ctx, c)
}

func ints(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

func parseInts(flag, s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("-%s %q: want positive integers separated by commas", flag, s)
		}
		out = append(out, n)
	}
	return out, nil
}

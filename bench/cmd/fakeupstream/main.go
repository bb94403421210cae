// Command fakeupstream is the benchmark's upstream: an OpenAI-compatible
// server that answers every chat completion with the same reply, whole or
// streamed in the real wire format (internal/benchfix), after an optional
// delay. It parses no JSON, so that it is never what limits a benchmark.
//
//	fakeupstream -listen 127.0.0.1:0 -delay 0 -chunks 50 -chunk-delay 0
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/historyproxy/historyproxy/bench/internal/serve"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

func main() {
	fs := flag.NewFlagSet("fakeupstream", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	var o benchfix.UpstreamOptions
	fs.DurationVar(&o.Delay, "delay", 0, "wait before the response headers (a model's time to first token)")
	fs.IntVar(&o.Chunks, "chunks", benchfix.StreamChunks, "content chunks of a streamed reply")
	fs.DurationVar(&o.ChunkDelay, "chunk-delay", 0, "wait before each streamed event after the first")
	_ = fs.Parse(os.Args[1:])
	if err := serve.Run(*listen, benchfix.NewUpstream(o), os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "fakeupstream:", err)
		os.Exit(1)
	}
}

// Command bareproxy is the benchmark's first reference: a plain
// httputil.ReverseProxy to the upstream and nothing else
// (internal/benchfix.Bare), the cost of one HTTP hop in Go.
//
//	bareproxy -listen 127.0.0.1:0 -upstream http://127.0.0.1:8081
package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"

	"github.com/historyproxy/historyproxy/bench/internal/serve"
	"github.com/historyproxy/historyproxy/internal/benchfix"
)

func main() {
	fs := flag.NewFlagSet("bareproxy", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	upstream := fs.String("upstream", "", "upstream base URL (scheme and host; the path is kept from the request)")
	_ = fs.Parse(os.Args[1:])
	up, err := url.Parse(*upstream)
	if err == nil && up.Host == "" {
		err = fmt.Errorf("-upstream %q: no host", *upstream)
	}
	if err == nil {
		err = serve.Run(*listen, benchfix.Bare(up), os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bareproxy:", err)
		os.Exit(1)
	}
}

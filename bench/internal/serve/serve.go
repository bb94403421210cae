// Package serve runs the benchmark's small servers (the fake upstream, the
// bare proxy, the floor proxy) the same way: listen, say where, serve until
// SIGINT or SIGTERM.
package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/signal"
	"syscall"
	"time"
)

// ListeningPrefix starts the one line a server writes to stdout once it
// listens, followed by its address: the harness starts servers on port 0
// and reads the port from there, so that no two runs race for a port.
const ListeningPrefix = "listening on "

// Run listens on addr, writes ListeningPrefix and the bound address to
// stdout, and serves h until SIGINT or SIGTERM, then lets requests in
// flight finish for up to five seconds.
func Run(addr string, h http.Handler, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }() // ends when Shutdown closes the listener
	fmt.Fprintln(stdout, ListeningPrefix+l.Addr().String())
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", l.Addr(), err)
	case <-ctx.Done():
	}
	drain, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(drain); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

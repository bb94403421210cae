package main

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestConsoleRedirectsHaveTheSecurityHeaders: the admin listener's muxes
// clean a path such as /console/./x with a redirect before the console's
// handler runs; that answer is rendered by a browser too, so it carries
// the console's headers. With the profiler on, its mux is in front as well.
func TestConsoleRedirectsHaveTheSecurityHeaders(t *testing.T) {
	for _, args := range [][]string{nil, {"-admin-pprof"}} {
		p := start(t, nil, args...)
		client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		for _, path := range []string{"/console", "/console/./app.css", "/console//js/app.js", "/console/js/../index"} {
			resp, err := client.Get("http://" + p.addrs.Admin + path)
			require.NoError(t, err)
			resp.Body.Close()
			require.Contains(t, []int{http.StatusMovedPermanently, http.StatusTemporaryRedirect, http.StatusPermanentRedirect}, resp.StatusCode, "%v %s", args, path)
			for _, k := range []string{"Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy"} {
				require.NotEmpty(t, resp.Header.Get(k), "%v %s (%d): no %s", args, path, resp.StatusCode, k)
			}
		}
	}
}

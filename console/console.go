// Package console is the web console: a page, embedded in the binary, to
// browse conversations, follow them live and see what they cost. It is
// plain HTML, CSS and JavaScript modules (no build step, no CDN), served
// on the admin listener under /console/ with a strict Content-Security-
// Policy, and it reads everything it shows from the conversations API
// (package admin) with the admin token, which it keeps in the browser's
// session storage and sends as a bearer header.
//
// The files themselves hold no data and are served without the token: a
// browser cannot send a bearer header when it navigates to a page, and
// the page asks for the token (a login form) when the API answers 401.
package console

import (
	"embed"
	"io/fs"
	"net/http"
	"path"
	"strings"
)

// Prefix is where the console is served.
const Prefix = "/console/"

//go:embed static
var static embed.FS

// Files are the console's files, index.html at the root.
func Files() fs.FS {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	return sub
}

// CSP is the Content-Security-Policy of every answer: scripts, styles,
// images and API calls from this origin only, no inline script or style,
// no eval, no plugins, no framing, forms posting nowhere else.
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// Handler serves the console under Prefix: GET and HEAD of its files, and
// a redirect from Prefix without its slash; every answer, refusals too,
// with the security headers.
func Handler() http.Handler {
	files := http.FileServerFS(Files())
	mux := http.NewServeMux()
	mux.HandleFunc("GET /console", func(w http.ResponseWriter, r *http.Request) {
		setHeaders(w)
		http.Redirect(w, r, Prefix, http.StatusMovedPermanently)
	})
	mux.HandleFunc("GET "+Prefix, func(w http.ResponseWriter, r *http.Request) {
		setHeaders(w)
		name := strings.TrimPrefix(r.URL.Path, Prefix)
		if name != "" && (strings.HasSuffix(name, "/") || path.Base(name) == "index.html") {
			// No directory listings, and one address for the page.
			http.NotFound(w, r)
			return
		}
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/" + name
		files.ServeHTTP(w, r2)
	})
	// Every answer carries the headers, the mux's own refusals too (405
	// for a POST): a browser renders those as well.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		setHeaders(w)
		mux.ServeHTTP(w, r)
	})
}

// Headers sets the security headers on every answer under the console's
// paths before next runs. The console's own handler sets them too; this
// covers what a mux in front of it answers by itself: a ServeMux cleans
// a path such as /console/./x or /console//x with a redirect before any
// handler is chosen, and a browser renders that answer as well.
func Headers(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/console" || strings.HasPrefix(r.URL.Path, Prefix) {
			setHeaders(w)
		}
		next.ServeHTTP(w, r)
	})
}

// setHeaders sets the security headers of every answer. The files change
// only with the binary, and carry no validator (embedded files have no
// modification time), so browsers are told to ask again each time.
func setHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Security-Policy", CSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	h.Set("Cache-Control", "no-cache")
}

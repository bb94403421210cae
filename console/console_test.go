package console

import (
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
)

func TestHandlerServesFilesWithSecurityHeaders(t *testing.T) {
	srv := httptest.NewServer(Handler())
	defer srv.Close()
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	tests := []struct {
		name, path string
		status     int
		typ        string // Content-Type prefix
		body       string // a part of the body
	}{
		{name: "page", path: "/console/", status: 200, typ: "text/html", body: `<script type="module" src="js/app.js">`},
		{name: "module", path: "/console/js/app.js", status: 200, typ: "text/javascript", body: "import "},
		{name: "style", path: "/console/app.css", status: 200, typ: "text/css", body: "--accent"},
		{name: "icon", path: "/console/icon.svg", status: 200, typ: "image/svg+xml", body: "<svg"},
		{name: "without the slash", path: "/console", status: http.StatusMovedPermanently},
		{name: "no directory listing", path: "/console/js/", status: http.StatusNotFound},
		{name: "one address for the page", path: "/console/index.html", status: http.StatusNotFound},
		{name: "no such file", path: "/console/nothing.js", status: http.StatusNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := client.Get(srv.URL + tt.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.status {
				t.Fatalf("got %s, want %d", resp.Status, tt.status)
			}
			if tt.status == http.StatusMovedPermanently && resp.Header.Get("Location") != Prefix {
				t.Errorf("Location: got %q, want %q", resp.Header.Get("Location"), Prefix)
			}
			if tt.typ != "" && !strings.HasPrefix(resp.Header.Get("Content-Type"), tt.typ) {
				t.Errorf("Content-Type: got %q, want %s", resp.Header.Get("Content-Type"), tt.typ)
			}
			if !strings.Contains(string(body), tt.body) {
				t.Errorf("body does not hold %q", tt.body)
			}
			if resp.StatusCode == http.StatusNotFound {
				return
			}
			for k, want := range map[string]string{
				"Content-Security-Policy": CSP,
				"X-Content-Type-Options":  "nosniff",
				"Referrer-Policy":         "no-referrer",
				"X-Frame-Options":         "DENY",
			} {
				if got := resp.Header.Get(k); got != want {
					t.Errorf("%s: got %q, want %q", k, got, want)
				}
			}
		})
	}
}

// TestCSPForbidsWhatThePageMustNotDo: the policy has no way to run inline
// or evaluated code, and leaves nothing to the browser's defaults.
func TestCSPForbidsWhatThePageMustNotDo(t *testing.T) {
	for _, want := range []string{"default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "connect-src 'self'"} {
		if !strings.Contains(CSP, want) {
			t.Errorf("CSP lacks %q", want)
		}
	}
	for _, bad := range []string{"unsafe-inline", "unsafe-eval", "unsafe-hashes", "data:", "*", "http:", "https:"} {
		if strings.Contains(CSP, bad) {
			t.Errorf("CSP allows %q", bad)
		}
	}
}

// TestFilesNeedNothingTheCSPForbids reads every embedded file for what the
// policy would block (the browser tests would only see a broken page):
// inline scripts and handlers, style attributes, eval, HTML built from
// strings, and anything from another origin.
func TestFilesNeedNothingTheCSPForbids(t *testing.T) {
	checks := []struct {
		name string
		ext  string
		re   *regexp.Regexp
	}{
		{"inline script", ".html", regexp.MustCompile(`<script(?:\s[^>]*)?>\s*[^<\s]`)},
		{"script without src", ".html", regexp.MustCompile(`<script(?:(?:\s(?:type|async|defer)(?:="[^"]*")?)*)\s*>`)},
		{"inline style element", ".html", regexp.MustCompile(`<style`)},
		{"style attribute", ".html", regexp.MustCompile(`\sstyle=`)},
		{"event handler attribute", ".html", regexp.MustCompile(`\son[a-z]+=`)},
		{"eval", ".js", regexp.MustCompile(`\beval\(|new Function\(|setTimeout\(\s*['"\x60]`)},
		{"HTML from strings", ".js", regexp.MustCompile(`innerHTML|outerHTML|insertAdjacentHTML|document\.write`)},
		{"style attribute", ".js", regexp.MustCompile(`setAttribute\(\s*['"]style|\.style\.|cssText`)},
		{"another origin", "", regexp.MustCompile(`(?:src|href)=["']?(?:https?:)?//|import\s[^;]*from\s+['"](?:https?:)?//|url\(\s*['"]?(?:https?:)?//`)},
	}
	n := 0
	err := fs.WalkDir(Files(), ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		n++
		b, err := fs.ReadFile(Files(), path)
		if err != nil {
			return err
		}
		for _, c := range checks {
			if c.ext != "" && !strings.HasSuffix(path, c.ext) {
				continue
			}
			if loc := c.re.FindIndex(b); loc != nil {
				t.Errorf("%s: %s at %q", path, c.name, b[loc[0]:min(loc[1]+20, len(b))])
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 8 {
		t.Errorf("walked %d files, want the page, its style, icon and modules", n)
	}
}

// TestEveryAnswerHasTheSecurityHeaders: not only the files, but the
// refusals too (a method other than GET or HEAD, a missing file, a
// directory), since a browser renders those as well.
func TestEveryAnswerHasTheSecurityHeaders(t *testing.T) {
	h := Handler()
	for _, method := range []string{"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"} {
		for _, p := range []string{"/console/", "/console/app.css", "/console/js/", "/console/nothing", "/console/..%2fgo.mod", "/console/index.html"} {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(method, p, nil))
			for _, k := range []string{"Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy"} {
				if rec.Header().Get(k) == "" {
					t.Errorf("%s %s (%d): no %s", method, p, rec.Code, k)
				}
			}
		}
	}
}

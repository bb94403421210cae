package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/openai/openai-go"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
)

// The console tests drive the page in headless Chromium (Debian's
// chromium package; scripts/test installs it) against the whole program,
// with turns made through the proxy by the official SDK.

var (
	chromiumOnce sync.Once
	chromiumPath string
	chromiumWhy  string
)

// findChromium finds Chromium, installing Debian's package when it is
// missing and this process may (root, or sudo without a password). It
// skips the test only when Chromium can be neither found nor installed.
func findChromium(t *testing.T) string {
	t.Helper()
	chromiumOnce.Do(func() {
		look := func() string {
			for _, name := range []string{"chromium", "chromium-browser", "google-chrome-stable", "google-chrome", "headless-shell"} {
				if p, err := exec.LookPath(name); err == nil {
					return p
				}
			}
			return ""
		}
		if chromiumPath = look(); chromiumPath != "" {
			return
		}
		var sudo []string
		switch {
		case os.Geteuid() == 0:
		case exec.Command("sudo", "-n", "true").Run() == nil:
			sudo = []string{"sudo", "-n"}
		default:
			chromiumWhy = "chromium is not installed and this user cannot install it (not root, no password-less sudo): apt-get install chromium, or run ./scripts/test as root"
			return
		}
		if _, err := exec.LookPath("apt-get"); err != nil {
			chromiumWhy = "chromium is not installed and there is no apt-get to install it with"
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		for _, args := range [][]string{{"apt-get", "update", "-qq"}, {"apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"}} {
			cmd := exec.CommandContext(ctx, append(sudo, args...)[0], append(sudo, args...)[1:]...)
			cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
			if out, err := cmd.CombinedOutput(); err != nil {
				chromiumWhy = fmt.Sprintf("chromium is not installed, and %s failed: %v\n%s", strings.Join(args, " "), err, out)
				return
			}
		}
		if chromiumPath = look(); chromiumPath == "" {
			chromiumWhy = "apt-get installed chromium, but no chromium binary is on PATH"
		}
	})
	if chromiumPath == "" {
		t.Skip("console browser tests skipped: " + chromiumWhy)
	}
	return chromiumPath
}

// browser is one headless Chromium tab on the console, with the problems
// the page reported (exceptions, CSP violations, console errors).
type browser struct {
	t     *testing.T
	ctx   context.Context
	base  string // http://host:port of the admin listener (or its cut proxy)
	shots string // where screenshots go

	mu       sync.Mutex
	problems []string
}

func newBrowser(t *testing.T, base, shots string) *browser {
	t.Helper()
	exe := findChromium(t)
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(exe),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("hide-scrollbars", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1100, 800),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancelCtx()
		cancelAlloc()
	})
	b := &browser{t: t, ctx: ctx, base: base, shots: shots}
	exceptions := chromedp.Events(ctx, runtime.ExceptionThrown)
	entries := chromedp.Events(ctx, cdplog.EntryAdded)
	// Start the browser and its tab, and have it report its log.
	if _, err := chromedp.Call(ctx, cdplog.Enable, cdp.Empty{}); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	go func() { // ends with the browser's context
		for ev, err := range exceptions {
			if err != nil {
				return
			}
			b.problem("exception: " + (&chromedp.ExceptionError{ExceptionDetails: ev.ExceptionDetails}).Error())
		}
	}()
	go func() { // ends with the browser's context
		for ev, err := range entries {
			if err != nil {
				return
			}
			e := ev.Entry
			// Network errors are expected: the tests cut connections.
			if e.Source == cdplog.EntrySourceNetwork || e.Level != cdplog.EntryLevelError && e.Source != cdplog.EntrySourceSecurity {
				continue
			}
			b.problem(fmt.Sprintf("%s %s: %s (%s)", e.Source, e.Level, e.Text, e.URL))
		}
	}()
	return b
}

func (b *browser) problem(s string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.problems = append(b.problems, s)
}

// checkProblems fails the test on anything the page reported.
func (b *browser) checkProblems() {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range b.problems {
		b.t.Errorf("the page reported: %s", p)
	}
	b.problems = nil
}

func (b *browser) do(actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.shot("failure")
		b.t.Fatalf("browser: %v", err)
	}
}

// open goes to a route of the console (the part after #).
func (b *browser) open(route string) {
	b.t.Helper()
	b.do(chromedp.Navigate(b.base + "/console/#" + route))
}

// eval evaluates a JavaScript expression in the page.
func eval[T any](b *browser, expr string) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		b.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// wait waits until a JavaScript expression is truthy.
func (b *browser) wait(what, expr string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 45*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingInterval(25*time.Millisecond), chromedp.WithPollingTimeout(40*time.Second))); err != nil {
		b.shot("failure")
		html, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.querySelector('main').innerText`))
		b.t.Fatalf("waiting for %s (%s): %v\nthe page shows:\n%s", what, expr, err, html)
	}
}

// shot saves a screenshot of the whole page as name.png.
func (b *browser) shot(name string) string {
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	buf, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Logf("screenshot %s: %v", name, err)
		return ""
	}
	p := filepath.Join(b.shots, name+".png")
	if err := os.WriteFile(p, buf, 0o644); err != nil {
		b.t.Logf("screenshot %s: %v", name, err)
	}
	return p
}

// rows are the session ids the sessions page lists.
func (b *browser) rows() []string {
	return eval[[]string](b, `[...document.querySelectorAll('tr[data-session]')].map(r => r.dataset.session)`)
}

// cutProxy relays TCP connections to target until cut: then it closes
// every connection it relays and refuses new ones until restored, as a
// network that drops does.
type cutProxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	down  bool
	conns map[net.Conn]struct{}
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &cutProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() {
		ln.Close()
		p.cut()
	})
	go p.serve() // ends when the listener is closed
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.relay(c)
	}
}

func (p *cutProxy) relay(c net.Conn) {
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		c.Close()
		return
	}
	p.mu.Unlock()
	u, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		c.Close()
		u.Close()
		return
	}
	p.conns[c], p.conns[u] = struct{}{}, struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(u, c)
	go pipe(c, u)
	<-done
	c.Close()
	u.Close()
	<-done
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, u)
	p.mu.Unlock()
}

// cut drops every relayed connection and refuses new ones.
func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
}

func (p *cutProxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
}

// TestConsole drives the console in a real browser: the login form without
// the token, the sessions list with search and filters, a transcript with
// tool calls under their call, a reply followed live through a dropped
// connection, erasing, the overview, and phone width.
func TestConsole(t *testing.T) {
	findChromium(t)
	const token = "console-test-token-0123456789"
	up := fakeai.New(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "ADMIN_TOKEN": token}, "-admin-token-env", "ADMIN_TOKEN")
	e := &adminEnv{p: p, up: up, token: token}
	ctx := context.Background()

	// Turns through the proxy, with the official SDK.
	e.chat(t, "web:ann@example.com:support", "My printer is on fire, what should I do?")
	e.chat(t, "web:bob:billing", "I want a refund for order 42")
	e.chat(t, "api:cat:support", "Please reset my password")
	const tools = "web:dan:support"
	c := p.client(tools)
	up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: "call_weather", Name: "get_weather", Arguments: `{"city":"Paris","unit":"celsius"}`}}})
	_, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("What is the weather in Paris?")},
	})
	require.NoError(t, err)
	up.Enqueue(fakeai.Reply{Content: "It is 18 °C and sunny in Paris."})
	_, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
		Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.ToolMessage(`{"temp_c":18,"sky":"sunny"}`, "call_weather")},
	})
	require.NoError(t, err)

	shots, err := os.MkdirTemp("", "historyproxy-console-screenshots-")
	require.NoError(t, err)
	t.Logf("screenshots of the console: %s", shots)
	cp := newCutProxy(t, p.addrs.Admin)
	b := newBrowser(t, "http://"+cp.addr(), shots)
	defer b.checkProblems()

	if !t.Run("without the token: the login form and no data", func(t *testing.T) {
		b.t = t
		b.open("/sessions")
		b.wait("the login form", `document.querySelector('form.login input[type=password]') !== null`)
		require.Empty(t, b.rows())
		text := eval[string](b, `document.body.innerText`)
		for _, id := range []string{"ann@example.com", "bob", "printer"} {
			require.NotContains(t, text, id)
		}
		b.shot("login")
		// A wrong token is refused, and still shows nothing.
		b.do(chromedp.SendKeys(chromedp.CSS("#token"), "wrong-token"), chromedp.Click(chromedp.CSS("form.login button[type=submit]")))
		b.wait("the refusal", `(document.querySelector('#login-error')?.textContent || '').includes('refused')`)
		require.Empty(t, b.rows())
		require.Equal(t, "", eval[string](b, `document.querySelector('#token').value`), "a new, empty form")
		// The token is in session storage only: not in the address, no cookie.
		require.Equal(t, "", eval[string](b, `document.cookie`))
	}) {
		return
	}

	if !t.Run("signed in, turns made through the proxy are listed", func(t *testing.T) {
		b.t = t
		b.do(chromedp.SendKeys(chromedp.CSS("#token"), token), chromedp.Click(chromedp.CSS("form.login button[type=submit]")))
		b.wait("four sessions", `document.querySelectorAll('tr[data-session]').length === 4`)
		require.Equal(t, []string{tools, "api:cat:support", "web:bob:billing", "web:ann@example.com:support"}, b.rows(), "most recently active first")
		require.NotContains(t, eval[string](b, `location.href`), token)
		require.Equal(t, "", eval[string](b, `document.cookie`))
		row := eval[string](b, `document.querySelector('tr[data-session="web:bob:billing"]').innerText`)
		require.Contains(t, row, "I want a refund for order 42", "the title")
		require.Contains(t, row, "2", "the messages")
		require.Contains(t, row, "$", "the cost")
		b.shot("sessions")
	}) {
		return
	}

	if !t.Run("search and filters narrow the list", func(t *testing.T) {
		b.t = t
		b.do(chromedp.SendKeys(chromedp.CSS("#f-q"), "refund"), chromedp.Click(chromedp.CSS("form.filters button[type=submit]")))
		b.wait("one match", `location.hash.includes('q=refund') && document.querySelectorAll('tr[data-session]').length === 1`)
		require.Equal(t, []string{"web:bob:billing"}, b.rows())
		b.open("/sessions?agent=support&channel=web")
		b.wait("the web support sessions", `document.querySelectorAll('tr[data-session]').length === 2`)
		require.Equal(t, []string{tools, "web:ann@example.com:support"}, b.rows())
		b.open("/sessions?channel=api")
		b.wait("the api session", `document.querySelectorAll('tr[data-session]').length === 1`)
		require.Equal(t, []string{"api:cat:support"}, b.rows())
		b.open("/sessions?sort=cost")
		b.wait("every session by cost", `document.querySelectorAll('tr[data-session]').length === 4 && document.querySelector('caption').textContent.includes('costly')`)
		b.open("/sessions?q=nothing-like-this")
		b.wait("no match", `document.querySelector('.empty') !== null`)
		require.Empty(t, b.rows())
	}) {
		return
	}

	if !t.Run("the transcript shows tool calls under their call", func(t *testing.T) {
		b.t = t
		b.open("/session/" + url.PathEscape(tools))
		b.wait("the tool's result under its call", `(document.querySelector('details.toolcall[data-call-id="call_weather"] .result pre.output')?.textContent || '').includes('sunny')`)
		require.Equal(t, 0, eval[int](b, `document.querySelectorAll('li.msg[data-role="tool"]').length`), "no result outside its call")
		require.Contains(t, eval[string](b, `document.querySelector('details.toolcall[data-call-id="call_weather"] pre.args').textContent`), `"city": "Paris"`)
		require.Equal(t, []string{"user", "assistant", "assistant"}, eval[[]string](b, `[...document.querySelectorAll('li.msg')].map(li => li.dataset.role)`))
		require.Contains(t, eval[string](b, `document.querySelector('li.msg:last-child .turn').textContent`), "Turn:", "tokens and cost of the turn")
		b.do(chromedp.Click(chromedp.CSS(`details.toolcall[data-call-id="call_weather"] summary`)))
		b.shot("conversation-tools")
	}) {
		return
	}

	if !t.Run("a streamed reply shows live and survives a dropped connection", func(t *testing.T) {
		b.t = t
		const id = "web:eve:support"
		e.chat(t, id, "Hello, I need help with my router")
		b.open("/session/" + url.PathEscape(id))
		b.wait("the live watch", `document.querySelector('.live-status')?.dataset.state === 'open' && document.querySelectorAll('li.msg').length === 2`)

		words := strings.Fields("First unplug the router and wait thirty seconds. Then plug it back in and wait for the light to turn green. If it stays orange, call us again and we will send a technician.")
		var deltas []string
		for i, w := range words {
			if i > 0 {
				w = " " + w
			}
			deltas = append(deltas, w)
		}
		full := strings.Join(deltas, "")
		gate := make(chan struct{})
		up.Enqueue(fakeai.Reply{Deltas: deltas, Gate: gate, GateAfter: 4, ChunkDelay: 20 * time.Millisecond})
		streamed := make(chan error, 1)
		go func() {
			s := p.client(id).Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
				Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("It keeps dropping the connection")},
			})
			for s.Next() {
			}
			streamed <- errors.Join(s.Err(), s.Close())
		}()
		// Where the messages above are (document coordinates).
		const tops = `[...document.querySelectorAll('li.msg:not(.draft)')].map(li => Math.round(li.getBoundingClientRect().top + window.scrollY))`
		before := eval[[]int](b, tops)
		b.wait("the reply being written", `(document.querySelector('li.draft .body')?.textContent || '').startsWith('First unplug')`)
		b.shot("conversation-streaming")
		require.Equal(t, before, eval[[]int](b, tops), "the messages above the reply did not move while it streamed")

		// The page's connection drops while the reply goes on, and comes back.
		cp.cut()
		b.wait("the page to notice", `document.querySelector('.live-status').dataset.state === 'reconnecting'`)
		close(gate)
		require.NoError(t, <-streamed)
		cp.restore()
		b.wait("the whole reply", `[...document.querySelectorAll('li.msg[data-role="assistant"] .body')].some(el => el.textContent === `+jsString(full)+`) && !document.querySelector('li.draft')`)
		require.Equal(t, []string{"Hello, I need help with my router", "echo: Hello, I need help with my router [messages=1]", "It keeps dropping the connection", full},
			eval[[]string](b, `[...document.querySelectorAll('li.msg .body')].map(el => el.textContent)`), "every message once, in order (the fake echoes the first turn)")
		ids := eval[[]string](b, `[...document.querySelectorAll('li.msg')].map(li => li.dataset.id)`)
		require.Len(t, ids, 4)
		var tl struct {
			Items []struct{ ID string } `json:"items"`
		}
		e.get(t, sessionPath(id, "/timeline"), &tl)
		var stored []string
		for _, it := range tl.Items {
			stored = append(stored, it.ID)
		}
		require.Equal(t, stored, ids, "the page shows what is stored")
		require.Equal(t, "open", eval[string](b, `document.querySelector('.live-status').dataset.state`))
		require.Equal(t, "1", eval[string](b, `document.querySelector('ol.transcript').dataset.snapshots`),
			"the page resumed with Last-Event-ID: it got what it missed, not a second snapshot")
		b.shot("conversation")
	}) {
		return
	}

	if !t.Run("overview", func(t *testing.T) {
		b.t = t
		b.open("/overview")
		b.wait("the tables", `document.querySelectorAll('table.usage-table').length === 2 && document.querySelector('table.top-sessions') !== null`)
		text := eval[string](b, `document.querySelector('table.usage-table').innerText`)
		require.Contains(t, text, "support")
		require.Contains(t, text, "gpt-4o-mini")
		require.Equal(t, 5, eval[int](b, `document.querySelectorAll('table.top-sessions tr[data-session]').length`))
		b.shot("overview")
	}) {
		return
	}

	if !t.Run("at phone width nothing is wider than the screen", func(t *testing.T) {
		b.t = t
		b.do(chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(1)))
		for _, r := range []struct{ route, ready, name string }{
			{"/sessions", `document.querySelectorAll('tr[data-session]').length === 5`, "sessions-phone"},
			{"/session/" + url.PathEscape(tools), `document.querySelector('details.toolcall') !== null`, "conversation-phone"},
			{"/overview", `document.querySelector('table.top-sessions') !== null`, "overview-phone"},
		} {
			b.open(r.route)
			b.wait(r.name, r.ready)
			require.LessOrEqual(t, eval[int](b, `document.documentElement.scrollWidth`), 390, "%s scrolls sideways", r.route)
			b.shot(r.name)
		}
		b.do(chromedp.EmulateViewport(1100, 800))
	}) {
		return
	}

	if !t.Run("erase removes the session from the list", func(t *testing.T) {
		b.t = t
		b.open("/session/" + url.PathEscape("web:bob:billing"))
		b.wait("the page", `document.querySelector('.actions button.danger') !== null`)
		b.do(chromedp.Click(chromedp.CSS(".actions button.danger")))
		b.wait("the confirmation naming the session", `document.querySelector('dialog[open]')?.textContent.includes('web:bob:billing')`)
		b.shot("erase-confirmation")
		// Cancel first: nothing is erased.
		b.do(chromedp.Click(chromedp.CSS(`dialog[open] button[value="cancel"]`)))
		b.wait("the dialog to close", `document.querySelector('dialog') === null`)
		require.Equal(t, 200, e.call(t, "GET", sessionPath("web:bob:billing"), nil, nil))
		b.do(chromedp.Click(chromedp.CSS(".actions button.danger")))
		b.wait("the confirmation", `document.querySelector('dialog[open]') !== null`)
		b.do(chromedp.Click(chromedp.CSS(`dialog[open] button[value="yes"]`)))
		b.wait("the list without it", `location.hash === '#/sessions' && document.querySelectorAll('tr[data-session]').length === 4`)
		require.NotContains(t, b.rows(), "web:bob:billing")
		require.Equal(t, 404, e.call(t, "GET", sessionPath("web:bob:billing"), nil, nil))
	}) {
		return
	}

	if !t.Run("without a token on loopback the console opens directly", func(t *testing.T) {
		b.t = t
		open := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL})
		(&adminEnv{p: open, up: up}).chat(t, "web:zoe:support", "Hello without a token")
		saved := b.base
		b.base = "http://" + open.addrs.Admin
		defer func() { b.base = saved }()
		b.open("/sessions")
		b.wait("the list", `document.querySelectorAll('tr[data-session]').length === 1`)
		require.Equal(t, []string{"web:zoe:support"}, b.rows())
		require.Equal(t, 0, eval[int](b, `document.querySelectorAll('form.login').length`))
		require.True(t, eval[bool](b, `document.querySelector('#logout').hidden`), "nothing to sign out of")
		// Keyboard: a conversation is reached from the list with Tab and
		// Enter, and the new page's heading has the focus.
		b.do(chromedp.Focus(chromedp.CSS(`tr[data-session] a`)), chromedp.KeyEvent("\r"))
		b.wait("the conversation", `location.hash.startsWith('#/session/') && document.activeElement === document.querySelector('h1')`)
	}) {
		return
	}

	if !t.Run("signing out shows the login form again", func(t *testing.T) {
		b.t = t
		b.open("/sessions")
		b.wait("the list, signed in", `document.querySelectorAll('tr[data-session]').length === 4`)
		b.do(chromedp.Click(chromedp.CSS("#logout")))
		b.wait("the login form", `document.querySelector('form.login') !== null`)
		require.Empty(t, b.rows())
		require.Equal(t, "", eval[string](b, `sessionStorage.getItem('historyproxy.admin-token') || ''`))
	}) {
		return
	}
	b.t = t
}

// jsString quotes s as a JavaScript string.
func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

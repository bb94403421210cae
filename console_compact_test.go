package main

import (
	"net/url"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"
)

// TestConsoleCompactAsksForTheUpstreamKey: when the proxy holds no
// upstream key, the compact route needs one in X-Upstream-Authorization,
// which the console's button never sent: it only showed the error. It asks
// for the key now, sends it with that one call, and compacts.
func TestConsoleCompactAsksForTheUpstreamKey(t *testing.T) {
	findChromium(t)
	path := compactionConfig(t, false, "")
	e := (&adminBackend{name: "memory"}).start(t, nil, "-config", path)
	s := newSummarizer(e.up)
	const id = "web:kim:support"
	for _, q := range []string{"q0", "q1", "q2"} {
		e.chat(t, id, q)
	}
	b := newBrowser(t, "http://"+e.p.addrs.Admin, t.TempDir())
	defer b.checkProblems()
	b.open("/session/" + url.PathEscape(id))
	b.wait("the compact button", `!!document.querySelector('button[data-action=compact]') && !document.querySelector('button[data-action=compact]').hidden`)
	b.do(chromedp.Click(chromedp.CSS(`button[data-action=compact]`)))
	b.wait("the confirmation", `!!document.querySelector('dialog[open] button[value=yes]')`)
	b.do(chromedp.Click(chromedp.CSS(`dialog[open] button[value=yes]`)))
	b.wait("the key asked for", `!!document.querySelector('dialog[open] input#upstream-key[type=password]')`)
	b.do(chromedp.SendKeys(chromedp.CSS(`dialog[open] input#upstream-key`), "sk-console"),
		chromedp.Click(chromedp.CSS(`dialog[open] button[value=send]`)))
	b.wait("the result", `(document.getElementById('toast').textContent || '').startsWith('Compacted')`)
	<-s.seen
	var auth []string
	for _, r := range e.up.Requests() {
		if r.Chat != nil && strings.HasPrefix(r.Chat.System(), "You keep") {
			auth = append(auth, r.Header.Get("Authorization"))
		}
	}
	require.Equal(t, []string{"Bearer sk-console"}, auth, "the summarizing call, with the key given")
	require.Len(t, e.summaries(t, id), 1)
}

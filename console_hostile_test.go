package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/openai/openai-go"
	"github.com/stretchr/testify/require"
)

// TestConsoleHostile is the console's adversarial review: what users and
// models write is shown as text, never run, and a long reply costs the
// page work in proportion to its length.
func TestConsoleHostile(t *testing.T) {
	findChromium(t)
	const token = "console-hostile-token-0123456789"
	up := fakeai.New(t)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "ADMIN_TOKEN": token}, "-admin-token-env", "ADMIN_TOKEN")
	e := &adminEnv{p: p, up: up, token: token}
	ctx := context.Background()

	shots, err := os.MkdirTemp("", "historyproxy-console-hostile-")
	require.NoError(t, err)
	t.Logf("screenshots: %s", shots)
	cp := newCutProxy(t, p.addrs.Admin)
	b := newBrowser(t, "http://"+cp.addr(), shots)
	defer b.checkProblems()
	// The token goes in before the page loads its modules.
	b.open("/sessions")
	b.wait("the login form", `document.querySelector('form.login') !== null`)
	b.do(chromedp.SendKeys(chromedp.CSS("#token"), token), chromedp.Click(chromedp.CSS("form.login button[type=submit]")))
	b.wait("signed in", `document.querySelector('form.filters') !== null`)

	t.Run("markup in what users and models wrote is shown as text", func(t *testing.T) {
		b.t = t
		const id = "web:mallory:support"
		xss := func(n int) string {
			return fmt.Sprintf(`<img src=x onerror="window.__pwned=%d"><script>window.__pwned=%d</script><b class=pwn>bold</b>`, n, n)
		}
		c := p.client(id)
		model := openai.ChatModel(`gpt-4o-mini"><img src=x onerror="window.__pwned=9">`)
		up.Enqueue(fakeai.Reply{ToolCalls: []fakeai.ToolCall{{ID: `call_"><img src=x onerror="window.__pwned=2">`, Name: `get_<img src=x onerror="window.__pwned=3">`, Arguments: `{"q":"<img src=x onerror=\"window.__pwned=4\">"}`}}})
		_, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model: model, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(xss(1))},
		})
		require.NoError(t, err)
		up.Enqueue(fakeai.Reply{Content: xss(5)})
		_, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
			Model: model, Messages: []openai.ChatCompletionMessageParamUnion{openai.ToolMessage(xss(6), `call_"><img src=x onerror="window.__pwned=2">`)},
		})
		require.NoError(t, err)
		require.Equal(t, 200, e.call(t, "PUT", sessionPath(id, "/title"), map[string]string{"title": xss(7)}, nil))

		eval[bool](b, `window.__violations = 0, document.addEventListener('securitypolicyviolation', () => window.__violations++), true`)
		for _, r := range []struct{ route, ready string }{
			{"/sessions?sort=cost", `document.querySelector('tr[data-session] a') !== null`},
			{"/sessions?q=" + url.QueryEscape("<img"), `document.querySelector('caption') !== null || document.querySelector('.empty') !== null`},
			{"/session/" + url.PathEscape(id), `document.querySelector('details.toolcall .result pre.output') !== null && document.querySelectorAll('li.msg').length >= 2`},
			{"/overview", `document.querySelector('table.top-sessions') !== null`},
		} {
			b.open(r.route)
			b.wait(r.route, r.ready)
			// Let the browser try to load and run whatever got in.
			time.Sleep(300 * time.Millisecond)
			require.Equal(t, 0, eval[int](b, `document.querySelectorAll('main img, main script, main b.pwn, main iframe').length`), "%s: elements made from text", r.route)
			require.Equal(t, 0, eval[int](b, `window.__pwned || 0`), "%s ran script from text", r.route)
			require.Equal(t, 0, eval[int](b, `window.__violations`), "%s: CSP violations", r.route)
			require.Contains(t, eval[string](b, `document.querySelector('main').innerText`), "<img src=x", "%s shows the markup as text", r.route)
		}
		b.shot("hostile-conversation")
	})

	t.Run("a long reply: the page's DOM work grows with its length, not its square", func(t *testing.T) {
		b.t = t
		const id = "web:long:support"
		e.chat(t, id, "Tell me a long story")
		b.open("/session/" + url.PathEscape(id))
		b.wait("the live watch", `document.querySelector('.live-status')?.dataset.state === 'open' && document.querySelectorAll('li.msg').length === 2`)
		// Count the characters the page puts into the DOM while the reply
		// is written: rewriting the whole reply per delta is n²/2. Nodes
		// added count their text; text changed in place counts what was
		// written (appendData its argument, a data assignment its whole
		// value), not the node's length afterwards, which would make an
		// append look like a rewrite.
		eval[bool](b, `(() => {
			window.__written = 0;
			const cd = CharacterData.prototype;
			const append = cd.appendData;
			cd.appendData = function (s) { window.__written += String(s).length; return append.call(this, s); };
			const data = Object.getOwnPropertyDescriptor(cd, 'data');
			Object.defineProperty(cd, 'data', { ...data, set(v) { window.__written += String(v).length; data.set.call(this, v); } });
			window.__mo = new MutationObserver((recs) => {
				for (const r of recs) {
					for (const n of r.addedNodes) window.__written += (n.textContent || '').length;
				}
			});
			window.__mo.observe(document.querySelector('ol.transcript'), { childList: true, subtree: true });
			return true;
		})()`)
		const n = 5000
		deltas := make([]string, n)
		for i := range deltas {
			deltas[i] = fmt.Sprintf("word%04d ", i)
		}
		full := strings.Join(deltas, "")
		start := time.Now()
		up.Enqueue(fakeai.Reply{Deltas: deltas})
		s := p.client(id).Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
			Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Go on")},
		})
		for s.Next() {
		}
		require.NoError(t, s.Err())
		require.NoError(t, s.Close())
		b.wait("the whole reply, stored", `!document.querySelector('li.draft') && [...document.querySelectorAll('li.msg[data-role="assistant"] .body')].some(el => el.textContent === `+jsString(full)+`)`)
		written := eval[int](b, `window.__written`)
		t.Logf("%d deltas, %d characters: the page wrote %d characters into the DOM (%.1f× the reply), %v from request to the whole reply shown", n, len(full), written, float64(written)/float64(len(full)), time.Since(start))
		require.LessOrEqual(t, written, 10*len(full), "the DOM work per delta grows with the reply")
		b.shot("long-reply")
	})
	t.Run("drops between two turns and before the first delta", func(t *testing.T) {
		b.t = t
		const id = "web:drop:support"
		e.chat(t, id, "First question")
		b.open("/session/" + url.PathEscape(id))
		b.wait("the live watch", `document.querySelector('.live-status')?.dataset.state === 'open' && document.querySelectorAll('li.msg').length === 2`)
		bodies := `[...document.querySelectorAll('li.msg .body')].map(el => el.textContent)`

		// Between two turns: a whole turn is made while the page is cut off.
		cp.cut()
		b.wait("the page to notice", `document.querySelector('.live-status').dataset.state === 'reconnecting'`)
		e.chat(t, id, "Second question")
		cp.restore()
		b.wait("the second turn", `document.querySelector('.live-status').dataset.state === 'open' && document.querySelectorAll('li.msg').length === 4`)

		// Before the first delta: a streamed reply has begun (headers sent)
		// when the page is cut off, and ends while it is.
		gate := make(chan struct{})
		up.Enqueue(fakeai.Reply{Deltas: []string{"Third", " reply", " in", " pieces"}, Gate: gate, GateAfter: 0})
		asked := len(up.Requests())
		streamed := make(chan error, 1)
		go func() {
			s := p.client(id).Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{
				Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Third question")},
			})
			for s.Next() {
			}
			streamed <- errors.Join(s.Err(), s.Close())
		}()
		require.Eventually(t, func() bool { return len(up.Requests()) > asked }, 10*time.Second, 10*time.Millisecond, "the upstream asked")
		cp.cut()
		b.wait("the page to notice", `document.querySelector('.live-status').dataset.state === 'reconnecting'`)
		close(gate)
		require.NoError(t, <-streamed)
		cp.restore()
		b.wait("the third turn", `document.querySelector('.live-status').dataset.state === 'open' && document.querySelectorAll('li.msg').length === 6 && !document.querySelector('li.draft')`)
		require.Equal(t, []string{"First question", "echo: First question [messages=1]", "Second question", "echo: Second question [messages=3]", "Third question", "Third reply in pieces"},
			eval[[]string](b, bodies), "every message once, in order")
		ids := eval[[]string](b, `[...document.querySelectorAll('li.msg')].map(li => li.dataset.id)`)
		var tl struct {
			Items []struct{ ID string } `json:"items"`
		}
		e.get(t, sessionPath(id, "/timeline"), &tl)
		var stored []string
		for _, it := range tl.Items {
			stored = append(stored, it.ID)
		}
		require.Equal(t, stored, ids, "the page shows what is stored")
		require.Equal(t, "1", eval[string](b, `document.querySelector('ol.transcript').dataset.snapshots`), "resumed, not started over")
	})
	t.Run("a session erased while its page is open", func(t *testing.T) {
		b.t = t
		const id = "web:gone:support"
		e.chat(t, id, "Something private")
		b.open("/session/" + url.PathEscape(id))
		b.wait("the live watch", `document.querySelector('.live-status')?.dataset.state === 'open' && document.querySelectorAll('li.msg').length === 2`)
		require.Equal(t, 200, e.call(t, "DELETE", sessionPath(id), nil, nil))
		e.chat(t, id, "A new start")
		b.wait("the page to show only what is stored", `!document.querySelector('main').innerText.includes('Something private') && [...document.querySelectorAll('li.msg .body')].some(el => el.textContent.startsWith('echo: A new start'))`)
		require.Equal(t, []string{"A new start", "echo: A new start [messages=1]"}, eval[[]string](b, `[...document.querySelectorAll('li.msg .body')].map(el => el.textContent)`))
		b.shot("erased-while-open")
	})
	b.t = t
}

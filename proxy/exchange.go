package proxy

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/metrics"
	"github.com/historyproxy/historyproxy/tokens"
)

// Request headers the proxy reads.
const (
	headerHistory     = "X-History"    // on | off | read-only | new, any case
	headerMessageID   = "X-Message-ID" // idempotency key, the proxy's own
	headerIdempotency = "Idempotency-Key"
)

// headerHistorySession answers which session id holds the conversation a
// request read or recorded: the resolved id, or channel:*:agent for a
// shared agent.
const headerHistorySession = "X-History-Session"

// Values of X-History.
const (
	historyOn       = "on"
	historyOff      = "off"
	historyReadOnly = "read-only"
	historyNew      = "new" // record the turn in a new conversation
)

// historyMode reads X-History, case-insensitively; absent is on.
func historyMode(h http.Header) (string, *apiError) {
	v := h.Values(headerHistory)
	if len(v) == 0 {
		return historyOn, nil
	}
	mode := strings.ToLower(strings.TrimSpace(strings.Join(v, ",")))
	switch mode {
	case historyOn, historyOff, historyReadOnly, historyNew:
		return mode, nil
	}
	return "", badRequest("invalid_value", headerHistory, "X-History must be on, off, read-only or new (in any case), got "+quote(strings.Join(v, ",")))
}

// maxReplyBytes bounds a non-stream reply the proxy reads to record.
const maxReplyBytes = 64 << 20

// Bounds on the cost of counting one request's tokens (see tokens.Meter).
const (
	// countBytes is the most text of one request that is tokenized, the
	// request's messages and the reply together (a fraction of a second of
	// CPU); the rest is estimated from its size.
	countBytes = 256 << 10
	// replyPathBytes is the most text still tokenized once the reply has
	// ended: the client waits for the turn's write.
	replyPathBytes = 16 << 10
)

// exchange is one chat completion on its way through the proxy.
type exchange struct {
	start   time.Time
	req     *chatRequest
	session Session
	stored  string // the store's session id ("" = nothing stored)
	agent   Agent
	record  bool
	idemKey string
	// writeKey names this request's own write when idemKey is the
	// client's: a client's repeat still counts its usage, a retry of the
	// write (by the retry queue) does not count it twice.
	writeKey string
	// newConversation: X-History: new, the turn starts a new conversation
	// and nothing is injected.
	newConversation bool
	// conversation is the conversation the history was read from: the
	// turn is written there, however long the reply takes.
	conversation string
	// lease is the session's turn lease while this request holds it (an
	// agent that orders turns): the turn's append gives it back, or the
	// end of the request when nothing is appended.
	lease *history.Lease
	// ordered: the request took its session's turn, after waiting
	// leaseWait; busy is why it did not (a 409 conversation_busy).
	ordered   bool
	leaseWait time.Duration
	busy      string
	// detached is the streamed reply of a request whose reply outlives
	// its client (on_client_disconnect: finish).
	detached *finishBody
	undetach func() // ends the upstream call's own context
	// stall cuts the upstream call when its reply falls silent for
	// UpstreamIdleTimeout (nil: no bound).
	stall context.CancelCauseFunc

	historyMessages, historyTokens int
	truncated                      bool
	requestTokens                  int // the request's own prompt tokens; -1 until counted
	// meter counts this request's tokens at a bounded cost; msgTokens
	// holds the count of each request message once known (-1 before).
	meter     *tokens.Meter
	msgTokens []int
	bodyLen   int

	upstreamStart, upstreamEnd time.Time
	upstreamErr                error
	reply                      *reply
	requestID                  string
	status                     int
	degraded                   bool          // the store failed; served without it (fail_open)
	degradedSent               bool          // X-History: degraded is already among the answer's headers
	usage                      *tokens.Usage // set by Proxy.usage once the reply has ended
	newMsgs                    []history.Message
	counted                    chan struct{} // closed when newMsgs are counted
	// auth is the client's Authorization, kept for AfterTurn when the
	// proxy holds no key (background calls use it).
	auth string
}

type exchangeKey struct{}

func exchangeFrom(ctx context.Context) *exchange {
	x, _ := ctx.Value(exchangeKey{}).(*exchange)
	return x
}

// chat handles POST /v1/chat/completions: parse, resolve the session,
// inject history, forward, and (in modifyResponse or the stream body)
// record the turn.
func (p *Proxy) chat(w http.ResponseWriter, r *http.Request) {
	x := &exchange{start: p.now(), requestTokens: -1}
	cw := &codeWriter{ResponseWriter: w}
	defer p.observe(x, cw)
	defer p.releaseLease(x)
	// A reply whose client went away is read to its end here, before the
	// lease is given back and the request observed (its tokens count).
	// It runs also while the reverse proxy's http.ErrAbortHandler panic
	// unwinds: the server recovers from that one once the handler is done.
	defer func() {
		x.detached.finish()
		if x.undetach != nil {
			x.undetach()
		}
	}()

	// The session the headers and path name is known before the body is
	// read, so that an answer about a bad body still says which session it
	// concerned. Only the body's user field can add to it.
	if s, ok, aerr := resolveSession(r.Header, pathSessionFrom(r.Context()), "", p.opt.DefaultChannel, p.opt.DefaultAgent); aerr != nil {
		writeError(cw, aerr)
		return
	} else if ok {
		cw.Header().Set(headerSessionID, s.ID())
	}
	hist, aerr := historyMode(r.Header)
	if aerr != nil {
		writeError(cw, aerr)
		return
	}

	body, release, err := p.readBody(w, r)
	defer release()
	if err != nil {
		if errors.Is(err, errBusy) {
			cw.Header().Set("Retry-After", "1")
			writeError(cw, busy())
			return
		}
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(cw, &apiError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error", Code: "request_too_large",
				Message: fmt.Sprintf("request body is larger than %d bytes", mbe.Limit)})
			return
		}
		if isTimeout(err) {
			writeError(cw, &apiError{Status: http.StatusRequestTimeout, Type: "invalid_request_error", Code: "request_timeout",
				Message: "the request body did not arrive in time"})
			return
		}
		// The cause may name the proxy's own addresses (read tcp
		// 10.0.0.5:8080->...: connection reset): logged, not answered.
		p.log.Debug("could not read a chat request body", "err", err)
		writeError(cw, badRequest("invalid_request_body", "", "could not read the request body"))
		return
	}
	req, aerr := parseChat(body, limits{Messages: p.opt.MaxRequestMessages, Parts: p.opt.MaxContentParts, Tools: p.opt.MaxRequestTools})
	if aerr != nil {
		writeError(cw, aerr)
		return
	}
	x.req, x.bodyLen = req, len(body)
	sess, ok, aerr := resolveSession(r.Header, pathSessionFrom(r.Context()), req.User, p.opt.DefaultChannel, p.opt.DefaultAgent)
	if aerr != nil {
		writeError(cw, aerr)
		return
	}
	x.session = sess
	if !ok && p.opt.RequireSession {
		writeError(cw, badRequest("missing_session", "", "no session: send X-Session-ID: channel:user:agent, X-Session-User, a /s/{channel}/{user}/{agent}/v1 base URL, or the request's user field"))
		return
	}
	if ok {
		cw.Header().Set(headerSessionID, sess.ID())
	}
	x.agent = p.opt.Agent(sess.Agent)
	if ok {
		if x.agent.Mode != ModeOff && hist != historyOff {
			x.stored = sess.ID()
			if x.agent.Mode == ModeShared {
				x.stored = Session{sess.Channel, sharedUser, sess.Agent}.ID()
			}
		}
	}
	x.record = x.stored != "" && hist != historyReadOnly
	if x.record && p.opt.AfterTurn != nil && p.opt.APIKey == "" {
		x.auth = r.Header.Get("Authorization")
	}
	if x.record && p.opt.MaxTurnMessages > 0 {
		if n := req.newCount(); n > p.opt.MaxTurnMessages {
			// One turn is one store write (a Lua script in Redis, which
			// holds every other session while it runs): a turn too large
			// for it is refused before anything is forwarded, rather than
			// recorded in parts or lost after the reply.
			writeError(cw, badRequest("turn_too_large", "messages", fmt.Sprintf(
				"this request would record %d new messages in one turn; this proxy records at most %d (max_turn_messages). "+
					"Send fewer messages after the last assistant message, or X-History: read-only to record nothing", n, p.opt.MaxTurnMessages)))
			return
		}
	}
	if x.stored != "" {
		// The id whose keys hold the conversation: in a shared agent it
		// is not the user's own, and redis-cli needs it. Only an answer
		// that reads or records it names it (not a refusal).
		cw.Header().Set(headerHistorySession, x.stored)
	}
	x.newConversation = x.record && hist == historyNew
	x.idemKey = r.Header.Get(headerIdempotency)
	if x.idemKey == "" {
		x.idemKey = r.Header.Get(headerMessageID)
	}
	if x.idemKey == "" {
		// Every turn carries a key, so a retried write whose first answer
		// was lost (a Redis timeout) cannot store the turn twice.
		x.idemKey = "hp-" + newID()
	} else {
		x.writeKey = "hp-w-" + newID()
	}
	if x.record {
		// The key the turn is stored under. A write that timed out may
		// land all the same; a client that retries with this key (a 503
		// failing closed, a cut stream) gets its turn stored once.
		cw.Header().Set(headerMessageID, x.idemKey)
	}

	// Counting stops when the client is gone, unless the turn is being
	// recorded (then it is bounded by the meter's limit).
	mctx := r.Context()
	if x.record {
		mctx = context.WithoutCancel(mctx)
	}
	x.meter = p.opt.Counter.Meter(mctx, req.Model, countBytes)
	x.msgTokens = slices.Repeat([]int{-1}, len(req.Messages))

	var inject []history.Message
	if reads := req.lastAssistant() < 0 && !x.newConversation; x.stored != "" && (reads || x.record) {
		var busy error
		inject, x.degraded, busy = p.selectHistory(r.Context(), x, reads)
		if busy != nil {
			p.answerBusy(cw, x, busy)
			return
		}
		if r.Context().Err() != nil {
			// The client left while its request waited for its turn.
			cw.WriteHeader(499)
			return
		}
		if x.degraded {
			if p.opt.FailClosed {
				cw.Header().Del(headerHistorySession) // nothing read, nothing to record
				writeError(cw, storeUnavailable())
				return
			}
			cw.Header().Set(headerHistory, "degraded")
			x.degradedSent = true
		}
	}
	if p.opt.FailClosed && x.stored != "" && !p.storeOK.Load() && !p.storeAnswers(r.Context()) {
		// The store failed last time and still does not answer: with
		// nowhere to record the turn, nothing is forwarded.
		cw.Header().Del(headerHistorySession)
		writeError(cw, storeUnavailable())
		return
	}
	if x.record {
		// Tokenizing the new messages overlaps the upstream call instead
		// of delaying the reply; recordTurn waits for it, after capping
		// what is left to tokenize.
		x.counted = make(chan struct{})
		go func() { // ends when the messages are counted
			defer close(x.counted)
			x.newMsgs = p.countNew(x)
		}()
	}
	out, err := req.body(body, inject)
	if err != nil {
		writeError(cw, &apiError{Status: http.StatusInternalServerError, Type: "server_error", Code: "rewrite_failed", Message: err.Error()})
		return
	}
	cw.Header().Set("X-History-Messages", strconv.Itoa(x.historyMessages))
	cw.Header().Set("X-History-Tokens", strconv.Itoa(x.historyTokens))

	if x.finishes() {
		// The client's going away must not cancel the upstream call.
		r, x.undetach = p.detach(r)
	}
	r = r.WithContext(context.WithValue(r.Context(), exchangeKey{}, x))
	// An open stream holds its request until it ends: the rewritten body
	// (the history injected, 9 KB in the benchmark's) is let go once sent,
	// and what only the rewrite read of the request now.
	r.Body = &sentBody{b: out}
	r.ContentLength = int64(len(out))
	req.rewritten()
	r.Header.Del("Content-Length")
	if d := p.opt.UpstreamIdleTimeout; d > 0 {
		// Cut by the reply's body when the upstream falls silent (see
		// idleBody); the request's own end cancels it otherwise.
		var ctx context.Context
		ctx, x.stall = context.WithCancelCause(r.Context())
		r = r.WithContext(ctx)
	}
	x.upstreamStart = p.now()
	p.rp.ServeHTTP(cw, r)
}

// sentBody is a request body that lets go of its bytes once they are
// read to the end.
type sentBody struct{ b []byte }

func (s *sentBody) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		s.b = nil
		return 0, io.EOF
	}
	n := copy(p, s.b)
	if s.b = s.b[n:]; len(s.b) == 0 {
		s.b = nil
	}
	return n, nil
}

func (s *sentBody) Close() error {
	s.b = nil
	return nil
}

// selectHistory reads the session's window and cuts it to the budget;
// with reads false it reads nothing. When the agent orders turns, it
// first takes the session's turn (x.lease), in the same store operation as
// the read. degraded is true when the store could not be read; busy is
// the history.ErrBusy that a request waiting in vain for its turn (or not
// waiting, ordering: reject) gets.
func (p *Proxy) selectHistory(ctx context.Context, x *exchange, reads bool) (msgs []history.Message, degraded bool, busy error) {
	a := x.agent
	if !reads || a.MaxMessages <= 0 || a.MaxTokens <= 0 {
		return nil, false, p.takeTurn(ctx, x)
	}
	budget := a.MaxTokens
	if m, ok := p.opt.Catalog.Lookup(x.req.Model); ok && m.ContextWindow > 0 {
		reserve := x.req.Reserve
		if reserve == 0 {
			reserve = a.OutputReserve
		}
		// A BPE token covers at least one byte, so the body's size (plus
		// the per-message overhead) bounds the request's tokens from
		// above. When even that bound leaves room for the whole budget,
		// the request need not be tokenized at all. Content parts break
		// the bound (an image costs hundreds of tokens in a few bytes of
		// URL), so requests with them are always counted.
		if bound := x.bodyLen + (tokens.TokensPerMessage+1)*len(x.req.Messages) + tokens.ReplyPriming; x.req.hasParts() || m.ContextWindow-bound-reserve < budget {
			budget = min(budget, m.ContextWindow-p.requestTokens(x)-reserve)
		}
		if budget <= 0 {
			return nil, false, p.takeTurn(ctx, x)
		}
	}
	// Idleness is judged at the request's arrival, by the read here and
	// by the append (Turn.ArrivedMs) alike.
	// One message more than can be injected: when it is there, the
	// history was cut by max_messages, and the metric counts it.
	win, err := p.readWindow(ctx, x, a.MaxMessages+1)
	if errors.Is(err, history.ErrBusy) {
		return nil, false, err
	}
	if err != nil {
		if ctx.Err() == nil {
			p.log.Warn("history read failed", "session", x.stored, "err", err)
		}
		return nil, true, nil
	}
	ctx, cancel := context.WithTimeout(ctx, p.opt.StoreTimeout)
	defer cancel()
	ans := answer{results: x.req.leadingResults(), user: x.session.User, key: x.idemKey}
	msgs, answered, dropped := arrange(win.Messages, ans)
	if ans.results != nil && !answered && win.ConversationID == "" && a.Policy.IdleTimeout > 0 {
		// Tool results after the idle timeout (a tool that ran long): a
		// request that answers a pending call continues that call's
		// conversation, idle or not.
		t0 := time.Now()
		w, err := p.opt.Store.Window(ctx, x.stored, a.MaxMessages+1, x.start.UnixMilli(), history.Policy{})
		p.opt.Metrics.ObserveStore("window", time.Since(t0), err)
		p.storeUp(err == nil)
		if err != nil {
			p.log.Warn("history read failed", "session", x.stored, "err", err)
			return nil, true, nil
		}
		if m, ok, d := arrange(w.Messages, ans); ok {
			win, msgs, answered, dropped = w, m, ok, d
		}
	}
	x.conversation = win.ConversationID
	limits := history.Limits{MaxTokens: budget, MaxMessages: a.MaxMessages}
	var summary *history.Message
	if win.Summary != nil {
		s := history.SummaryMessage(*win.Summary)
		summary = &s
	}
	sel, withSummary := fitSummary(msgs, limits, summary, answered)
	msgs = sel.Messages
	if withSummary {
		msgs = append([]history.Message{*summary}, msgs...)
	}
	for _, m := range msgs {
		x.historyTokens += m.Tokens
	}
	x.historyMessages = len(msgs)
	x.truncated = sel.Truncated || dropped
	return msgs, false, nil
}

// selectTurns picks the newest whole turns of msgs within limits. When
// the request answers a tool call (answered) and no whole turn fits (its
// user message is beyond the window or the budget), it begins at a whole
// tool step instead, or the upstream would get tool results with no call
// before them.
func selectTurns(msgs []history.Message, limits history.Limits, answered bool) history.Selection {
	sel := history.Select(msgs, limits)
	if answered && len(sel.Messages) == 0 {
		limits.ToolSteps = true
		sel = history.Select(msgs, limits)
		if len(sel.Messages) == 0 {
			// Not even the answered call fits (its arguments alone pass
			// the budget): it goes in all the same, since the upstream
			// refuses tool results that follow no call.
			last := msgs[len(msgs)-1]
			sel = history.Selection{Messages: msgs[len(msgs)-1:], Tokens: last.Tokens, Truncated: len(msgs) > 1}
		}
	}
	return sel
}

// fitSummary selects the recent turns to inject beside the conversation's
// latest summary (nil: none), which counts against the same budget: the
// summary and one message of max_messages. When both do not fit, the
// older recent turns yield to the summary, oldest first: the summary holds
// the whole earlier conversation in a few hundred tokens, an older turn
// one exchange. But the newest turn never yields: a request continues it
// ("yes, do that"), so when the summary leaves no room for it, or does
// not fit the budget at all, the summary is left out and the recent turns
// get the whole budget. withSummary says whether the summary goes in,
// before the selected turns.
func fitSummary(msgs []history.Message, limits history.Limits, summary *history.Message, answered bool) (sel history.Selection, withSummary bool) {
	// The turns without the summary, computed only where they are the
	// answer: most requests with a summary take the other selection.
	full := func() history.Selection { return selectTurns(msgs, limits, answered) }
	if summary == nil || (limits.MaxTokens > 0 && summary.Tokens > limits.MaxTokens) {
		return full(), false
	}
	if len(msgs) == 0 {
		return full(), true // nothing after the summary's range: it alone
	}
	if limits.MaxMessages == 1 {
		return full(), false // no room for the summary and the newest turn
	}
	rest := limits
	if rest.MaxTokens > 0 {
		rest.MaxTokens -= summary.Tokens
		if rest.MaxTokens == 0 {
			return full(), false
		}
	}
	if rest.MaxMessages > 0 {
		rest.MaxMessages--
	}
	sel = selectTurns(msgs, rest, answered)
	if len(sel.Messages) == 0 || (rest.MaxTokens > 0 && sel.Tokens > rest.MaxTokens) {
		// (An answered call forced in over the budget: no summary beside it.)
		return full(), false
	}
	return sel, true
}

// ordered reports whether the request takes its session's turn lease: its
// agent orders turns, and it reads or records history.
func ordered(a Agent) bool {
	return a.Ordering == OrderingWait || a.Ordering == OrderingReject
}

// takeTurn takes the session's turn for a request that reads no window
// (it carries its own history, starts a new conversation, or has no room
// for history) but may record a turn. It returns only history.ErrBusy; a
// store that fails is the append's to report.
func (p *Proxy) takeTurn(ctx context.Context, x *exchange) error {
	if !ordered(x.agent) || !x.record {
		return nil
	}
	if _, err := p.readWindow(ctx, x, 0); errors.Is(err, history.ErrBusy) {
		return err
	} else if err != nil && ctx.Err() == nil {
		p.log.Warn("turn lease: could not take it; going on without", "session", x.stored, "err", err)
	}
	return nil
}

// readWindow reads up to n messages of the session's window (none for n
// 0). When the agent orders turns it first takes the session's turn, in
// the same store operation: a request that records holds the turn
// (x.lease) until its turn is appended; one that only reads waits for it
// and passes it on at once.
func (p *Proxy) readWindow(ctx context.Context, x *exchange, n int) (history.Window, error) {
	a := x.agent
	if !ordered(a) {
		ctx, cancel := context.WithTimeout(ctx, p.opt.StoreTimeout)
		defer cancel()
		t0 := time.Now()
		win, err := p.opt.Store.Window(ctx, x.stored, n, x.start.UnixMilli(), a.Policy)
		p.opt.Metrics.ObserveStore("window", time.Since(t0), err)
		p.storeUp(err == nil)
		return win, err
	}
	o := history.TurnOptions{Hold: x.record, OpTimeout: p.opt.StoreTimeout}
	if a.Ordering == OrderingWait {
		o.Wait = a.OrderingTimeout
		if o.Wait <= 0 {
			o.Wait = time.Minute
		}
	}
	t0 := time.Now()
	win, lease, err := p.opt.Store.TakeTurn(ctx, x.stored, n, x.start.UnixMilli(), a.Policy, o)
	// Held from here, whatever comes next: the end of the request gives
	// it back (a client that left just as its turn came, say).
	x.lease = lease
	switch {
	case errors.Is(err, history.ErrBusy):
		reason := "timeout"
		if o.Wait == 0 {
			reason = "reject"
		}
		x.busy = reason
		return win, err
	case ctx.Err() != nil:
		// The client left while waiting: nothing about the store.
		return win, err
	}
	// The store's own time, apart from the wait for the turn.
	p.opt.Metrics.ObserveStore("window", time.Since(t0)-win.Waited, err)
	p.storeUp(err == nil)
	if err == nil {
		x.ordered, x.leaseWait = true, win.Waited
	}
	return win, err
}

// releaseLease gives the session's turn back at the end of a request
// whose turn was not appended with it (the upstream failed, nothing was
// recorded): the next waiting request goes on. After an append it costs
// nothing.
func (p *Proxy) releaseLease(x *exchange) {
	if x.lease == nil || x.lease.Released() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.opt.StoreTimeout)
	defer cancel()
	if err := x.lease.Release(ctx); err != nil {
		p.log.Warn("turn lease: release failed; it expires on its own", "session", x.stored, "err", err)
	}
}

// answerBusy answers a request that did not get its session's turn: 409
// conversation_busy, as OpenAI-shaped as the rest.
func (p *Proxy) answerBusy(w http.ResponseWriter, x *exchange, err error) {
	w.Header().Del(headerHistorySession) // nothing read, nothing recorded
	w.Header().Set("Retry-After", "1")
	msg := "another request of this conversation is being answered; retry when it is done, or send X-History: off to be answered without history"
	if x.agent.Ordering == OrderingWait {
		msg = fmt.Sprintf("another request of this conversation is still being answered after %s (ordering_timeout); retry later, or send X-History: off to be answered without history",
			max(x.agent.OrderingTimeout, 0))
	}
	writeError(w, &apiError{Status: http.StatusConflict, Type: "invalid_request_error", Code: "conversation_busy", Message: msg})
}

// storeUp records whether the store's last answer was a success.
func (p *Proxy) storeUp(ok bool) {
	p.storeOK.Store(ok)
	p.opt.Metrics.SetStoreUp(ok)
}

// storeAnswers pings the store (fail closed, after a failure).
func (p *Proxy) storeAnswers(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, p.opt.StoreTimeout)
	defer cancel()
	err := p.opt.Store.Ping(ctx)
	p.storeUp(err == nil)
	return err == nil
}

// requestTokens counts the request's own prompt once: its messages, tools
// and reply priming. Stored history is never re-tokenized.
//
// It must not run beside countNew: call it before countNew starts or after
// it has ended (x.counted).
func (p *Proxy) requestTokens(x *exchange) int {
	if x.requestTokens < 0 {
		n := tokens.ReplyPriming
		for i, m := range x.req.Messages {
			n += x.messageTokens(i, m.msg)
		}
		x.requestTokens = n + x.meter.Tools(x.req.Tools)
	}
	return x.requestTokens
}

// messageTokens counts request message i once.
func (x *exchange) messageTokens(i int, m history.Message) int {
	if x.msgTokens[i] < 0 {
		x.msgTokens[i] = x.meter.Message(tokenMessage(m))
	}
	return x.msgTokens[i]
}

func tokenMessage(m history.Message) tokens.Message {
	return tokens.Message{Role: m.Role, Name: m.Name, Content: m.Content, Parts: m.Parts,
		ToolCalls: m.ToolCalls, ToolCallID: m.ToolCallID, Refusal: m.Refusal}
}

// modifyResponse observes the upstream's answer to a chat completion: a
// whole reply is recorded before its body is relayed; a stream is wrapped
// so the turn is recorded before [DONE] is relayed. Errors pass unchanged.
func (p *Proxy) modifyResponse(resp *http.Response) error {
	x := exchangeFrom(resp.Request.Context())
	if x == nil {
		return nil
	}
	x.status = resp.StatusCode
	x.requestID = resp.Header.Get("X-Request-Id")
	if x.stall != nil {
		d, session := p.opt.UpstreamIdleTimeout, x.stored
		resp.Body = newIdleBody(resp.Body, d, func() {
			p.log.Warn("upstream sent nothing more of a reply: cut (a stream is stored incomplete)",
				"session", session, "stream_idle_timeout", d)
			x.stall(errUpstreamStalled)
		})
	}
	// X-History is the proxy's to say: the reverse proxy adds the
	// upstream's headers to those already set, so one from the upstream
	// would be sent beside the proxy's own.
	resp.Header.Del(headerHistory)
	resp.Header.Del(headerHistorySession)
	resp.Header.Del(headerSessionID)
	if resp.StatusCode/100 != 2 {
		x.upstreamEnd = p.now()
		return nil
	}
	x.reply = &reply{}
	if ct, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); ct == "text/event-stream" {
		if x.lease != nil {
			// The session's watchers see the reply being written.
			x.reply.live = x.lease.Publish
		}
		finish := func(complete bool) error {
			x.upstreamEnd = p.now()
			return p.recordTurn(resp.Request.Context(), x, complete)
		}
		switch enc := resp.Header.Get("Content-Encoding"); {
		case enc == "" || strings.EqualFold(enc, "identity"):
			hide := x.req.Stream && !x.req.ClientUsage
			resp.Body = newStreamBody(resp.Body, hide, x.reply, p.now, finish)
			// Dropping the usage chunk shortens the body: a length the
			// upstream announced (a buffering gateway) no longer holds.
			resp.Header.Del("Content-Length")
			resp.ContentLength = -1
		case strings.EqualFold(enc, "gzip") || strings.EqualFold(enc, "x-gzip"):
			// Compressed although the proxy asked for identity: relayed
			// as it arrives, read on the side.
			resp.Body = newGzipStreamBody(resp.Body, x.reply, p.now, finish)
		default:
			p.log.Warn("upstream stream in an encoding the proxy cannot read: relayed, reply not recorded", "session", x.stored, "encoding", enc)
			resp.Body = &opaqueStreamBody{src: resp.Body, finish: finish}
		}
		if x.finishes() {
			x.detached = &finishBody{ReadCloser: resp.Body}
			resp.Body = x.detached
		}
		return nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxReplyBytes+1))
	if err != nil {
		resp.Body.Close()
		x.upstreamEnd = p.now()
		// No reply was read, so nothing is billed: not recorded, and not
		// counted in the metrics either.
		x.reply = nil
		return fmt.Errorf("read upstream reply: %w", err)
	}
	if len(body) > maxReplyBytes {
		// Too large to hold and parse: relay it whole, record nothing.
		p.log.Warn("upstream reply too large to record", "session", x.stored, "limit", maxReplyBytes)
		resp.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(body), resp.Body), resp.Body}
		x.reply = nil
		return nil
	}
	resp.Body.Close()
	x.upstreamEnd = p.now()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if rp, ok := parseReply(decoded(resp.Header, body)); ok {
		x.reply = rp
		if err := p.recordTurn(resp.Request.Context(), x, true); err != nil {
			return err
		}
		if x.degraded && !x.degradedSent {
			// Once: the header set before forwarding is already sent with
			// these (the reverse proxy adds, it does not replace).
			resp.Header.Set(headerHistory, "degraded")
		}
	} else {
		x.reply = nil // not a chat completion: relayed as is, nothing recorded
	}
	return nil
}

// decoded returns a whole reply's body for reading: an upstream that
// compresses although the proxy asked for identity is decoded on the side,
// while the client still gets the bytes as they came.
func decoded(h http.Header, body []byte) []byte {
	// x-gzip is gzip (RFC 9110, section 8.4.1.3), as for streams.
	if enc := h.Get("Content-Encoding"); !strings.EqualFold(enc, "gzip") && !strings.EqualFold(enc, "x-gzip") {
		return body
	}
	zr, err := gzip.NewReader(bytes.NewReader(body))
	if err != nil {
		return body
	}
	plain, err := io.ReadAll(io.LimitReader(zr, maxReplyBytes))
	if err != nil {
		return body
	}
	return plain
}

// recordTurn appends the request's new messages and the reply to the
// session, with the usage it adds. The write outlives the client (a
// disconnect must not lose what was generated) but not StoreTimeout.
func (p *Proxy) recordTurn(ctx context.Context, x *exchange, complete bool) error {
	if x.stored == "" {
		return nil
	}
	if x.reply != nil && x.reply.Truncated {
		p.log.Warn("upstream stream too large to read: what was assembled is recorded as incomplete, the rest relayed unread",
			"session", x.stored, "max_event_bytes", maxEventBytes, "max_reply_bytes", maxStreamReplyBytes)
	}
	// The client waits for this write: tokenize little more, estimate the
	// rest. Counting comes before the store's deadline starts.
	x.meter.Cap(replyPathBytes)
	now := p.now().UnixMilli()
	usage := p.usage(x)
	turn := history.Turn{IdempotencyKey: x.idemKey, WriteKey: x.writeKey, NowMs: now, ArrivedMs: x.start.UnixMilli(), ConversationID: x.conversation, NewConversation: x.newConversation, Lease: x.lease, Usage: history.Usage{
		PromptTokens: usage.Prompt, CompletionTokens: usage.Completion, CachedTokens: usage.Cached,
		HistoryTokens: int64(x.historyTokens), Requests: 1,
	}}
	turn.Usage.CostNanos, _ = p.opt.Catalog.Cost(x.req.Model, usage)
	reqID := x.requestID
	if x.record {
		<-x.counted
		for _, m := range x.newMsgs {
			m.User, m.Model, m.RequestID, m.CreatedMs = x.session.User, x.req.Model, reqID, now
			turn.Messages = append(turn.Messages, m)
		}
		if a, ok := x.assistant(now, complete); ok {
			a.Tokens = p.replyTokens(x, a, usage)
			turn.Messages = append(turn.Messages, a)
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.opt.StoreTimeout)
	defer cancel()
	// A turn that waits in the retry queue gives the session's turn back
	// now (or lets it expire): the store is failing, and the requests
	// behind it would only wait for nothing.
	pending := pendingTurn{session: x.stored, turn: turn, policy: x.agent.Policy,
		recorded: Recorded{Session: x.stored, Channel: x.session.Channel, Agent: x.session.Agent, Model: x.req.Model, Auth: x.auth}}
	pending.turn.Lease = nil
	if p.retry != nil && (p.retry.queued(x.stored) || (x.degraded && !p.storeOK.Load())) {
		p.releaseLeaseAsync(x)
		// Earlier turns of this session wait for the store: this one goes
		// behind them to keep the conversation's order. Or the history
		// read of this very request failed and nothing has succeeded
		// since: a second wait of store.timeout on the same outage would
		// only delay the answer, so the queue writes it once the store is
		// back.
		x.degraded = true
		if !p.retry.push(pending) {
			p.lost.Add(1)
		}
		return nil
	}
	t0 := time.Now()
	res, err := p.opt.Store.Append(ctx, x.stored, turn, x.agent.Policy)
	p.opt.Metrics.ObserveStore("append", time.Since(t0), err)
	p.storeUp(err == nil)
	if err == nil {
		// Background work (compaction, titles) is queued, never run here.
		pending.written(res, p.opt.AfterTurn)
		// A client's repeat of a recorded request (res.Duplicate) stores
		// no second turn, but it did cost a second upstream call: the
		// store counted its usage (WriteKey), here or from the retry queue.
		return nil
	}
	// A write that failed may still have landed (and released the turn);
	// else the turn is given back, without holding up the answer.
	p.releaseLeaseAsync(x)
	if p.opt.FailClosed {
		p.lost.Add(1)
		p.log.Error("history write failed: answer withheld (fail_closed)", "session", x.stored, "err", err)
		return fmt.Errorf("%w: %v", errStore, err)
	}
	x.degraded = true
	if p.retry != nil && p.retry.push(pending) {
		p.log.Warn("history write failed: turn queued for retry", "session", x.stored, "err", err)
		return nil
	}
	p.lost.Add(1)
	p.log.Error("history write failed: turn lost", "session", x.stored, "err", err)
	return nil
}

// releaseLeaseAsync gives the turn back on its own goroutine, for a
// request whose store is failing: the release may wait store.timeout.
func (p *Proxy) releaseLeaseAsync(x *exchange) {
	l := x.lease
	x.lease = nil
	if l == nil || l.Released() {
		return
	}
	go func() { // ends within StoreTimeout
		ctx, cancel := context.WithTimeout(context.Background(), p.opt.StoreTimeout)
		defer cancel()
		_ = l.Release(ctx)
	}()
}

// countNew returns the messages the turn records, with their token counts.
func (p *Proxy) countNew(x *exchange) []history.Message {
	idx := newIndexes(x.req)
	msgs := make([]history.Message, len(idx))
	for j, i := range idx {
		msgs[j] = x.req.Messages[i].msg
		msgs[j].Tokens = x.messageTokens(i, msgs[j])
	}
	return msgs
}

// newIndexes are the indexes in c.Messages of c.newMessages(), so that
// their counts are shared with the request's (requestTokens).
func newIndexes(c *chatRequest) []int {
	var out []int
	for i := c.newStart(); i < len(c.Messages); i++ {
		if recorded(c.Messages[i].msg.Role) {
			out = append(out, i)
		}
	}
	return out
}

// assistant is the reply as a stored message; ok is false when there is
// nothing to store (a stream cut before any delta).
func (x *exchange) assistant(now int64, complete bool) (history.Message, bool) {
	r := x.reply
	if r == nil {
		return history.Message{}, false
	}
	m := history.Message{
		Role: history.RoleAssistant, Content: r.Content.String(), Refusal: r.Refusal.String(),
		ToolCalls: r.toolCallsJSON(), User: x.session.User, Model: x.req.Model, CreatedMs: now,
		RequestID: x.requestID, Status: history.StatusComplete,
	}
	if !complete || r.Truncated {
		m.Status = history.StatusIncomplete
	}
	calls := history.HasToolCalls(m.ToolCalls) // "tool_calls": [] calls nothing
	if m.Content == "" && (calls || m.Refusal != "" || r.ContentNull) {
		m.ContentNull = true
	}
	if m.Content == "" && !calls && m.Refusal == "" && !complete {
		return history.Message{}, false
	}
	return m, true
}

// replyTokens is the stored token count of the reply. The upstream already
// counted it (completion tokens, less hidden reasoning), which spares
// tokenizing a long reply before [DONE] can be relayed; without usage, or
// with several choices sharing it, it is counted here.
func (p *Proxy) replyTokens(x *exchange, a history.Message, u tokens.Usage) int {
	switch {
	case u.Estimated && len(x.reply.others) == 0:
		// The estimate counted what was generated (choice 0 alone here); a
		// stored message also carries its framing when it is replayed.
		return int(u.Completion) + tokens.TokensPerMessage + p.opt.Counter.Text(x.req.Model, history.RoleAssistant)
	case x.req.N <= 1 && a.Status == history.StatusComplete && u.Completion > 0:
		return int(u.Completion-u.Reasoning) + tokens.TokensPerMessage
	}
	return x.meter.Message(tokenMessage(a))
}

// usage is the upstream's usage when it sent one, else a local estimate.
// It is worked out once, when the reply has ended, and shared by the
// recording and the metrics, so an estimate tokenizes the reply once.
func (p *Proxy) usage(x *exchange) tokens.Usage {
	if x.usage != nil {
		return *x.usage
	}
	if x.counted != nil {
		<-x.counted // requestTokens must not run beside countNew
	}
	var u tokens.Usage
	if x.reply != nil && x.reply.Usage != nil {
		u = x.reply.Usage.usage()
	} else {
		u = tokens.Usage{Prompt: int64(p.requestTokens(x) + x.historyTokens), Estimated: true}
		if a, ok := x.assistant(0, true); ok {
			// As the API counts completion_tokens: what was generated, not
			// the message framing, in every choice (n > 1).
			u.Completion = int64(x.meter.Completion(tokenMessage(a)))
			for _, o := range x.reply.others {
				u.Completion += int64(x.meter.Completion(tokens.Message{
					Content: o.Content.String(), Refusal: o.Refusal.String(), ToolCalls: o.toolCallsJSON()}))
			}
		}
	}
	x.usage = &u
	return u
}

// billed reports whether the upstream billed the request: it answered with
// success and the reply was read, so its usage (or an estimate) is known.
// Exactly these requests are counted, history tokens included, both in the
// session's totals in the store (recordTurn runs only for them) and in the
// metrics; a 429 or a 500 is billed nothing.
func (x *exchange) billed() bool {
	return x.reply != nil && x.status/100 == 2
}

// observe reports a finished request to the metrics.
func (p *Proxy) observe(x *exchange, cw *codeWriter) {
	end := p.now()
	r := metrics.Request{
		Channel: x.session.Channel, Agent: x.session.Agent, Session: x.stored,
		Code: cw.code, Duration: end.Sub(x.start), Reached: x.status != 0,
		HistoryMessages: x.historyMessages, HistoryTokens: x.historyTokens, HistoryTruncated: x.truncated,
		Ordered: x.ordered, LeaseWait: x.leaseWait, Busy: x.busy,
	}
	if r.Code == 0 {
		r.Code = http.StatusOK
	}
	if x.req != nil {
		r.Model, r.Stream = x.req.Model, x.req.Stream
	}
	if !x.upstreamStart.IsZero() {
		ue := x.upstreamEnd
		if ue.IsZero() {
			ue = end
		}
		r.Upstream = ue.Sub(x.upstreamStart)
		if x.reply != nil && !x.reply.FirstToken.IsZero() {
			// From the request's arrival, as the client waits: a slow
			// history read shows here; the upstream's share apart.
			r.TTFT = x.reply.FirstToken.Sub(x.start)
			r.UpstreamTTFT = x.reply.FirstToken.Sub(x.upstreamStart)
		}
	}
	if x.billed() {
		u := p.usage(x)
		r.Billed = true
		r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens, r.Estimated = u.Prompt, u.Completion, u.Cached, u.Reasoning, u.Estimated
		r.CostNanos, r.Priced = p.opt.Catalog.Cost(r.Model, u)
		if !r.Priced && (u.Prompt > 0 || u.Completion > 0) {
			p.unpriced.log(p.log, r.Model)
		}
	}
	p.opt.Metrics.ObserveRequest(r)
	// One line per request for operators, without message content.
	p.log.Debug("chat completion", "session", x.stored, "model", r.Model, "stream", r.Stream, "code", r.Code,
		"duration", r.Duration, "history_messages", r.HistoryMessages, "history_tokens", r.HistoryTokens,
		"prompt_tokens", r.PromptTokens, "completion_tokens", r.CompletionTokens, "estimated", r.Estimated)
}

// codeWriter remembers the status code for the metrics.
type codeWriter struct {
	http.ResponseWriter
	code int
}

func (w *codeWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *codeWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach Flush on the real writer.
func (w *codeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

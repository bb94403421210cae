// Package compaction summarizes long conversations in the background: when
// a conversation's messages that no summary covers pass an agent's trigger,
// its older turns are folded, with the previous summary, into a new summary
// by one upstream call, and stored as a message of kind summary. It also
// generates conversation titles.
//
// It never runs in a request's path: the proxy hands it each recorded turn
// (Recorded), which only queues work. One compaction per session runs at a
// time across every process sharing the store (the store's compaction
// lease); a failure changes nothing, is logged and counted, and is retried
// with backoff.
package compaction

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/metrics"
	"github.com/historyproxy/historyproxy/tokens"
	"github.com/historyproxy/historyproxy/upstream"
)

// Store is what compaction needs of a history store; both stores are one.
type Store interface {
	TakeCompaction(ctx context.Context, session string, ttl time.Duration) (string, error)
	ReleaseCompaction(ctx context.Context, session, token string) error
	Compaction(ctx context.Context, session, conv string, limit int) (history.CompactionInput, bool, error)
	StoreSummary(ctx context.Context, session, token string, w history.SummaryWrite) (history.Message, error)
	AddUsage(ctx context.Context, session string, u history.Usage) error
	ReadMessages(ctx context.Context, session string, q history.MessageQuery) (string, []history.Message, error)
	StoreTitle(ctx context.Context, session, conv, title string, onlyUnset bool, u history.Usage) (string, bool, error)
}

// Caller makes upstream calls; *upstream.Client is one.
type Caller interface {
	Chat(ctx context.Context, auth string, req upstream.ChatRequest) (upstream.ChatResponse, error)
}

// Observer counts background calls; *metrics.Metrics is one.
type Observer interface {
	ObserveBackground(metrics.Background)
}

// Purposes of background calls, the values of the metrics' purpose label.
const (
	PurposeCompaction = metrics.PurposeCompaction
	PurposeTitle      = metrics.PurposeTitle
)

// Settings are an agent's compaction settings.
type Settings struct {
	Enabled          bool
	TriggerMessages  int
	TargetMessages   int
	KeepRecentTurns  int
	Model            string // "": the model of the turn that triggered it
	Prompt           string // "": DefaultPrompt
	MaxSummaryTokens int
	Titles           bool
}

// DefaultPrompt is the summarizer's built-in system prompt; %d is the
// summary's length in words.
const DefaultPrompt = `You keep the running summary of a conversation between a user and an assistant, so that the assistant can go on with the conversation without its older messages.
You get the previous summary (if any) and the messages that follow it. Write one updated summary that merges both.
Keep everything the assistant will need: facts the user gave about themselves and their situation (names, places, dates, numbers, identifiers), their preferences, decisions made and commitments given, what was tried and with what result, and the questions still open.
Leave out greetings and small talk. Do not invent anything. Write in the language of the conversation, in short plain sentences or bullet points, at most about %d words.
Answer with the summary only.`

// TitlePrompt is the title generator's system prompt.
const TitlePrompt = `Give this conversation a short title: at most 6 words, in the language of the conversation, naming its subject. Answer with the title only, without quotes or a final period.`

// Turn is one recorded turn, as the proxy hands it over.
type Turn struct {
	// Session is the store's session id (channel:*:agent in a shared
	// agent); Channel and Agent label the metrics.
	Session, Channel, Agent string
	Conversation            string
	Model                   string // the request's model
	// Auth is the request's Authorization header: the key background
	// calls use when the proxy holds none. It is kept in memory only, while
	// the work is queued.
	Auth            string
	Unsummarized    int64
	NewConversation bool
}

// Options configure a Worker. Store, Upstream, Counter, Catalog and
// Settings are required.
type Options struct {
	Store    Store
	Upstream Caller
	Counter  *tokens.Counter
	Catalog  *tokens.Catalog
	Settings func(agent string) Settings
	Metrics  Observer // nil: nothing observed
	// Workers is how many compactions run at once in this process; 0: 2.
	Workers int
	// QueueSize bounds the sessions waiting; 0: 10,000. A turn that finds
	// it full is dropped (a later turn queues the session again).
	QueueSize int
	// Backoff is the first retry's delay, doubling up to 64 times it; 0:
	// 2s. MaxAttempts bounds the tries of one queued job; 0: 6.
	Backoff     time.Duration
	MaxAttempts int
	// CallTimeout bounds one upstream call; 0: 2 minutes. The compaction
	// lease lasts it plus StoreTimeout twice.
	CallTimeout  time.Duration
	StoreTimeout time.Duration // 0: 2s
	// ReadLimit bounds the messages one compaction reads; 0: 2,000.
	ReadLimit int
	// FoldTokens bounds the tokens of the messages one summarization call
	// folds in; 0: 32,000. The rest waits for the next compaction.
	FoldTokens int
	Logger     *slog.Logger
}

// Worker queues and runs compactions and title generations.
type Worker struct {
	opt  Options
	log  *slog.Logger
	wake chan struct{}

	mu   sync.Mutex
	jobs map[string]*job
}

// job is the queued work of one session.
type job struct {
	turn     Turn
	compact  bool // summarize when over the trigger
	title    bool // generate the conversation's title
	attempts int
	due      time.Time
	running  bool
	again    bool // a turn came while it ran: look again after
}

// New builds a worker; Run runs it.
func New(o Options) *Worker {
	if o.Workers <= 0 {
		o.Workers = 2
	}
	if o.QueueSize <= 0 {
		o.QueueSize = 10000
	}
	if o.Backoff <= 0 {
		o.Backoff = 2 * time.Second
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 6
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 2 * time.Minute
	}
	if o.StoreTimeout <= 0 {
		o.StoreTimeout = 2 * time.Second
	}
	if o.ReadLimit <= 0 {
		o.ReadLimit = 2000
	}
	if o.FoldTokens <= 0 {
		o.FoldTokens = 32000
	}
	if o.Metrics == nil {
		o.Metrics = discard{}
	}
	w := &Worker{opt: o, log: o.Logger, wake: make(chan struct{}, 1), jobs: map[string]*job{}}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	return w
}

type discard struct{}

func (discard) ObserveBackground(metrics.Background) {}

// Recorded is called after a turn is recorded. It never blocks on the
// store or the upstream: it queues the session when its conversation is
// over its agent's trigger, or (titles) when the turn started it.
func (w *Worker) Recorded(t Turn) {
	s := w.opt.Settings(t.Agent)
	compact := s.Enabled && s.TriggerMessages > 0 && t.Unsummarized > int64(s.TriggerMessages)
	title := s.Titles && t.NewConversation
	if !compact && !title {
		return
	}
	w.mu.Lock()
	j := w.jobs[t.Session]
	switch {
	case j != nil:
		j.turn.Auth, j.turn.Model = t.Auth, t.Model
		if j.turn.Conversation != t.Conversation {
			j.turn.Conversation = t.Conversation
			j.title = false // the older conversation's title is not due any more
		}
		j.compact, j.title = j.compact || compact, j.title || title
		if j.running {
			j.again = true
		}
	case len(w.jobs) >= w.opt.QueueSize:
		w.mu.Unlock()
		w.log.Warn("compaction queue full: session not queued (a later turn queues it again)", "session", t.Session, "queue", w.opt.QueueSize)
		w.opt.Metrics.ObserveBackground(metrics.Background{Purpose: purposeOf(compact), Result: metrics.ResultDropped})
		return
	default:
		w.jobs[t.Session] = &job{turn: t, compact: compact, title: title, due: time.Now()}
	}
	w.mu.Unlock()
	w.poke()
}

func purposeOf(compact bool) string {
	if compact {
		return PurposeCompaction
	}
	return PurposeTitle
}

func (w *Worker) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Pending is how many sessions have work queued or running.
func (w *Worker) Pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.jobs)
}

// Run runs queued work, Workers at a time, until ctx is done; then it
// waits for the work running to end (each bounded by CallTimeout and
// StoreTimeout) and returns. Work still queued is dropped: a later turn
// queues it again.
func (w *Worker) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, w.opt.Workers)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
		next := now.Add(time.Hour)
		var ready []*job
		w.mu.Lock()
		for _, j := range w.jobs {
			switch {
			case j.running:
			case !j.due.After(now) && len(ready) < cap(slots)-len(slots):
				j.running = true
				ready = append(ready, j)
			case j.due.After(now) && j.due.Before(next):
				// A job already due waits for a free slot, and a slot
				// that frees pokes w.wake: timing it would wake this loop
				// every millisecond while the slots are busy, rescanning
				// the queue under the mutex Recorded takes on the
				// request path.
				next = j.due
			}
		}
		w.mu.Unlock()
		for _, j := range ready {
			slots <- struct{}{}
			wg.Add(1)
			go func() { // ends when its job is done, within CallTimeout and a few StoreTimeouts
				defer wg.Done()
				defer func() { <-slots; w.poke() }()
				w.runJob(ctx, j)
			}()
		}
		if len(ready) > 0 {
			continue
		}
		timer.Reset(max(time.Until(next), time.Millisecond))
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
		case <-timer.C:
		}
	}
}

// runJob does a job's work and requeues it with backoff when it failed.
func (w *Worker) runJob(ctx context.Context, j *job) {
	w.mu.Lock()
	t, compact, title := j.turn, j.compact, j.title
	j.again = false
	w.mu.Unlock()
	// Done: no error, another holds the lease (its holder does the work),
	// or the session or conversation is gone (erased, expired): nothing to
	// retry.
	done := func(err error) bool {
		return err == nil || errors.Is(err, history.ErrCompacting) || errors.Is(err, ErrNotFound)
	}
	var errs []error
	if title {
		if _, err := w.title(ctx, t, false); !done(err) {
			errs = append(errs, err)
		} else {
			title = false
		}
	}
	if compact {
		if _, err := w.compact(ctx, t, false); !done(err) {
			errs = append(errs, err)
		} else {
			compact = false
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	j.running = false
	if len(errs) == 0 || ctx.Err() != nil {
		if !j.again || ctx.Err() != nil {
			delete(w.jobs, t.Session)
			return
		}
		j.attempts, j.due = 0, time.Now()
		return
	}
	j.attempts++
	j.compact, j.title = compact || (j.again && j.compact), title || (j.again && j.title)
	if j.attempts >= w.opt.MaxAttempts {
		w.log.Error("compaction: giving up after retries (a later turn queues the session again)", "session", t.Session, "attempts", j.attempts, "err", errors.Join(errs...))
		delete(w.jobs, t.Session)
		return
	}
	delay := w.opt.Backoff << min(j.attempts-1, 6)
	j.due = time.Now().Add(delay)
	w.log.Warn("compaction failed: the conversation is unchanged; retrying", "session", t.Session, "attempt", j.attempts, "retry_in", delay, "err", errors.Join(errs...))
}

// Result is what a compaction did.
type Result struct {
	// Compacted says a new summary was stored; Summary is the
	// conversation's latest summary either way (nil when it has none).
	Compacted bool
	Summary   *history.Message
	// Folded is how many messages the new summary folded in.
	Folded       int
	Conversation string
	// Reason says why nothing was folded, when Compacted is false.
	Reason string
}

// ErrNotFound is returned for a session or conversation that does not
// exist.
var ErrNotFound = errors.New("no such conversation")

// Compact compacts a session's conversation ("": its latest) now, even
// below its agent's trigger: every message before the newest
// keep_recent_turns user turns is folded in. auth is used when the proxy
// holds no key. ErrCompacting when another compaction of the session runs.
func (w *Worker) Compact(ctx context.Context, session, conv, auth string) (Result, error) {
	ch, _, agent, ok := history.SplitID(session)
	if !ok {
		return Result{}, fmt.Errorf("compact %s: %w", session, ErrNotFound)
	}
	return w.compact(ctx, Turn{Session: session, Channel: ch, Agent: agent, Conversation: conv, Auth: auth}, true)
}

// compact runs one compaction. Without force it folds only when the
// conversation is still over its trigger, down to the target.
func (w *Worker) compact(ctx context.Context, t Turn, force bool) (Result, error) {
	s := w.opt.Settings(t.Agent)
	sctx, cancel := context.WithTimeout(ctx, w.opt.StoreTimeout)
	token, err := w.opt.Store.TakeCompaction(sctx, t.Session, w.opt.CallTimeout+4*w.opt.StoreTimeout)
	cancel()
	if err != nil {
		if !errors.Is(err, history.ErrCompacting) {
			w.failed(t, PurposeCompaction, "", err)
		}
		return Result{}, err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.opt.StoreTimeout)
		defer cancel()
		if err := w.opt.Store.ReleaseCompaction(ctx, t.Session, token); err != nil {
			w.log.Warn("compaction: lease release failed; it expires on its own", "session", t.Session, "err", err)
		}
	}()
	sctx, cancel = context.WithTimeout(ctx, w.opt.StoreTimeout)
	in, found, err := w.opt.Store.Compaction(sctx, t.Session, t.Conversation, w.opt.ReadLimit)
	cancel()
	if err != nil {
		w.failed(t, PurposeCompaction, "", err)
		return Result{}, err
	}
	if !found {
		return Result{}, fmt.Errorf("compact %s: %w", t.Session, ErrNotFound)
	}
	res := Result{Conversation: in.Conversation, Summary: in.Summary}
	if !force && !in.Current {
		// Only the current conversation's window is read, so a summary of
		// an ended one would never be injected: the call would be billed
		// for nothing. (It would also be written after the newer
		// conversation's start, out of reach of retention's trim of this
		// one.) On demand, it is asked for.
		res.Reason = "the conversation has ended (reset, or a newer one began)"
		return res, nil
	}
	if !force && in.Unsummarized <= int64(s.TriggerMessages) {
		res.Reason = "the conversation is not over its trigger (another compaction ran)"
		return res, nil
	}
	target := s.TargetMessages
	if force {
		target = 0
	}
	n := w.fold(in.Messages, target, s.KeepRecentTurns)
	if n == 0 {
		res.Reason = fmt.Sprintf("nothing to fold: the conversation's messages after its summary are within its newest %d user turns, or follow a tool call still waiting for its results", s.KeepRecentTurns)
		return res, nil
	}
	model := s.Model
	if model == "" {
		model = t.Model
	}
	if model == "" {
		model = lastModel(in.Messages)
	}
	if model == "" {
		err := errors.New("no model to summarize with: set compaction.model")
		w.failed(t, PurposeCompaction, "", err)
		return res, err
	}
	req := upstream.ChatRequest{Model: model, MaxCompletionTokens: s.MaxSummaryTokens, Messages: []upstream.Message{
		{Role: history.RoleSystem, Content: prompt(s)},
		{Role: history.RoleUser, Content: foldText(in.Summary, in.Messages[:n])},
	}}
	text, u, err := w.call(ctx, t, PurposeCompaction, req)
	if err != nil {
		w.billed(ctx, t, PurposeCompaction, u)
		return res, err
	}
	folded := in.Messages[:n]
	sw := history.SummaryWrite{
		Conversation: in.Conversation,
		Message:      history.Message{Content: text, Model: model, User: "", Tokens: w.opt.Counter.Message(model, tokens.Message{Role: history.RoleSystem, Content: history.SummaryPrefix + text})},
		CoversFrom:   folded[0].ID, CoversTo: folded[n-1].ID, Covers: int64(n),
		Usage: u,
	}
	if in.Summary != nil {
		sw.Base, sw.CoversFrom, sw.Covers = in.Summary.ID, in.Summary.CoversFrom, in.Summary.Covers+int64(n)
	}
	sctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), w.opt.StoreTimeout)
	m, err := w.opt.Store.StoreSummary(sctx, t.Session, token, sw)
	cancel()
	if err != nil {
		w.log.Warn("compaction: summary not stored; the conversation is unchanged", "session", t.Session, "err", err)
		if errors.Is(err, history.ErrCompactionLost) {
			// Refused, so nothing was written: the call was billed all the
			// same. (Any other error leaves it unknown whether the write,
			// usage included, happened: adding it again could count it
			// twice.)
			w.billed(ctx, t, PurposeCompaction, u)
		}
		return res, err
	}
	w.log.Info("compaction: conversation summarized", "session", t.Session, "conversation", in.Conversation, "folded", n, "summary_tokens", m.Tokens)
	return Result{Compacted: true, Summary: &m, Folded: n, Conversation: in.Conversation}, nil
}

// fold is how many of msgs (oldest first, after the latest summary) to
// fold into the next summary: down to target messages left, never into
// the newest keep user turns, at most FoldTokens, and ending where a user
// turn begins and no tool call would be parted from its results (see
// parts).
func (w *Worker) fold(msgs []history.Message, target, keep int) int {
	n := len(msgs) - target
	if keep > 0 {
		seen := 0
		for i := len(msgs) - 1; i >= 0; i-- {
			if msgs[i].Role == history.RoleUser {
				if seen++; seen == keep {
					n = min(n, i)
					break
				}
			}
		}
		if seen < keep {
			return 0
		}
	}
	sum := 0
	for i := range max(n, 0) {
		if sum += msgs[i].Tokens; sum > w.opt.FoldTokens && i > 0 {
			n = i
			break
		}
	}
	n = min(max(n, 0), len(msgs))
	cut := parts(msgs)
	for n > 0 && (cut[n] || (n < len(msgs) && msgs[n].Role != history.RoleUser)) {
		n--
	}
	return n
}

// parts marks the cuts that would part a tool call from its results:
// cut[i] (msgs[:i] folded, msgs[i:] kept) is true when a call in msgs[:i]
// has results in msgs[i:], or has none yet and may still get them. Results
// come right after their call in a turn of their own, but in a shared
// conversation others may speak first (and an app may answer late): the
// request that brings them needs the call in the window, not in the
// summary, or the upstream refuses tool results that follow no call.
//
// A result answers the newest earlier call naming its id, its user's
// first (servers reuse ids: call_0 in every reply), as the proxy pairs
// them. A call without results waits for them until its user speaks
// again: then its app moved on without them, and the proxy injects no
// such call anyway.
func parts(msgs []history.Message) []bool {
	cut := make([]bool, len(msgs)+1)
	type call struct {
		at   int
		ids  []string
		user string
		end  int // the index of its last result; 0: none
	}
	var calls []*call
	for i, m := range msgs {
		switch {
		case m.Role == history.RoleAssistant && history.HasToolCalls(m.ToolCalls):
			calls = append(calls, &call{at: i, ids: history.ToolCallIDs(m.ToolCalls), user: m.User})
		case m.Role == history.RoleTool:
			var c *call
			for k := len(calls) - 1; k >= 0; k-- {
				if slices.Contains(calls[k].ids, m.ToolCallID) {
					if calls[k].user == m.User {
						c = calls[k]
						break
					}
					if c == nil {
						c = calls[k]
					}
				}
			}
			if c != nil {
				c.end = i
			}
		}
	}
	for _, c := range calls {
		end := c.end
		if end == 0 {
			end = len(msgs)
			for _, m := range msgs[c.at+1:] {
				if m.Role == history.RoleUser && m.User == c.user {
					end = 0 // abandoned
					break
				}
			}
		}
		for i := c.at + 1; i <= end; i++ {
			cut[i] = true
		}
	}
	return cut
}

// lastModel is the model of the newest message that names one.
func lastModel(msgs []history.Message) string {
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].Model != "" {
			return msgs[i].Model
		}
	}
	return ""
}

func prompt(s Settings) string {
	if s.Prompt != "" {
		return s.Prompt
	}
	return fmt.Sprintf(DefaultPrompt, max(s.MaxSummaryTokens*3/4, 20))
}

// maxFoldMessage bounds the text of one message in a summarization call.
const maxFoldMessage = 16 << 10

// foldText is the summarizer's input: the previous summary and the
// messages to fold in, as a plain transcript.
func foldText(prev *history.Message, msgs []history.Message) string {
	var b strings.Builder
	if prev != nil {
		b.WriteString("Previous summary:\n<summary>\n")
		b.WriteString(prev.Content)
		b.WriteString("\n</summary>\n\n")
	} else {
		b.WriteString("Previous summary: none.\n\n")
	}
	b.WriteString("Messages to fold into it, oldest first:\n<messages>\n")
	for _, m := range msgs {
		b.WriteString(transcriptLine(m))
		b.WriteByte('\n')
	}
	b.WriteString("</messages>")
	return b.String()
}

// transcriptLine writes one message for a summarizer or titler to read.
func transcriptLine(m history.Message) string {
	who := m.Role
	switch {
	case m.Role == history.RoleUser && m.User != "" && m.User != "*":
		who = "user " + m.User
	case m.Role == history.RoleTool:
		who = "tool result for " + m.ToolCallID
	}
	text := m.Content
	if text == "" && m.Parts != nil {
		text = history.DeriveTitle(history.Message{Parts: m.Parts}) // the parts' text, shortened
		if text == "" {
			text = "(non-text content)"
		}
	}
	if m.Refusal != "" {
		text += " (refused: " + m.Refusal + ")"
	}
	if history.HasToolCalls(m.ToolCalls) {
		text += " (calls tools: " + string(m.ToolCalls) + ")"
	}
	if len(text) > maxFoldMessage {
		text = strings.ToValidUTF8(text[:maxFoldMessage], "") + " …"
	}
	return "[" + who + "]: " + text
}

// call makes one background call, counts it, and returns its text and
// usage; an empty answer is a failure, and its usage is returned with
// the error, since the upstream billed it. u is zero when nothing was
// billed.
func (w *Worker) call(ctx context.Context, t Turn, purpose string, req upstream.ChatRequest) (string, history.Usage, error) {
	cctx, cancel := context.WithTimeout(ctx, w.opt.CallTimeout)
	resp, err := w.opt.Upstream.Chat(cctx, t.Auth, req)
	cancel()
	if err != nil {
		w.failed(t, purpose, req.Model, err)
		return "", history.Usage{}, err
	}
	u := resp.Usage
	if u.Estimated {
		msgs := make([]tokens.Message, len(req.Messages))
		for i, m := range req.Messages {
			msgs[i] = tokens.Message{Role: m.Role, Content: m.Content}
		}
		u.Prompt = int64(w.opt.Counter.Messages(req.Model, msgs))
		u.Completion = int64(w.opt.Counter.Completion(req.Model, tokens.Message{Role: history.RoleAssistant, Content: resp.Content}))
	}
	cost, priced := w.opt.Catalog.Cost(req.Model, u)
	text := strings.TrimSpace(resp.Content)
	hu := history.Usage{PromptTokens: u.Prompt, CompletionTokens: u.Completion, CachedTokens: u.Cached, CostNanos: cost}
	b := metrics.Background{Purpose: purpose, Channel: t.Channel, Agent: t.Agent, Model: req.Model, Session: t.Session,
		PromptTokens: u.Prompt, CompletionTokens: u.Completion, CachedTokens: u.Cached, ReasoningTokens: u.Reasoning,
		Estimated: u.Estimated, CostNanos: cost, Priced: priced, Result: metrics.ResultOK}
	if text == "" {
		// Billed all the same.
		b.Result = metrics.ResultError
		w.opt.Metrics.ObserveBackground(b)
		err := fmt.Errorf("%s: the upstream answered nothing (finish_reason %q; a reasoning model may spend max_summary_tokens on reasoning)", purpose, resp.FinishReason)
		w.log.Warn("background call failed", "purpose", purpose, "session", t.Session, "err", err)
		return "", hu, err
	}
	w.opt.Metrics.ObserveBackground(b)
	return text, hu, nil
}

// billed adds the usage of a billed call whose result is not stored to
// the session's totals, which count every call made for it (the metrics
// counted it already). A session erased meanwhile is not brought back: the
// stores add usage to existing sessions only.
func (w *Worker) billed(ctx context.Context, t Turn, purpose string, u history.Usage) {
	if u == (history.Usage{}) {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.opt.StoreTimeout)
	defer cancel()
	if err := w.opt.Store.AddUsage(ctx, t.Session, u); err != nil {
		w.log.Warn("background call: its usage was not added to the session's totals (the metrics have it)",
			"purpose", purpose, "session", t.Session, "prompt_tokens", u.PromptTokens, "completion_tokens", u.CompletionTokens,
			"cost_nanos", u.CostNanos, "err", err)
	}
}

// failed counts and logs a background call that failed before it was
// billed.
func (w *Worker) failed(t Turn, purpose, model string, err error) {
	w.opt.Metrics.ObserveBackground(metrics.Background{Purpose: purpose, Channel: t.Channel, Agent: t.Agent, Model: model, Result: metrics.ResultError})
	w.log.Warn("background call failed", "purpose", purpose, "session", t.Session, "err", err)
}

// titleMessages is how many first messages a title is made from.
const titleMessages = 6

// GenerateTitle asks the upstream for a title of a session's conversation
// ("": its latest), from its first turns, and stores it as a title set by
// hand. It returns the conversation and the title.
func (w *Worker) GenerateTitle(ctx context.Context, session, conv, auth string) (string, string, error) {
	ch, _, agent, ok := history.SplitID(session)
	if !ok {
		return "", "", fmt.Errorf("title %s: %w", session, ErrNotFound)
	}
	t := Turn{Session: session, Channel: ch, Agent: agent, Conversation: conv, Auth: auth}
	r, err := w.title(ctx, t, true)
	return r.conv, r.title, err
}

type titled struct{ conv, title string }

// title generates and stores a title; without force it leaves a title
// already set alone.
func (w *Worker) title(ctx context.Context, t Turn, force bool) (titled, error) {
	sctx, cancel := context.WithTimeout(ctx, w.opt.StoreTimeout)
	conv, msgs, err := w.opt.Store.ReadMessages(sctx, t.Session, history.MessageQuery{Conversation: t.Conversation, Limit: titleMessages})
	var in history.CompactionInput
	if err == nil && conv != "" {
		in, _, err = w.opt.Store.Compaction(sctx, t.Session, conv, 1)
	}
	cancel()
	if err != nil {
		w.failed(t, PurposeTitle, "", err)
		return titled{}, err
	}
	if conv == "" || len(msgs) == 0 {
		return titled{}, fmt.Errorf("title %s: %w", t.Session, ErrNotFound)
	}
	if in.TitleSet && !force {
		return titled{conv: conv}, nil
	}
	s := w.opt.Settings(t.Agent)
	model := s.Model
	if model == "" {
		model = t.Model
	}
	if model == "" {
		model = lastModel(msgs)
	}
	var b strings.Builder
	for _, m := range msgs {
		if m.Kind == history.KindSummary {
			continue
		}
		line := transcriptLine(m)
		if len(line) > 2000 {
			line = strings.ToValidUTF8(line[:2000], "") + " …"
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	req := upstream.ChatRequest{Model: model, MaxCompletionTokens: 64, Messages: []upstream.Message{
		{Role: history.RoleSystem, Content: TitlePrompt},
		{Role: history.RoleUser, Content: strings.TrimSpace(b.String())},
	}}
	text, u, err := w.call(ctx, t, PurposeTitle, req)
	if err != nil {
		w.billed(ctx, t, PurposeTitle, u)
		return titled{conv: conv}, err
	}
	title := cleanTitle(text)
	if title == "" {
		w.billed(ctx, t, PurposeTitle, u)
		return titled{conv: conv}, fmt.Errorf("title %s: the upstream's answer %q holds no title", t.Session, text)
	}
	// The title and its usage are one write: a title set by hand during
	// the call is kept (unless forced), the usage counted either way.
	sctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), w.opt.StoreTimeout)
	defer cancel()
	got, stored, err := w.opt.Store.StoreTitle(sctx, t.Session, conv, title, !force, u)
	if err != nil {
		w.log.Warn("title: not stored; its usage may be missing from the session's totals (the metrics have it)", "session", t.Session, "err", err)
		return titled{conv: conv}, err
	}
	if got == "" {
		return titled{}, fmt.Errorf("title %s: conversation %s is gone: %w", t.Session, conv, ErrNotFound)
	}
	if !stored {
		return titled{conv: conv}, nil // a title was set meanwhile
	}
	return titled{conv: conv, title: title}, nil
}

// maxTitle is the longest title kept, in characters (a title set by hand
// may have 200).
const maxTitle = 80

// cleanTitle keeps an answer's first line, without quotes, markup, a final
// period or control characters, cut to maxTitle characters.
func cleanTitle(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	s = strings.TrimSpace(strings.TrimLeft(s, "#*- "))
	s = strings.TrimPrefix(s, "Title:")
	s = strings.Trim(strings.TrimSpace(s), "\"'`*“”«»")
	s = strings.TrimRight(s, ". ")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, s)
	if utf8.RuneCountInString(s) > maxTitle {
		s = string([]rune(s)[:maxTitle-1]) + "…"
	}
	return strings.TrimSpace(s)
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/historyproxy/historyproxy/admin"
	"github.com/historyproxy/historyproxy/config"
	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/metrics"
)

// The commands below read the store directly, configured by the same
// flags, environment and file as the proxy, so they work while it runs or
// without it. They need Redis: the in-memory store lives inside the proxy.

// openStore opens the Redis store cfg names and checks that it answers.
func openStore(ctx context.Context, cfg config.Config) (*history.RedisStore, func(), error) {
	if !cfg.Redis.Enabled() {
		return nil, nil, errors.New("no Redis configured (-redis-url, HISTORYPROXY_REDIS_URL or redis.url): " +
			"conversations kept in memory live inside the running proxy; ask its conversations API instead (GET /admin/v1/sessions)")
	}
	client, err := newRedisClient(cfg.Redis)
	if err != nil {
		return nil, nil, err
	}
	s := history.NewRedis(client, cfg.Redis.Prefix)
	pctx, cancel := context.WithTimeout(ctx, cfg.Store.Timeout)
	defer cancel()
	if err := s.Ping(pctx); err != nil {
		_ = client.Close()
		return nil, nil, fmt.Errorf("store %s: %w", storeName(cfg.Redis), err)
	}
	return s, func() { _ = client.Close() }, nil
}

// policy gives an agent's conversation lifetime from the configuration.
func policy(cfg config.Config) func(string) history.Policy {
	return func(name string) history.Policy { return agent(cfg.Agent(name)).Policy }
}

// sessionsCommand is historyproxy sessions: a table of sessions.
func sessionsCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	var (
		f      admin.Filter
		active string
		limit  int
		asJSON bool
	)
	c := config.Command{
		Name: "sessions", Summary: "Lists sessions, most recently active first, as a table (or JSON, as GET /admin/v1/sessions answers).",
		Flags: func(fs *flag.FlagSet) {
			fs.StringVar(&f.Channel, "channel", "", "only sessions of this channel")
			fs.StringVar(&f.Agent, "agent", "", "only sessions of this agent")
			fs.StringVar(&f.User, "user", "", "only sessions of this user (* for shared agents)")
			fs.StringVar(&f.Q, "q", "", "only sessions whose title or id holds this text, in any case")
			fs.StringVar(&active, "active", "", "true: only sessions whose conversation goes on; false: only the others")
			fs.StringVar(&f.Label, "label", "", "only the session of this metric label")
			fs.IntVar(&limit, "limit", 50, "most sessions shown; 0 shows all")
			fs.BoolVar(&asJSON, "json", false, "print JSON instead of a table")
		},
	}
	cfg, _, err := config.LoadCommand(c, args, getenv, stdout)
	if err != nil {
		return err
	}
	switch active {
	case "":
	case "true", "false":
		a := active == "true"
		f.Active = &a
	default:
		return fmt.Errorf("-active must be true or false, got %q", active)
	}
	if limit < 0 {
		return fmt.Errorf("-limit must be 0 or more, got %d", limit)
	}
	if werr := f.Check(); werr != nil {
		return errors.New(werr.Message)
	}
	label, err := metrics.NewSessionLabel(cfg.Metrics.SessionLabel, []byte(cfg.Metrics.SessionLabelKey))
	if err != nil {
		return fmt.Errorf("metrics.session_label: %w", err)
	}
	now := time.Now()
	q, werr := f.Query(policy(cfg), label.Label, now.UnixMilli())
	if werr != nil {
		return errors.New(werr.Message)
	}
	store, closeStore, err := openStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStore()

	out := admin.SessionList{Items: []admin.Session{}}
	for {
		q.Limit = 500
		if limit > 0 {
			q.Limit = min(500, limit-len(out.Items))
		}
		page, err := store.Sessions(ctx, q)
		if err != nil {
			return err
		}
		out.Total = page.Total
		for _, s := range page.Sessions {
			_, _, agentName, _ := history.SplitID(s.ID)
			out.Items = append(out.Items, admin.SessionView(s, admin.Active(s, policy(cfg)(agentName), now.UnixMilli())))
		}
		if page.NextCursor == "" || (limit > 0 && len(out.Items) >= limit) {
			if page.NextCursor != "" {
				out.NextCursor = &page.NextCursor
			}
			break
		}
		q.Cursor = page.NextCursor
	}
	if asJSON {
		return writeIndented(stdout, out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SESSION\tTITLE\tCONVERSATION\tMESSAGES\tTOKENS\tCOST USD\tLAST ACTIVE\tACTIVE")
	for _, s := range out.Items {
		active := "no"
		if s.IsActive {
			active = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", visible(s.ID), cut(visible(deref(s.Title, "-")), 40), deref(s.Conversation, "-"),
			s.MessageCount, s.Tokens.Prompt+s.Tokens.Completion, usd(s.CostUSD), shortTime(s.LastActiveAt), active)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%d of %d sessions\n", len(out.Items), out.Total)
	return err
}

// Transcript is what historyproxy transcript --json prints.
type Transcript struct {
	Session      admin.Session      `json:"session"`
	Conversation admin.Conversation `json:"conversation"`
	Messages     []admin.Entry      `json:"messages"`
}

// transcriptCommand is historyproxy transcript: one conversation as a
// readable transcript.
func transcriptCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	var (
		conv   string
		asJSON bool
	)
	c := config.Command{
		Name: "transcript", Args: "SESSION_ID",
		Summary: "Prints a conversation as a readable transcript: roles, tool calls and results, token counts, cost and status (or JSON, as the timeline route answers).",
		Flags: func(fs *flag.FlagSet) {
			fs.StringVar(&conv, "conversation", "", "the conversation to print (c1, c2, ...); default the latest")
			fs.BoolVar(&asJSON, "json", false, "print JSON instead of text")
		},
	}
	cfg, pos, err := config.LoadCommand(c, args, getenv, stdout)
	if err != nil {
		return err
	}
	id, err := oneSession(pos, "transcript")
	if err != nil {
		return err
	}
	store, closeStore, err := openStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStore()
	snap, err := readTranscript(ctx, store, id, conv)
	if errors.Is(err, errNoSession) {
		return fmt.Errorf("no session %q in %s", id, storeName(cfg.Redis))
	}
	if err != nil {
		return err
	}
	s, meta := snap.session, snap.conversation
	_, _, agentName, _ := history.SplitID(id)
	active := admin.Active(s, policy(cfg)(agentName), time.Now().UnixMilli())
	t := Transcript{
		Session:      admin.SessionView(s, active),
		Conversation: admin.ConversationView(meta, active && meta.ID == s.ConversationID),
		Messages:     []admin.Entry{},
	}
	for _, m := range snap.messages {
		t.Messages = append(t.Messages, admin.EntryView(m))
	}
	if asJSON {
		return writeIndented(stdout, t)
	}
	return writeTranscript(stdout, t, snap.conversations)
}

// transcriptStore is what a transcript reads.
type transcriptStore interface {
	Session(ctx context.Context, session string) (history.Session, bool, error)
	Conversations(ctx context.Context, session string) ([]history.Conversation, error)
	ReadMessages(ctx context.Context, session string, q history.MessageQuery) (string, []history.Message, error)
}

// transcriptSnapshot is a session, one of its conversations and that
// conversation's messages, as they were at one moment.
type transcriptSnapshot struct {
	session       history.Session
	conversation  history.Conversation
	conversations int // the session's number of conversations
	messages      []history.Message
}

var errNoSession = errors.New("no such session")

// transcriptReads bounds the reads of a session written to without pause.
const transcriptReads = 5

// readTranscript reads session id's conversation conv (its latest when
// conv is ""). The session, its conversations and the messages are
// separate reads: a turn appended between them (the proxy is running)
// would show its messages under totals that do not count it yet. So the
// session is read again after the messages, and all of it once more when
// it changed; every append changes it (its message count and totals), and
// they only grow, so an unchanged session means no turn came in between.
// A session written to faster than it can be read is printed as last read,
// its header a turn or so apart from its messages.
func readTranscript(ctx context.Context, store transcriptStore, id, conv string) (transcriptSnapshot, error) {
	s, ok, err := store.Session(ctx, id)
	if err != nil {
		return transcriptSnapshot{}, err
	}
	if !ok {
		return transcriptSnapshot{}, errNoSession
	}
	for i := 1; ; i++ {
		convs, err := store.Conversations(ctx, id)
		if err != nil {
			return transcriptSnapshot{}, err
		}
		want := conv
		if want == "" {
			want = s.ConversationID
		}
		snap := transcriptSnapshot{session: s, conversations: len(convs)}
		found := false
		for _, c := range convs {
			if c.ID == want {
				snap.conversation, found = c, true
			}
		}
		if !found {
			return transcriptSnapshot{}, fmt.Errorf("session %q has no conversation %q", id, want)
		}
		_, snap.messages, err = store.ReadMessages(ctx, id, history.MessageQuery{Conversation: want})
		if err != nil {
			return transcriptSnapshot{}, err
		}
		again, ok, err := store.Session(ctx, id)
		if err != nil {
			return transcriptSnapshot{}, err
		}
		if !ok {
			return transcriptSnapshot{}, errNoSession // erased meanwhile
		}
		if again == s || i == transcriptReads {
			return snap, nil
		}
		s = again
	}
}

// writeTranscript prints t as text.
func writeTranscript(w io.Writer, t Transcript, conversations int) error {
	s, c := t.Session, t.Conversation
	var b strings.Builder
	fmt.Fprintf(&b, "Session       %s\n", s.ID)
	fmt.Fprintf(&b, "Conversation  %s (%d of %d), %s", c.ID, convNumber(c.ID), conversations, c.Status)
	if c.Expired {
		b.WriteString(", expired")
	}
	if c.Title != nil {
		fmt.Fprintf(&b, ": %q", *c.Title)
	}
	b.WriteString("\n")
	tokens := 0
	for _, m := range t.Messages {
		tokens += m.Tokens
	}
	fmt.Fprintf(&b, "Messages      %d, %d tokens stored, %s to %s\n", len(t.Messages), tokens, shortTime(c.CreatedAt), shortTime(c.LastMessageAt))
	fmt.Fprintf(&b, "Session cost  %s USD for %d requests (%d prompt, %d completion, %d cached, %d of history tokens), all conversations\n",
		usd(s.CostUSD), s.Requests, s.Tokens.Prompt, s.Tokens.Completion, s.Tokens.Cached, s.Tokens.History)
	for _, m := range t.Messages {
		b.WriteString("\n")
		var head strings.Builder
		fmt.Fprintf(&head, "[%s] %s", shortTime(m.CreatedAt), speaker(m))
		if m.Model != nil && (m.Role == history.RoleAssistant || m.Kind == history.KindSummary) {
			fmt.Fprintf(&head, " (%s)", *m.Model)
		}
		fmt.Fprintf(&head, ", %d tokens", m.Tokens)
		if m.Status != "" && m.Status != history.StatusComplete {
			fmt.Fprintf(&head, ", %s", strings.ToUpper(m.Status))
		}
		b.WriteString(visible(head.String()))
		b.WriteString("\n")
		for _, line := range body(m) {
			fmt.Fprintf(&b, "    %s\n", visible(strings.TrimSuffix(line, "\r")))
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// speaker names who wrote a message.
func speaker(m admin.Entry) string {
	switch {
	case m.Kind == history.KindSummary && m.Covers != nil:
		// What the model is given in place of the messages it covers,
		// which stay stored (above).
		return fmt.Sprintf("summary of %d messages (%s to %s)", m.Covers.Messages, m.Covers.From, m.Covers.To)
	case m.Kind == history.KindSummary:
		return "summary of earlier turns"
	case m.Role == history.RoleTool:
		return "tool result for " + m.ToolCallID
	case m.Role == history.RoleUser && m.User != nil:
		return "user " + *m.User
	}
	return m.Role
}

// body is a message's lines: its text (content parts shown by type), its
// tool calls, its refusal.
func body(m admin.Entry) []string {
	var lines []string
	if m.Content != nil && *m.Content != "" {
		lines = append(lines, strings.Split(*m.Content, "\n")...)
	}
	if len(m.ContentParts) > 0 {
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if json.Unmarshal(m.ContentParts, &parts) == nil {
			for _, p := range parts {
				if p.Type == "text" {
					lines = append(lines, strings.Split(p.Text, "\n")...)
				} else {
					lines = append(lines, "["+p.Type+"]")
				}
			}
		}
	}
	if len(m.ToolCalls) > 0 {
		var calls []struct {
			ID       string `json:"id"`
			Function struct {
				Name      string `json:"name"`
				Arguments string `json:"arguments"`
			} `json:"function"`
		}
		if json.Unmarshal(m.ToolCalls, &calls) == nil {
			for _, c := range calls {
				lines = append(lines, fmt.Sprintf("calls %s(%s) as %s", c.Function.Name, c.Function.Arguments, c.ID))
			}
		}
	}
	if m.Refusal != "" {
		lines = append(lines, "refuses: "+m.Refusal)
	}
	return lines
}

// eraseCommand is historyproxy erase: everything one session has.
func eraseCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	c := config.Command{
		Name: "erase", Args: "SESSION_ID",
		Summary: "Erases everything a session has in the store: its messages, conversations, totals, idempotency keys and index entries.",
	}
	cfg, pos, err := config.LoadCommand(c, args, getenv, stdout)
	if err != nil {
		return err
	}
	id, err := oneSession(pos, "erase")
	if err != nil {
		return err
	}
	store, closeStore, err := openStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStore()
	e, err := store.Erase(ctx, id)
	if err != nil {
		return err
	}
	if !e.Found {
		return fmt.Errorf("no session %q in %s", id, storeName(cfg.Redis))
	}
	_, err = fmt.Fprintf(stdout, "erased %s: %s, %s\n"+
		"A running proxy keeps this session's metric series until it evicts them or restarts; DELETE /admin/v1/sessions/{id} drops them too.\n",
		id, plural(e.Conversations, "conversation"), plural(e.Messages, "message"))
	return err
}

// migrateCommand is historyproxy migrate: sessions of the layout before one
// stream per session move to the current one.
func migrateCommand(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	c := config.Command{
		Name: "migrate",
		Summary: "Moves the sessions an older version stored (one stream per conversation) into the current layout (one stream per session), " +
			"keeping their messages and ids, and adds every session to the channel, user and agent indexes. Safe to run while the proxy serves, and again.",
	}
	cfg, _, err := config.LoadCommand(c, args, getenv, stdout)
	if err != nil {
		return err
	}
	store, closeStore, err := openStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStore()
	res, err := store.Migrate(ctx, nil)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "migrated %s (%s, %s); %s already in the current layout\n",
		plural(int64(res.Sessions), "session"), plural(int64(res.Conversations), "conversation"), plural(int64(res.Messages), "message"),
		plural(int64(res.Current), "session"))
	return err
}

// oneSession checks that a command was given exactly one session id.
func oneSession(pos []string, name string) (string, error) {
	if len(pos) != 1 {
		return "", fmt.Errorf("%s takes one session id (channel:user:agent), got %d arguments (historyproxy %s -h)", name, len(pos), name)
	}
	if _, _, _, err := history.ParseID(pos[0]); err != nil {
		return "", err
	}
	return pos[0], nil
}

func writeIndented(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

func deref(s *string, none string) string {
	if s == nil {
		return none
	}
	return *s
}

// visible shows the characters of s that a terminal would obey rather
// than print (controls, escape sequences among them, and bidirectional
// overrides) as Go escapes: what users and models wrote must not retitle,
// clear or rewrite the operator's terminal.
func visible(s string) string {
	if strings.IndexFunc(s, hidden) < 0 {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if hidden(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		} else {
			b.WriteRune(r)
		}
	}
	return b.String()
}

func hidden(r rune) bool { return unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) }

// cut shortens s to n characters, with an ellipsis.
func cut(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	return string([]rune(s)[:n-1]) + "…"
}

// shortTime shows an API time to the second.
func shortTime(s *string) string {
	if s == nil {
		return "-"
	}
	t, err := time.Parse(time.RFC3339Nano, *s)
	if err != nil {
		return *s
	}
	return t.UTC().Format("2006-01-02 15:04:05Z")
}

func usd(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

func plural(n int64, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return strconv.FormatInt(n, 10) + " " + word + "s"
}

func convNumber(id string) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(id, "c"))
	return n
}

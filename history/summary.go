package history

import (
	"errors"
	"time"
)

// Compaction: a long conversation's older messages are folded into a
// summary, a stream entry of KindSummary that records the range it covers
// (CoversFrom to CoversTo). The originals stay; a window read starts after
// the latest summary's range and returns the summary beside it
// (Window.Summary). One compaction per session runs at a time, across
// processes, under a lease with an expiry (TakeCompaction).

// SummaryPrefix opens the system message a summary is injected as, so the
// model reads it as what it is, not as an instruction of the app.
const SummaryPrefix = "Summary of the earlier part of this conversation (older messages were condensed into it; the messages after it follow in full):\n\n"

// SummaryMessage is the message a summary is injected as: a system
// message, clearly marked. Its Tokens are the stored summary's, which
// were counted on this form.
func SummaryMessage(s Message) Message {
	return Message{Role: RoleSystem, Content: SummaryPrefix + s.Content, Tokens: s.Tokens, Kind: KindSummary}
}

// ErrCompacting is returned by TakeCompaction while another compaction of
// the session holds its lease.
var ErrCompacting = errors.New("a compaction of this session is running")

// ErrCompactionLost is returned by StoreSummary when the summary cannot be
// stored as it was built: the lease expired (another compaction may have
// taken over), the conversation got another summary meanwhile, or the
// messages it covers are gone. Nothing is written.
var ErrCompactionLost = errors.New("compaction superseded")

// DefaultCompactionTTL is how long a compaction lease lasts when
// TakeCompaction is given 0.
const DefaultCompactionTTL = 5 * time.Minute

// CompactionInput is what a compaction of one conversation starts from,
// read in one store operation.
type CompactionInput struct {
	Conversation string
	// Current says it is the session's active conversation.
	Current bool
	// Summary is its latest summary; nil when it has none.
	Summary *Message
	// Messages are the messages after the summary's range, oldest first,
	// summaries left out, at most the limit asked for.
	Messages []Message
	// Unsummarized counts every message after the summary's range (it may
	// be more than Messages holds).
	Unsummarized int64
	// TitleSet says a title was set for it (by hand, or generated).
	TitleSet bool
}

// SummaryWrite is one summary to store.
type SummaryWrite struct {
	Conversation string
	// Base is the id of the summary this one replaces, "" for the
	// conversation's first: the write is refused (ErrCompactionLost) when
	// the conversation's latest summary is another by then.
	Base string
	// Message holds the summary's Content, Tokens (counted on its injected
	// form, SummaryMessage), Model and CreatedMs; the store sets its role,
	// kind and range from the fields below.
	Message Message
	// CoversFrom and CoversTo are the first and last ids of the
	// conversation's messages it covers; Covers counts those messages.
	CoversFrom, CoversTo string
	Covers               int64
	// Usage is what the summarization call cost: added to the session's
	// totals in the same write.
	Usage Usage
}

// summaryMessage is the stored form of w's summary.
func (w SummaryWrite) summaryMessage(nowMs int64) Message {
	m := w.Message
	m.ID, m.Conversation = "", ""
	m.Role, m.Kind = RoleSystem, KindSummary
	m.Parts, m.ToolCalls, m.ToolCallID, m.Name, m.Refusal, m.ContentNull = nil, nil, "", "", "", false
	m.CoversFrom, m.CoversTo, m.Covers = w.CoversFrom, w.CoversTo, w.Covers
	if m.CreatedMs == 0 {
		m.CreatedMs = nowMs
	}
	if m.Status == "" {
		m.Status = StatusComplete
	}
	return m
}

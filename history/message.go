// Package history stores conversations: the messages of each session's
// conversations, the session's metadata and usage totals, and chooses the
// part of a conversation that fits a token budget.
//
// It knows nothing of HTTP. Two stores implement the same behaviour: Redis
// (production) and memory (development, tests, the default without Redis).
package history

import (
	"encoding/json"
	"time"
)

// Roles of stored messages.
const (
	RoleSystem    = "system"
	RoleUser      = "user"
	RoleAssistant = "assistant"
	RoleTool      = "tool"
)

// Kinds of stored messages.
const (
	KindMessage    = "message"     // plain user or assistant text
	KindToolCall   = "tool_call"   // assistant message that carries tool_calls
	KindToolResult = "tool_result" // role tool, answers a tool call
	KindSummary    = "summary"     // compaction of older turns: see Summary
)

// Statuses of stored messages.
const (
	StatusComplete   = "complete"
	StatusIncomplete = "incomplete" // the stream ended before [DONE]
)

// IdempotencyWindow is how long a turn's idempotency key is remembered.
const IdempotencyWindow = 24 * time.Hour

// Message is one stored chat message.
type Message struct {
	// ID is assigned by the store (the Redis stream entry id, or an
	// equivalent "ms-seq" id in memory); empty before Append. Ids grow
	// across all of a session's conversations, so one id orders and
	// resumes a reader of the whole session.
	ID string
	// Conversation is the id of the conversation the message belongs to,
	// set by the store when it reads a message; Append ignores it.
	Conversation string
	Role         string
	// Content is the text content. When the message was sent with an array
	// of content parts, Parts holds that array exactly as sent and Content
	// is empty.
	Content string
	Parts   json.RawMessage
	// ContentNull records that the message was sent with "content": null
	// (an assistant message that only calls tools).
	ContentNull bool
	Name        string
	// ToolCalls is the JSON array of tool calls as sent or assembled; nil
	// when there are none. Parts and ToolCalls of length zero are stored
	// and read back as nil. An empty array ([]) is kept as sent but calls
	// nothing: see HasToolCalls.
	ToolCalls  json.RawMessage
	ToolCallID string
	Refusal    string
	Kind       string
	User       string
	Model      string
	// Tokens is the message's token count (per-message overhead included),
	// computed once when it is written.
	Tokens    int
	CreatedMs int64
	RequestID string
	Status    string
	// Usage, when not nil, is the usage of the request whose turn this
	// message ends (the turn's last message; set by Append from
	// Turn.Usage when it counts a request), so a transcript shows what each
	// turn cost.
	Usage *Usage
	// IdempotencyKey is the key of the turn that wrote the message, set by
	// the store from Turn.IdempotencyKey. A request that repeats a key
	// finds where its first attempt was recorded, so it can be given the
	// context that attempt had.
	IdempotencyKey string
	// CoversFrom and CoversTo, on a message of KindSummary, are the ids of
	// the first and last stream entries of its conversation that it
	// summarizes (every message between them, inclusive, summaries
	// aside); Covers is how many messages that is.
	CoversFrom, CoversTo string
	Covers               int64
}

// Usage is what one request adds to a session's all-time totals.
type Usage struct {
	PromptTokens     int64
	CompletionTokens int64
	CachedTokens     int64
	HistoryTokens    int64 // tokens of injected history
	Requests         int64
	// CostNanos is the cost in nano-USD (10^-9 USD): fine enough that a
	// request's cost is a whole number, so totals never round.
	CostNanos int64
}

// Add returns u plus o.
func (u Usage) Add(o Usage) Usage {
	return Usage{
		PromptTokens:     u.PromptTokens + o.PromptTokens,
		CompletionTokens: u.CompletionTokens + o.CompletionTokens,
		CachedTokens:     u.CachedTokens + o.CachedTokens,
		HistoryTokens:    u.HistoryTokens + o.HistoryTokens,
		Requests:         u.Requests + o.Requests,
		CostNanos:        u.CostNanos + o.CostNanos,
	}
}

// Policy is the per-agent lifetime of conversations.
type Policy struct {
	// IdleTimeout: when more than this has passed since the session's last
	// activity, the next turn starts a new conversation and the old one is
	// kept for audit. Zero means conversations never go idle.
	IdleTimeout time.Duration
	// Retention: an idle conversation's messages expire after this long.
	// Zero keeps them forever.
	Retention time.Duration
}

// Turn is what one request appends: its new messages and the reply, plus
// the usage it adds to the session's totals. All of it is written
// atomically, or none of it.
type Turn struct {
	Messages []Message
	// IdempotencyKey, when not empty, makes the append write no message if
	// the same key was appended to this session within IdempotencyWindow
	// (whether its usage counts is WriteKey's to say).
	IdempotencyKey string
	// WriteKey, when not empty, names this one write, the same in every
	// retry of it. With it, a turn whose IdempotencyKey was recorded by
	// another write (a client that repeated its request, and so called
	// the upstream again) still adds its usage to the session's totals,
	// while a retry of the same write (its answer was lost) adds nothing.
	// Without it, a duplicate adds nothing at all. A key recorded within
	// IdempotencyWindow is remembered; WriteKey is needed only when
	// IdempotencyKey comes from a client, since a key the writer made up
	// for one request already names one write.
	WriteKey string
	Usage    Usage
	// NowMs is the time of the write in Unix milliseconds: the session's
	// last activity from then on, and the created time of messages that
	// have none.
	NowMs int64
	// ArrivedMs is when the request arrived, in Unix milliseconds. It
	// decides idleness, as the window read at that moment did: a reply
	// that ends after the idle timeout still belongs to the conversation
	// its request found. Zero means NowMs.
	ArrivedMs int64
	// ConversationID names the conversation the turn's context was read
	// from. The turn is written to it, whatever the idle timeout says,
	// while it still exists (retention has not removed it); when it is no
	// longer the session's active conversation (a reset, or a newer one
	// started meanwhile) the turn is added to it without making it active
	// again. Empty, or a conversation that is gone: the turn goes to the
	// active conversation unless that one was idle at ArrivedMs, in which
	// case it starts a new one.
	ConversationID string
	// Lease, when not nil, is the session's turn lease the request holds
	// (TakeTurn): the append releases it in the same write, so the next
	// waiting request reads a history that has this turn. It is released
	// whether the turn is written or found a duplicate.
	Lease *Lease
	// NewConversation starts a new conversation with the turn's messages,
	// ending the current one (kept for audit), whatever the idle timeout
	// says: a client's "new chat". A duplicate turn starts nothing, so a
	// retried request does not end the conversation its first attempt
	// began; a turn without messages starts nothing either.
	NewConversation bool
}

// AppendResult says what Append did.
type AppendResult struct {
	ConversationID  string
	IDs             []string // ids of the appended messages, in order
	Duplicate       bool     // the idempotency key was seen: nothing written
	NewConversation bool     // this turn started a conversation
	// Unsummarized is how many messages of the turn's conversation its
	// latest summary does not cover, this turn's included (all of them
	// when it has no summary); 0 for a duplicate. Compaction is queued
	// on it.
	Unsummarized int64
}

// Window is the newest part of a session's active conversation.
type Window struct {
	ConversationID string // empty when there is no active conversation
	// Messages are the newest messages of the conversation after the
	// range its latest summary covers; summaries are never among them.
	Messages []Message
	// Summary is the conversation's latest summary (KindSummary), nil
	// when it has none.
	Summary *Message
	// Waited is how long TakeTurn waited for the session's turn: 0 when
	// the session was free.
	Waited time.Duration
}

// Session is a session's metadata.
type Session struct {
	ID string
	// ConversationID is the session's latest conversation; Active says
	// whether it is still going (not reset). Idleness depends on a Policy
	// and is not applied here.
	ConversationID string
	// Title is the latest conversation's title: the one set, else the one
	// derived from its first user message; empty when it has neither.
	Title        string
	CreatedMs    int64
	LastActiveMs int64
	Active       bool
	MessageCount int64 // messages ever written, in all of the session's conversations
	Totals       Usage
}

// Conversation is one conversation's metadata.
type Conversation struct {
	ID string
	// Title is the title set by SetTitle, else the one derived from the
	// conversation's first user message; TitleSet says which.
	Title    string
	TitleSet bool
	// StartID and LastID are the ids of its first and last messages.
	StartID, LastID string
	CreatedMs       int64
	LastMs          int64 // time of its last turn
	MessageCount    int64 // messages ever written to it
	// Current: it is the session's latest conversation and was not reset.
	Current bool
	// Expired: retention removed its messages; its metadata stays.
	Expired bool
}

// MessageQuery selects messages of one conversation.
type MessageQuery struct {
	// Conversation is the conversation's id; "" means the session's
	// current conversation (none after Reset).
	Conversation string
	// After and Before, when not empty, are message ids: only messages
	// after After and before Before are read (both exclusive).
	After, Before string
	// Limit is the most messages read; 0 or less reads all of them.
	Limit int
	// Newest reads the newest Limit messages of the range instead of the
	// oldest. Messages are returned oldest first either way.
	Newest bool
}

// Erased says what Erase removed.
type Erased struct {
	Found         bool  // the session existed
	Conversations int64 // conversations it had
	Messages      int64 // messages still stored (retention may have removed others)
}

// SessionQuery selects sessions for Sessions, most recently active first.
// The zero value lists every session.
type SessionQuery struct {
	// Channel, User and Agent, when not empty, keep only the sessions with
	// that part (ids are "channel:user:agent"). Each is served by an index,
	// so none of them reads sessions that do not match.
	Channel, User, Agent string
	// SinceMs and UntilMs, when not zero, bound the last activity
	// (inclusive), in Unix milliseconds.
	SinceMs, UntilMs int64
	// MatchID, when not nil, keeps only the sessions whose id it accepts;
	// it needs no metadata, but counting Total visits every candidate.
	MatchID func(id string) bool
	// Match, when not nil, keeps only the sessions it accepts. It needs
	// each candidate's metadata, so candidates are read in batches, and
	// counting Total reads every candidate the other filters leave.
	Match func(Session) bool
	// ByCost lists the sessions that cost the most first (ties: id
	// descending) instead of the most recently active. It reads every
	// candidate's totals, in batches, as Match does; the page is the
	// most costly after the cursor, kept in a heap of Limit+1.
	ByCost bool
	// Cursor continues a previous page of the same order: its NextCursor.
	Cursor string
	// Limit is the page size; 0 or less means no limit.
	Limit int
}

// SessionPage is one page of Sessions.
type SessionPage struct {
	Sessions []Session
	// NextCursor continues the listing after this page; empty on the last
	// page. It names a position in the order (last activity, id; or cost,
	// id), so a session that moves to the top while a client pages is not
	// listed a second time (both only grow).
	NextCursor string
	// Total is how many sessions match the query, on every page.
	Total int64
}

// HasToolCalls reports whether raw, a message's tool_calls, holds at least
// one call. An empty array calls nothing: vLLM answers "tool_calls": []
// on every reply and some SDKs send it on every assistant message, where
// OpenAI answers null, and OpenAI refuses [] in a request (400
// empty_array). Such a message is a plain one: kind message, never a tool
// step, and injected without the array. A value that is not an array
// (only ever stored by hand) counts as calls, as ToolCallIDs does.
func HasToolCalls(raw json.RawMessage) bool {
	i := skipSpace(raw, 0)
	if i == len(raw) {
		return false
	}
	if raw[i] != '[' {
		return true
	}
	i = skipSpace(raw, i+1)
	return i < len(raw) && raw[i] != ']'
}

// skipSpace returns the index of the first byte of b from i on that is not
// JSON whitespace, or len(b).
func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// ToolCallIDs returns the ids of a tool_calls array; an empty (non-nil)
// slice when it has none or cannot be read, so a message with unreadable
// calls still counts as one that calls tools. The proxy pairs calls with
// their results by these ids when it injects a window, and compaction when
// it chooses where a summary may end: one parse, so both pair alike.
func ToolCallIDs(raw json.RawMessage) []string {
	var calls []struct {
		ID string `json:"id"`
	}
	if json.Unmarshal(raw, &calls) != nil {
		return []string{}
	}
	ids := make([]string, 0, len(calls))
	for _, c := range calls {
		ids = append(ids, c.ID)
	}
	return ids
}

package admin

import (
	"encoding/json"
	"strings"
	"time"

	"github.com/historyproxy/historyproxy/history"
)

// Session is a session as the API shows it, in lists and in detail.
type Session struct {
	ID      string `json:"id"`
	Channel string `json:"channel"`
	User    string `json:"user"`
	Agent   string `json:"agent"`
	// Title is the latest conversation's: set, else derived from its first
	// user message; null when it has neither.
	Title *string `json:"title"`
	// Conversation is the latest conversation's id; null when the session
	// has none (it only ever had usage counted).
	Conversation *string `json:"conversation"`
	// MessageCount counts every message the session ever stored, in all its
	// conversations.
	MessageCount int64   `json:"message_count"`
	Tokens       Tokens  `json:"tokens"`
	Requests     int64   `json:"requests"`
	CostUSD      float64 `json:"cost_usd"`
	CreatedAt    *string `json:"created_at"`
	LastActiveAt *string `json:"last_active_at"`
	// IsActive: the latest conversation goes on at the next request (it
	// was not reset and has not gone idle under the agent's idle_timeout).
	IsActive bool `json:"is_active"`
}

// Tokens are a session's all-time token totals.
type Tokens struct {
	Prompt     int64 `json:"prompt"`
	Completion int64 `json:"completion"`
	Cached     int64 `json:"cached"`
	History    int64 `json:"history"`
}

// Conversation is one conversation of a session.
type Conversation struct {
	ID    string  `json:"id"`
	Title *string `json:"title"`
	// TitleSet: the title was set by hand, not derived.
	TitleSet       bool    `json:"title_set"`
	CreatedAt      *string `json:"created_at"`
	LastMessageAt  *string `json:"last_message_at"`
	MessageCount   int64   `json:"message_count"`
	FirstMessageID *string `json:"first_message_id"`
	LastMessageID  *string `json:"last_message_id"`
	// Status is "active" (the next request continues it) or "ended".
	Status string `json:"status"`
	// Expired: retention removed its messages; its metadata stays.
	Expired bool `json:"expired"`
}

// Message is one message of the flat, user-facing history.
type Message struct {
	ID        string  `json:"id"`
	Role      string  `json:"role"`
	Content   string  `json:"content"`
	User      *string `json:"user"`
	CreatedAt *string `json:"created_at"`
}

// Entry is one stored message as the timeline shows it: everything as
// stored.
type Entry struct {
	ID           string          `json:"id"`
	Conversation string          `json:"conversation"`
	Kind         string          `json:"kind"`
	Role         string          `json:"role"`
	Content      *string         `json:"content"`
	ContentParts json.RawMessage `json:"content_parts,omitempty"`
	Name         string          `json:"name,omitempty"`
	ToolCalls    json.RawMessage `json:"tool_calls,omitempty"`
	ToolCallID   string          `json:"tool_call_id,omitempty"`
	Refusal      string          `json:"refusal,omitempty"`
	User         *string         `json:"user"`
	Model        *string         `json:"model"`
	Tokens       int             `json:"tokens"`
	CreatedAt    *string         `json:"created_at"`
	RequestID    *string         `json:"request_id"`
	Status       string          `json:"status"`
	// Usage is what the request whose turn this message ends used and
	// cost; on a turn's last message only, absent on the others (and on
	// messages imported by hand or recorded before it was kept).
	Usage *TurnUsage `json:"usage,omitempty"`
	// Covers, on a summary, is the range of the conversation's messages
	// it summarizes.
	Covers *Covers `json:"covers,omitempty"`
}

// TurnUsage is one turn's usage: its request's tokens (history included
// in prompt) and cost.
type TurnUsage struct {
	PromptTokens     int64   `json:"prompt_tokens"`
	CompletionTokens int64   `json:"completion_tokens"`
	CachedTokens     int64   `json:"cached_tokens"`
	HistoryTokens    int64   `json:"history_tokens"`
	CostUSD          float64 `json:"cost_usd"`
}

// Covers is the range of messages a summary covers: every message of its
// conversation from From to To (inclusive, summaries aside), Messages of
// them.
type Covers struct {
	From     string `json:"from"`
	To       string `json:"to"`
	Messages int64  `json:"messages"`
}

// timeFormat is RFC 3339 in UTC with milliseconds, the stores' precision.
const timeFormat = "2006-01-02T15:04:05.000Z07:00"

// Time shows a Unix millisecond time; nil for 0 (unknown).
func Time(ms int64) *string {
	if ms == 0 {
		return nil
	}
	s := time.UnixMilli(ms).UTC().Format(timeFormat)
	return &s
}

func str(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// Active reports whether a session's latest conversation goes on at the
// next request at nowMs: it was not reset and has not been idle for longer
// than the policy's idle timeout.
func Active(s history.Session, p history.Policy, nowMs int64) bool {
	if !s.Active || s.ConversationID == "" {
		return false
	}
	idle := p.IdleTimeout.Milliseconds()
	return idle <= 0 || nowMs-s.LastActiveMs <= idle
}

// SessionView shows a session; active is Active's answer for it.
func SessionView(s history.Session, active bool) Session {
	ch, u, a, _ := history.SplitID(s.ID)
	return Session{
		ID: s.ID, Channel: ch, User: u, Agent: a,
		Title:        str(s.Title),
		Conversation: str(s.ConversationID),
		MessageCount: s.MessageCount,
		Tokens: Tokens{
			Prompt: s.Totals.PromptTokens, Completion: s.Totals.CompletionTokens,
			Cached: s.Totals.CachedTokens, History: s.Totals.HistoryTokens,
		},
		Requests:     s.Totals.Requests,
		CostUSD:      float64(s.Totals.CostNanos) / 1e9,
		CreatedAt:    Time(s.CreatedMs),
		LastActiveAt: Time(s.LastActiveMs),
		IsActive:     active,
	}
}

// ConversationView shows a conversation; active says whether it is the
// session's active one.
func ConversationView(c history.Conversation, active bool) Conversation {
	status := "ended"
	if active {
		status = "active"
	}
	return Conversation{
		ID: c.ID, Title: str(c.Title), TitleSet: c.TitleSet,
		CreatedAt: Time(c.CreatedMs), LastMessageAt: Time(c.LastMs),
		MessageCount:   c.MessageCount,
		FirstMessageID: str(c.StartID), LastMessageID: str(c.LastID),
		Status: status, Expired: c.Expired,
	}
}

// EntryView shows a stored message as the timeline does.
func EntryView(m history.Message) Entry {
	e := Entry{
		ID: m.ID, Conversation: m.Conversation, Kind: m.Kind, Role: m.Role,
		ContentParts: m.Parts, Name: m.Name, ToolCalls: m.ToolCalls, ToolCallID: m.ToolCallID,
		Refusal: m.Refusal, User: str(m.User), Model: str(m.Model), Tokens: m.Tokens,
		CreatedAt: Time(m.CreatedMs), RequestID: str(m.RequestID), Status: m.Status,
	}
	if u := m.Usage; u != nil {
		e.Usage = &TurnUsage{PromptTokens: u.PromptTokens, CompletionTokens: u.CompletionTokens, CachedTokens: u.CachedTokens,
			HistoryTokens: u.HistoryTokens, CostUSD: float64(u.CostNanos) / 1e9}
	}
	if !m.ContentNull && m.Parts == nil {
		c := m.Content
		e.Content = &c
	}
	if m.Kind == history.KindSummary {
		e.Covers = &Covers{From: m.CoversFrom, To: m.CoversTo, Messages: m.Covers}
	}
	return e
}

// FlatView shows a stored message in the flat history; ok is false for
// one that is not user or assistant text (a tool result, a summary, a
// call with no text).
func FlatView(m history.Message) (Message, bool) {
	if (m.Role != history.RoleUser && m.Role != history.RoleAssistant) || m.Kind == history.KindSummary {
		return Message{}, false
	}
	text := Text(m)
	if text == "" {
		return Message{}, false
	}
	return Message{ID: m.ID, Role: m.Role, Content: text, User: str(m.User), CreatedAt: Time(m.CreatedMs)}, true
}

// Text is a message's text: its content, the text of its content parts,
// else its refusal.
func Text(m history.Message) string {
	if m.Content != "" {
		return m.Content
	}
	if len(m.Parts) > 0 {
		var parts []struct {
			Type string `json:"type"`
			Text string `json:"text"`
		}
		if json.Unmarshal(m.Parts, &parts) == nil {
			var texts []string
			for _, p := range parts {
				if p.Type == "text" && p.Text != "" {
					texts = append(texts, p.Text)
				}
			}
			if len(texts) > 0 {
				return strings.Join(texts, "\n")
			}
		}
	}
	return m.Refusal
}

package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/tokens"
	"github.com/historyproxy/historyproxy/wire"
)

// Page sizes of the message routes.
const (
	defaultMessages = 50
	maxMessages     = 500
	defaultTimeline = 1000
	maxTimeline     = 5000
)

// Page is one page of a conversation's messages.
type Page[T any] struct {
	Session string `json:"session"`
	// Conversation is the conversation shown; null when the session has
	// none yet.
	Conversation *string `json:"conversation"`
	// Active: the conversation shown is the session's active one.
	Active bool `json:"active"`
	Items  []T  `json:"items"`
	// HasMore: the conversation has more messages in the direction of
	// paging; NextAfter (paging forward) or NextBefore (paging back with
	// newest=true or before) continues there.
	HasMore    bool    `json:"has_more"`
	NextAfter  *string `json:"next_after,omitempty"`
	NextBefore *string `json:"next_before,omitempty"`
}

// messageQuery reads a message route's conversation, range and page size.
type messageQuery struct {
	conversation  string
	after, before string
	limit         int
	newest        bool
}

func readMessageQuery(r *http.Request, def, most int) (messageQuery, *wire.Error) {
	v := r.URL.Query()
	q := messageQuery{conversation: v.Get("conversation"), after: v.Get("after"), before: v.Get("before"), limit: def}
	for _, p := range []struct{ name, value string }{{"after", q.after}, {"before", q.before}} {
		if p.value != "" && !history.ValidMessageID(p.value) {
			return q, wire.BadRequest("invalid_value", p.name, fmt.Sprintf("%s must be a message id like 1764540000000-0, got %q", p.name, p.value))
		}
	}
	if s := v.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > most {
			return q, wire.BadRequest("invalid_value", "limit", fmt.Sprintf("limit must be a whole number from 1 to %d, got %q", most, s))
		}
		q.limit = n
	}
	switch s := v.Get("newest"); s {
	case "", "false":
	case "true":
		q.newest = true
	default:
		return q, wire.BadRequest("invalid_value", "newest", fmt.Sprintf("newest must be true or false, got %q", s))
	}
	// Paging back from an id reads the newest messages before it.
	q.newest = q.newest || (q.before != "" && q.after == "")
	return q, nil
}

// resolve finds the conversation a message route shows: the one named,
// else the session's active one, else its latest. ok is false when the
// answer has been written (an error).
func (a *API) resolve(ctx context.Context, w http.ResponseWriter, id, named string) (conv string, active, ok bool) {
	s, found, err := a.opt.Store.Session(ctx, id)
	if err != nil {
		a.storeFailed(w, "read session", err)
		return "", false, false
	}
	if !found {
		writeError(w, notFound("session_not_found", "no session "+strconv.Quote(id)))
		return "", false, false
	}
	isActive := a.active(s, a.now().UnixMilli())
	if named == "" {
		return s.ConversationID, isActive, true
	}
	convs, err := a.opt.Store.Conversations(ctx, id)
	if err != nil {
		a.storeFailed(w, "list conversations", err)
		return "", false, false
	}
	if !slices.ContainsFunc(convs, func(c history.Conversation) bool { return c.ID == named }) {
		writeError(w, notFound("conversation_not_found", "session "+strconv.Quote(id)+" has no conversation "+strconv.Quote(named)))
		return "", false, false
	}
	return named, isActive && named == s.ConversationID, true
}

// read pages through one conversation, keeping the messages keep accepts,
// until limit of them are found: the store is read in chunks, so a page
// of text messages in a conversation of tool calls takes a few reads.
// The messages come oldest first; more says whether kept messages remain
// in the direction of paging.
func (a *API) read(ctx context.Context, id, conv string, q messageQuery, keep func(history.Message) bool) (out []history.Message, more bool, err error) {
	chunk := min(max(q.limit+1, 64), 1000)
	after, before := q.after, q.before
	for {
		_, msgs, err := a.opt.Store.ReadMessages(ctx, id, history.MessageQuery{
			Conversation: conv, After: after, Before: before, Limit: chunk, Newest: q.newest,
		})
		if err != nil {
			return nil, false, err
		}
		if q.newest {
			for i := len(msgs) - 1; i >= 0; i-- {
				if keep(msgs[i]) {
					if len(out) == q.limit {
						slices.Reverse(out)
						return out, true, nil
					}
					out = append(out, msgs[i])
				}
			}
		} else {
			for _, m := range msgs {
				if keep(m) {
					if len(out) == q.limit {
						return out, true, nil
					}
					out = append(out, m)
				}
			}
		}
		if len(msgs) < chunk {
			if q.newest {
				slices.Reverse(out)
			}
			return out, false, nil
		}
		if q.newest {
			before = msgs[0].ID
		} else {
			after = msgs[len(msgs)-1].ID
		}
	}
}

// listMessages serves GET /admin/v1/sessions/{id}/messages: the flat,
// user-facing history.
func (a *API) listMessages(w http.ResponseWriter, r *http.Request) {
	servePage(a, w, r, defaultMessages, maxMessages, func(m history.Message) (Message, bool) { return FlatView(m) })
}

// timeline serves GET /admin/v1/sessions/{id}/timeline: everything as
// stored.
func (a *API) timeline(w http.ResponseWriter, r *http.Request) {
	servePage(a, w, r, defaultTimeline, maxTimeline, func(m history.Message) (Entry, bool) { return EntryView(m), true })
}

func servePage[T any](a *API, w http.ResponseWriter, r *http.Request, def, most int, view func(history.Message) (T, bool)) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	q, werr := readMessageQuery(r, def, most)
	if werr != nil {
		writeError(w, werr)
		return
	}
	ctx, cancel := a.ctx(r, 1)
	defer cancel()
	conv, active, ok := a.resolve(ctx, w, id, q.conversation)
	if !ok {
		return
	}
	out := Page[T]{Session: id, Conversation: str(conv), Active: active, Items: []T{}}
	if conv != "" {
		msgs, more, err := a.read(ctx, id, conv, q, func(m history.Message) bool { _, ok := view(m); return ok })
		if err != nil {
			a.storeFailed(w, "read messages", err)
			return
		}
		for _, m := range msgs {
			v, _ := view(m)
			out.Items = append(out.Items, v)
		}
		out.HasMore = more
		if more && len(msgs) > 0 {
			if q.newest {
				out.NextBefore = &msgs[0].ID
			} else {
				out.NextAfter = &msgs[len(msgs)-1].ID
			}
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// Imported is the answer of POST /admin/v1/sessions/{id}/messages.
type Imported struct {
	Session         string   `json:"session"`
	Conversation    string   `json:"conversation"`
	NewConversation bool     `json:"new_conversation"`
	Duplicate       bool     `json:"duplicate"`
	IDs             []string `json:"ids"`
	Tokens          int      `json:"tokens"`
}

// importMessages serves POST /admin/v1/sessions/{id}/messages: messages
// appended by hand, validated and counted as the proxy does a turn's.
func (a *API) importMessages(w http.ResponseWriter, r *http.Request) {
	id, werr := sessionID(r)
	if werr != nil {
		writeError(w, werr)
		return
	}
	_, user, agent, _ := history.SplitID(id)
	var fields map[string]json.RawMessage
	if werr := decodeBody(r, &fields); werr != nil {
		writeError(w, werr)
		return
	}
	// Exact keys, as the proxy reads a chat request.
	var (
		raws     []json.RawMessage
		model    string
		msgUser  string
		startNew bool
	)
	for _, f := range []struct {
		key string
		dst any
	}{{"messages", &raws}, {"model", &model}, {"user", &msgUser}, {"new_conversation", &startNew}} {
		if werr := wire.Field(fields, f.key, f.dst); werr != nil {
			writeError(w, werr)
			return
		}
	}
	if len(raws) == 0 {
		writeError(w, wire.BadRequest("missing_required_parameter", "messages", "messages is required: a non-empty array of chat messages"))
		return
	}
	if msgUser != "" {
		if err := history.CheckPart(msgUser); err != nil {
			writeError(w, wire.BadRequest("invalid_value", "user", "user: "+err.Error()))
			return
		}
	} else if user != history.SharedUser {
		msgUser = user
	}
	now := a.now()
	turn := history.Turn{NowMs: now.UnixMilli(), IdempotencyKey: r.Header.Get("Idempotency-Key")}
	if turn.IdempotencyKey == "" {
		turn.IdempotencyKey = r.Header.Get("X-Message-ID")
	}
	total := 0
	for i, raw := range raws {
		param := fmt.Sprintf("messages[%d]", i)
		m, werr := wire.ParseMessage(raw, param)
		if werr == nil {
			werr = importable(m, param)
		}
		if werr != nil {
			writeError(w, werr)
			return
		}
		m.User, m.Model, m.CreatedMs = msgUser, model, turn.NowMs
		m.Tokens = a.opt.Counter.Message(model, tokens.Message{Role: m.Role, Name: m.Name, Content: m.Content, Parts: m.Parts,
			ToolCalls: m.ToolCalls, ToolCallID: m.ToolCallID, Refusal: m.Refusal})
		total += m.Tokens
		turn.Messages = append(turn.Messages, m)
	}
	// A new conversation is the append's to start, after its idempotency
	// check: a reset before it would end the conversation a first attempt
	// created when the attempt is retried.
	turn.NewConversation = startNew
	ctx, cancel := a.ctx(r, 1)
	defer cancel()
	res, err := a.opt.Store.Append(ctx, id, turn, a.opt.Policy(agent))
	if err != nil {
		a.storeFailed(w, "append messages", err)
		return
	}
	out := Imported{Session: id, Conversation: res.ConversationID, NewConversation: res.NewConversation,
		Duplicate: res.Duplicate, IDs: res.IDs, Tokens: total}
	status := http.StatusCreated
	if res.Duplicate {
		status, out.IDs, out.Tokens = http.StatusOK, []string{}, 0
	}
	writeJSON(w, status, out)
}

// importable checks what the proxy leaves to the upstream, since an
// import has no upstream to answer 400: only the roles the proxy records,
// a tool result names its call, and an assistant message says something.
func importable(m history.Message, param string) *wire.Error {
	switch m.Role {
	case history.RoleUser, history.RoleAssistant, history.RoleTool:
	default:
		return wire.BadRequest("invalid_value", param+".role",
			fmt.Sprintf("%s.role %q is not stored: the app sends system and developer messages with each request; import user, assistant and tool messages", param, m.Role))
	}
	if m.Role == history.RoleTool && m.ToolCallID == "" {
		return wire.BadRequest("missing_required_parameter", param+".tool_call_id", param+".tool_call_id is required on a tool message")
	}
	if m.Role == history.RoleAssistant && m.ContentNull && !history.HasToolCalls(m.ToolCalls) && m.Refusal == "" {
		return wire.BadRequest("missing_required_parameter", param+".content", param+".content is required on an assistant message without tool_calls or refusal")
	}
	return nil
}

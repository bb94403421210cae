package proxy

import (
	"slices"

	"github.com/historyproxy/historyproxy/history"
)

// answer is what a request brings that the history must fit: the tool
// results it opens with, and the key of its turn.
type answer struct {
	// results are the tool_call_ids of the tool messages the request opens
	// with (after its system messages), in order; nil when it opens with
	// something else.
	results []string
	// user is the request's user: in a shared conversation, the call it
	// answers is looked for among that user's calls first.
	user string
	// key is the request's idempotency key. A request that repeats a key
	// already recorded gets the history as it was before that record.
	key string
}

// item is one message being arranged: a stored message, or (req) one of
// the request's own opening tool results, which stay last and are never
// injected.
type item struct {
	m   history.Message
	ids []string // the tool_call ids of an assistant message that calls tools
	req bool
}

func (it item) isTool() bool { return it.m.Role == history.RoleTool }
func (it item) calls() bool  { return it.ids != nil }
func (it item) starts() bool {
	return it.m.Role == history.RoleUser || it.m.Kind == history.KindSummary
}
func (it item) whole() bool   { return it.m.Status != history.StatusIncomplete && len(it.ids) > 0 }
func (it item) hasText() bool { return it.m.Content != "" || it.m.Parts != nil }

// arrange turns a window into history the upstream accepts in front of the
// request, oldest first. The API pairs tool results with calls by position
// (the tool messages right after an assistant message answer its calls),
// and so does arrange; an id is never matched across the window, since
// some servers reuse ids (call_0 in every reply).
//
//   - A repeated request (its key is on stored messages) gets the window as
//     it was before its first attempt was recorded: the same context.
//   - A block of tool results that does not follow its call (the call was
//     answered later than other turns were recorded, as in a shared
//     conversation, or by the request itself) answers the newest earlier
//     call left unanswered whose ids it covers, the same user's first. That
//     call, with the messages of its turn before it (from its user
//     message), is moved to just before the results. Nothing is dropped.
//   - A request whose results answer no open call but one already answered
//     (it was sent again without a key) gets the history up to that call.
//   - What is still unpaired is left out: a call whose results never came
//     (an assistant message that also has text keeps the text), an
//     incomplete call, and results whose call is gone.
//
// answered reports that the last message returned is the call the
// request's results answer; dropped that some of the window was left out.
func arrange(window []history.Message, a answer) (msgs []history.Message, answered, dropped bool) {
	if a.key != "" {
		if i := slices.IndexFunc(window, func(m history.Message) bool { return m.IdempotencyKey == a.key }); i >= 0 {
			window = window[:i]
		}
	}
	if len(a.results) == 0 && !slices.ContainsFunc(window, hasTools) {
		// Nothing to pair (most conversations): the window as it is. The
		// copies below cost 14 KB a request for a window of 20.
		return window, false, false
	}
	items := make([]item, 0, len(window)+len(a.results))
	for _, m := range window {
		it := item{m: m}
		if m.Role == history.RoleAssistant && history.HasToolCalls(m.ToolCalls) {
			it.ids = history.ToolCallIDs(m.ToolCalls)
		}
		items = append(items, it)
	}
	for _, id := range a.results {
		items = append(items, item{m: history.Message{Role: history.RoleTool, ToolCallID: id, User: a.user}, req: true})
	}
	stored := len(window)
	// Each pass pairs or removes one stray block of stored results, so the
	// passes are bounded. Moves happen before the block, so the request's
	// results stay the last items.
	for range stored + 1 {
		b, e := strayBlock(items[:stored])
		if b < 0 {
			break
		}
		if c := openCall(items[:b], items[b:e]); c >= 0 {
			items = moveTurn(items, c, b)
			continue
		}
		items = slices.Delete(items, b, e)
		stored -= e - b
	}
	if len(a.results) > 0 {
		// The request's results answer the open call of their user, which
		// need not be the newest call in a shared conversation.
		if c := openCall(items[:stored], items[stored:]); c >= 0 {
			items = moveTurn(items, c, stored)
		} else if c := answeredCall(items[:stored], items[stored:]); c >= 0 {
			items = slices.Concat(items[:c+1], items[stored:])
		}
	}
	msgs = make([]history.Message, 0, len(window))
	for i := 0; i < len(items); {
		it := items[i]
		switch {
		case it.isTool():
			i++ // results whose call is gone
		case it.calls():
			// A block is stored results or the request's, never both:
			// the request's results answer a call of their own.
			j := i + 1
			for j < len(items) && items[j].isTool() && items[j].req == items[i+1].req {
				j++
			}
			block := items[i+1 : j]
			if it.whole() && answers(block, it.ids) {
				msgs = append(msgs, it.m)
				seen := make(map[string]bool, len(it.ids))
				for _, r := range block {
					if r.req {
						answered = true
					} else if slices.Contains(it.ids, r.m.ToolCallID) && !seen[r.m.ToolCallID] {
						msgs = append(msgs, r.m)
					}
					seen[r.m.ToolCallID] = true
				}
			} else if it.hasText() {
				m := it.m
				m.ToolCalls = nil
				msgs = append(msgs, m)
			}
			i = j
		default:
			msgs = append(msgs, it.m)
			i++
		}
	}
	return msgs, answered, len(msgs) < len(window)
}

// hasTools reports whether m is a tool result or a call, which arrange
// pairs; an empty tool_calls array is no call.
func hasTools(m history.Message) bool {
	return m.Role == history.RoleTool || (m.Role == history.RoleAssistant && history.HasToolCalls(m.ToolCalls))
}

// strayBlock finds the first block of tool messages that does not answer
// the assistant message right before it: [b, e), or -1.
func strayBlock(items []item) (b, e int) {
	for i := 0; i < len(items); {
		if !items[i].isTool() {
			i++
			continue
		}
		j := i + 1
		for j < len(items) && items[j].isTool() {
			j++
		}
		if i == 0 || !items[i-1].calls() || !within(items[i:j], items[i-1].ids) {
			return i, j
		}
		i = j
	}
	return -1, -1
}

// openCall returns the newest call in before that no results follow and
// whose ids the block's results answer, each of them and no other,
// preferring the block's user; -1 when there is none. A call the block
// would only half answer is not its call: with reused ids (call_0 in every
// reply) a newer call often shares one of them, and the API refuses a call
// whose ids are not all answered.
func openCall(before, block []item) int {
	user := block[0].m.User
	found := -1
	for c := len(before) - 1; c >= 0; c-- {
		it := before[c]
		if !it.calls() || !answers(block, it.ids) {
			continue
		}
		if c+1 < len(before) && before[c+1].isTool() && within(before[c+1:c+2], it.ids) {
			continue // answered where it stands
		}
		if it.m.User == user {
			return c
		}
		if found < 0 {
			found = c
		}
	}
	return found
}

// moveTurn moves the call at c, with the messages of its turn before it,
// to just before the results at b.
func moveTurn(items []item, c, b int) []item {
	if c == b-1 {
		return items
	}
	s := turnStart(items, c)
	return slices.Concat(items[:s], items[c+1:b], items[s:c+1], items[b:])
}

// answeredCall returns the newest call in before whose ids the block's
// results answer, each of them and no other, answered or not; -1 when there
// is none.
func answeredCall(before, block []item) int {
	for c := len(before) - 1; c >= 0; c-- {
		if before[c].calls() && answers(block, before[c].ids) {
			return c
		}
	}
	return -1
}

// turnStart is where the turn of the message at c begins: its user message
// (or summary), or the start of the window when that is out of reach.
func turnStart(items []item, c int) int {
	for s := c; s >= 0; s-- {
		if items[s].starts() {
			return s
		}
	}
	return 0
}

// within reports whether every result of block answers one of ids.
func within(block []item, ids []string) bool {
	for _, r := range block {
		if !slices.Contains(ids, r.m.ToolCallID) {
			return false
		}
	}
	return true
}

// answers reports whether block answers each of ids, and nothing else.
func answers(block []item, ids []string) bool {
	return len(ids) > 0 && within(block, ids) && covers(block, ids)
}

// covers reports whether block answers each of ids.
func covers(block []item, ids []string) bool {
	for _, id := range ids {
		if !slices.ContainsFunc(block, func(r item) bool { return r.m.ToolCallID == id }) {
			return false
		}
	}
	return true
}

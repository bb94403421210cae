package history

// Limits bound the history put in front of a request. A limit of zero or
// less does not apply.
type Limits struct {
	MaxTokens   int
	MaxMessages int
	// ToolSteps also lets a group start at an assistant message that calls
	// tools. It is for a request that answers tool calls while its user
	// message is out of reach (an agent loop longer than the window): the
	// selection may then begin with that assistant message, which keeps
	// every call with its results, rather than with nothing at all, which
	// leaves the request's tool results dangling.
	ToolSteps bool
}

// Selection is the part of a window chosen by Select.
type Selection struct {
	// Messages are the chosen messages, oldest first. They share the
	// window's backing array.
	Messages []Message
	// Tokens is the sum of the chosen messages' Tokens.
	Tokens int
	// Truncated reports that some of the window was left out.
	Truncated bool
}

// Select picks the newest whole turns of window (oldest first) that fit
// both limits.
//
// It walks newest to oldest in groups: a group starts at a user message (or
// a summary) and runs up to the next one. So an assistant message with
// tool_calls is never separated from its tool results, which the API would
// reject, and the selection never begins with a tool or assistant message.
// The first group that does not fit ends the selection: skipping it to take
// an older one would leave a hole in the conversation. A leading partial
// group (a window that starts mid-turn) is dropped.
func Select(window []Message, l Limits) Selection {
	start, tokens, groupTokens := len(window), 0, 0
	for i := len(window) - 1; i >= 0; i-- {
		groupTokens += window[i].Tokens
		if !startsTurn(window[i]) && !(l.ToolSteps && startsStep(window[i])) {
			continue
		}
		if l.MaxMessages > 0 && len(window)-i > l.MaxMessages {
			break
		}
		if l.MaxTokens > 0 && tokens+groupTokens > l.MaxTokens {
			break
		}
		start, tokens, groupTokens = i, tokens+groupTokens, 0
	}
	sel := Selection{Tokens: tokens, Truncated: start > 0}
	if start < len(window) {
		sel.Messages = window[start:]
	}
	return sel
}

// startsTurn reports whether m begins a group of Select.
func startsTurn(m Message) bool {
	return m.Role == RoleUser || m.Kind == KindSummary
}

// startsStep reports whether m begins a tool step: an assistant message
// with tool calls, followed by their results.
func startsStep(m Message) bool {
	return m.Role == RoleAssistant && HasToolCalls(m.ToolCalls)
}

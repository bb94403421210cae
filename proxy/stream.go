package proxy

import (
	"bytes"
	"encoding/json"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/historyproxy/historyproxy/history"
	"github.com/historyproxy/historyproxy/tokens"
	"github.com/historyproxy/historyproxy/wire"
)

// usageJSON is the usage object of a chat completion or of a stream's
// usage chunk.
type usageJSON struct {
	PromptTokens        int64 `json:"prompt_tokens"`
	CompletionTokens    int64 `json:"completion_tokens"`
	PromptTokensDetails *struct {
		CachedTokens int64 `json:"cached_tokens"`
	} `json:"prompt_tokens_details"`
	CompletionTokensDetails *struct {
		ReasoningTokens int64 `json:"reasoning_tokens"`
	} `json:"completion_tokens_details"`
}

func (u *usageJSON) usage() tokens.Usage {
	t := tokens.Usage{Prompt: u.PromptTokens, Completion: u.CompletionTokens}
	if u.PromptTokensDetails != nil {
		t.Cached = u.PromptTokensDetails.CachedTokens
	}
	if u.CompletionTokensDetails != nil {
		t.Reasoning = u.CompletionTokensDetails.ReasoningTokens
	}
	return t
}

// reply is the assistant's answer (choice 0) as the proxy stores it,
// assembled from a whole response or from stream deltas.
type reply struct {
	Content      strings.Builder
	Refusal      strings.Builder
	ContentNull  bool
	ToolCalls    json.RawMessage // set for a whole response
	calls        []*toolCall     // assembled from deltas, in order of appearance
	slots        map[int]int     // a delta's index -> its call in calls
	FinishReason string
	Usage        *usageJSON
	FirstToken   time.Time // first content, refusal or tool-call delta
	// size is the bytes assembled from stream deltas; Truncated is set
	// when the stream passed a bound and the rest was not read.
	size      int
	Truncated bool
	// Failed: the stream carried an error event (a generation that failed
	// part way; vLLM sends [DONE] after it). The clients raise the error,
	// so the reply is recorded as cut short, whatever follows.
	Failed bool
	// others are the choices past 0 (n > 1), by index. They are not
	// recorded; they are assembled to estimate the usage when the
	// upstream sends none, since the API bills every choice.
	others map[int]*reply
	// live, when set, is handed choice 0's fragments as they are read,
	// for the session's watchers (history.Lease.Publish, which never
	// blocks).
	live func(history.Delta)
	// othersSize is the bytes held in others; past maxOtherChoicesBytes
	// their deltas are no longer held (an estimate then falls short).
	othersSize int
}

// maxOtherChoicesBytes bounds the bytes of the choices past 0 held for an
// estimate, beside choice 0's own bound.
const maxOtherChoicesBytes = 8 << 20

// maxChoices bounds the choices assembled from one reply: the API's n is
// at most 128. Choices past it are not counted in an estimate.
const maxChoices = 128

// choice returns the reply of choice i: r itself for 0, else one of
// r.others, made on first use; nil past maxChoices.
func (r *reply) choice(i int) *reply {
	if i == 0 {
		return r
	}
	if o, ok := r.others[i]; ok {
		return o
	}
	if i < 0 || len(r.others) >= maxChoices-1 {
		return nil
	}
	if r.others == nil {
		r.others = map[int]*reply{}
	}
	o := &reply{}
	r.others[i] = o
	return o
}

type toolCall struct {
	ID, Type, Name string
	Args           strings.Builder
}

// chunk is one streamed chat.completion.chunk.
type chunk struct {
	Choices []chunkChoice `json:"choices"`
	Usage   *usageJSON    `json:"usage"`
	// An error event: {"error":{...}} (OpenAI, LiteLLM, newer vLLM) or
	// vLLM's older {"object":"error","message":...}.
	Error  json.RawMessage `json:"error"`
	Object string          `json:"object"`
}

type chunkChoice struct {
	Index        int        `json:"index"`
	Delta        chunkDelta `json:"delta"`
	FinishReason *string    `json:"finish_reason"`
}

type chunkDelta struct {
	Content   *string         `json:"content"`
	Refusal   *string         `json:"refusal"`
	ToolCalls []chunkToolCall `json:"tool_calls"`
}

type chunkToolCall struct {
	Index    *int   `json:"index"`
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

// add merges one chunk into the reply. Tool-call argument fragments are
// appended by index, as the API streams them. Choices other than 0 (n > 1)
// go to r.others (see there): the proxy records choice 0. r.size counts
// choice 0's bytes, which the stream's bound applies to; the other choices
// are bounded apart (maxOtherChoicesBytes), so they never cut choice 0.
func (r *reply) add(c *chunk, now time.Time) {
	if (len(c.Error) > 0 && !bytes.Equal(c.Error, []byte("null"))) || c.Object == "error" {
		r.Failed = true
	}
	if c.Usage != nil {
		r.Usage = c.Usage
	}
	for _, ch := range c.Choices {
		cr := r.choice(ch.Index)
		if cr == nil || (cr != r && r.othersSize > maxOtherChoicesBytes) {
			continue
		}
		before := cr.size
		d := ch.Delta
		if ch.Index == 0 && r.FirstToken.IsZero() && ((d.Content != nil && *d.Content != "") || (d.Refusal != nil && *d.Refusal != "") || len(d.ToolCalls) > 0) {
			r.FirstToken = now
		}
		if d.Content != nil {
			cr.Content.WriteString(*d.Content)
			cr.size += len(*d.Content)
		}
		if d.Refusal != nil {
			cr.Refusal.WriteString(*d.Refusal)
			cr.size += len(*d.Refusal)
		}
		for _, tc := range d.ToolCalls {
			call := cr.callFor(tc.Index, tc.ID)
			if call == nil {
				continue
			}
			if tc.ID != "" {
				call.ID = tc.ID
			}
			if tc.Type != "" {
				call.Type = tc.Type
			}
			call.Name += tc.Function.Name
			call.Args.WriteString(tc.Function.Arguments)
			cr.size += len(tc.Function.Name) + len(tc.Function.Arguments)
		}
		if ch.FinishReason != nil && *ch.FinishReason != "" {
			cr.FinishReason = *ch.FinishReason
		}
		if cr != r {
			r.othersSize += cr.size - before
		} else if r.live != nil {
			// For the session's watchers. Tool calls are numbered by their
			// slot (see callFor), as they are recorded.
			var ld history.Delta
			if d.Content != nil {
				ld.Content = *d.Content
			}
			if d.Refusal != nil {
				ld.Refusal = *d.Refusal
			}
			for _, tc := range d.ToolCalls {
				key := -1
				if tc.Index != nil {
					key = *tc.Index
				}
				if slot, ok := r.slots[key]; ok {
					ld.ToolCalls = append(ld.ToolCalls, history.ToolCallDelta{Index: slot, ID: tc.ID, Type: tc.Type,
						Name: tc.Function.Name, Arguments: tc.Function.Arguments})
				}
			}
			r.live(ld)
		}
	}
}

// maxToolCalls bounds the calls assembled from one stream.
const maxToolCalls = 128

// callFor returns the call a tool-call delta belongs to. Calls get slots in
// the order they first appear rather than at their index: some gateways
// number calls from 1, and a gap must not leave an empty call that no
// tool result could answer. Some servers send no index at all; then a
// new id starts a new call.
func (r *reply) callFor(index *int, id string) *toolCall {
	key := -1
	if index != nil {
		key = *index
	}
	if i, ok := r.slots[key]; ok {
		c := r.calls[i]
		if id == "" || c.ID == "" || c.ID == id {
			return c
		}
	}
	if len(r.calls) >= maxToolCalls {
		return nil
	}
	if r.slots == nil {
		r.slots = map[int]int{}
	}
	r.calls = append(r.calls, &toolCall{})
	r.slots[key] = len(r.calls) - 1
	return r.calls[len(r.calls)-1]
}

// toolCallsJSON is the assembled tool calls as the API's tool_calls array.
func (r *reply) toolCallsJSON() json.RawMessage {
	if r.ToolCalls != nil {
		return r.ToolCalls
	}
	if len(r.calls) == 0 {
		return nil
	}
	type fn struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	}
	type call struct {
		ID       string `json:"id"`
		Type     string `json:"type"`
		Function fn     `json:"function"`
	}
	out := make([]call, 0, len(r.calls))
	for _, c := range r.calls {
		typ := c.Type
		if typ == "" {
			typ = "function"
		}
		out = append(out, call{ID: c.ID, Type: typ, Function: fn{Name: c.Name, Arguments: c.Args.String()}})
	}
	b, _ := json.Marshal(out) // strings only: cannot fail
	return b
}

// parseReply reads choice 0 and the usage of a whole (non-stream) chat
// completion. ok is false when the body is not a chat completion.
func parseReply(body []byte) (*reply, bool) {
	var resp struct {
		Choices []struct {
			Index   int `json:"index"`
			Message struct {
				Content   *string         `json:"content"`
				Refusal   *string         `json:"refusal"`
				ToolCalls json.RawMessage `json:"tool_calls"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage *usageJSON `json:"usage"`
	}
	if err := json.Unmarshal(body, &resp); err != nil || resp.Choices == nil {
		return nil, false
	}
	r := &reply{Usage: resp.Usage}
	for _, c := range resp.Choices {
		cr := r.choice(c.Index)
		if cr == nil {
			continue
		}
		m := c.Message
		if m.Content != nil {
			cr.Content.WriteString(*m.Content)
		} else {
			cr.ContentNull = true
		}
		if m.Refusal != nil {
			cr.Refusal.WriteString(*m.Refusal)
		}
		if len(m.ToolCalls) > 0 && !wire.IsNull(m.ToolCalls) {
			cr.ToolCalls = m.ToolCalls
		}
		cr.FinishReason = c.FinishReason
	}
	return r, true
}

// streamBody relays an SSE stream event by event, unchanged, while it
// assembles the reply on the side. It holds back only an incomplete event
// (so each event reaches the client whole, and at once), and drops the
// usage-only chunk when the client did not ask for it. The turn is
// recorded (finish) before the final "data: [DONE]" is handed on, so a
// client that saw the end of the reply can count on it being stored.
type streamBody struct {
	src       io.ReadCloser
	hideUsage bool
	reply     *reply
	now       func() time.Time
	// finish records the turn. complete is false when the stream ended
	// before [DONE]. A non-nil error aborts the stream before [DONE].
	finish func(complete bool) error

	once   sync.Once
	done   bool // [DONE] seen
	in     []byte
	out    []byte
	outPos int
	err    error
	// crEdge: the last event framed ended in a CR that was the last byte
	// read so far. An LF that comes next completes that CR LF line ending
	// and is handed on (or dropped, dropLF, with a dropped event) with it.
	crEdge, dropLF bool
	// maxEvent and maxReply bound what is held to read the stream: an
	// event not ended yet, and the reply assembled. Past either, the turn
	// is recorded with what was assembled (incomplete) and the rest of the
	// stream is relayed unread (raw).
	maxEvent, maxReply int
	raw                bool
	chunks             chunkDecoder
}

// chunkDecoder decodes a stream's chunks one after the other: most with
// the scanner of chunkscan.go, the others with one json.Decoder, which
// keeps the memory of its scanner and of its field stack from one chunk to
// the next (json.Unmarshal starts afresh for each, a dozen allocations per
// chunk). It accepts exactly what json.Unmarshal accepts: one JSON value
// with nothing but white space after it.
type chunkDecoder struct {
	rd  bytes.Reader
	dec *json.Decoder
	// fed is the bytes handed to dec before the current data: its
	// InputOffset counts from there.
	fed int64
	c   chunk
	// The scanner's: the choices' texts c points into, and its buffer.
	texts   []choiceScratch
	scratch []byte
}

// decode returns data as a chunk, valid until the next call; ok is false
// when json.Unmarshal would fail on data.
func (d *chunkDecoder) decode(data []byte) (c *chunk, ok bool) {
	if scanChunk(data, &d.c, &d.texts, &d.scratch) {
		return &d.c, true
	}
	if d.dec == nil {
		d.dec, d.fed = json.NewDecoder(&d.rd), 0
	}
	d.rd.Reset(data)
	// The elements are decoded into in place: cleared first, so that no
	// field of an earlier chunk is left where this one has none.
	choices := d.c.Choices[:cap(d.c.Choices)]
	clear(choices)
	d.c = chunk{Choices: choices[:0]}
	err := d.dec.Decode(&d.c)
	end := d.dec.InputOffset() - d.fed
	d.fed += int64(len(data))
	if err != nil || end < 0 || end > int64(len(data)) || len(bytes.TrimLeft(data[end:], " \t\r\n")) > 0 {
		// A decoder that failed keeps its error, and one that stopped
		// early keeps what follows: the next chunk gets a new one.
		d.dec = nil
		return nil, false
	}
	return &d.c, true
}

// Bounds of a stream the proxy reads (see streamBody.maxEvent).
const (
	// maxEventBytes is far above any event of the API (a few KB); an
	// event this long that has not ended may never end.
	maxEventBytes = 8 << 20
	// maxStreamReplyBytes is the bound of a whole reply (maxReplyBytes).
	maxStreamReplyBytes = maxReplyBytes
)

func newStreamBody(src io.ReadCloser, hideUsage bool, r *reply, now func() time.Time, finish func(bool) error) *streamBody {
	return &streamBody{src: src, hideUsage: hideUsage, reply: r, now: now, finish: finish,
		maxEvent: maxEventBytes, maxReply: maxStreamReplyBytes}
}

// overBound reports whether reading the stream passed a bound.
func (b *streamBody) overBound() bool {
	return len(b.in) > b.maxEvent || b.reply.size > b.maxReply
}

// Read reads the upstream into p itself, the caller's buffer, before it
// frames what came: a buffer of its own would cost every open stream 32
// KiB more than a plain reverse proxy.
func (b *streamBody) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for b.outPos == len(b.out) {
		if b.err != nil {
			return 0, b.err
		}
		b.out, b.outPos = b.out[:0], 0
		n, err := b.src.Read(p)
		if b.raw {
			b.out = append(b.out, p[:n]...)
			b.err = err
			continue
		}
		b.in = append(b.in, p[:n]...)
		if ferr := b.frame(); ferr != nil {
			b.err = ferr
			continue
		}
		if !b.done && b.overBound() {
			// Too much to hold: the turn is recorded now with what was
			// assembled, before anything more reaches the client, and the
			// rest is relayed as it comes.
			b.reply.Truncated = true
			if ferr := b.end(false); ferr != nil {
				b.in, b.err = b.in[:0], ferr
				continue
			}
			b.raw = true
			b.out = append(b.out, b.in...)
			b.in = nil
			if err != nil {
				b.err = err
			}
			continue
		}
		if err != nil {
			if err == io.EOF && b.lastDone() {
				// data: [DONE] with no blank line after it: the end of the
				// reply all the same, recorded before it is handed on.
				b.done = true
				if ferr := b.end(true); ferr != nil {
					b.in, b.err = b.in[:0], ferr
					continue
				}
			}
			// Whatever is left is not a whole event; hand it on as it came.
			b.out = append(b.out, b.in...)
			b.in = b.in[:0]
			complete := b.done || (err == io.EOF && b.reply.FinishReason != "")
			if ferr := b.end(complete); ferr != nil && !b.done {
				err = ferr
			}
			b.err = err
		}
	}
	n := copy(p, b.out[b.outPos:])
	b.outPos += n
	return n, nil
}

// lastDone reports whether what is left unframed at the end of the stream
// is a [DONE] event without its blank line.
func (b *streamBody) lastDone() bool {
	_, done := eventData(b.in)
	return !b.done && done
}

// frame moves every whole event from in to out.
func (b *streamBody) frame() error {
	start := 0
	if b.crEdge && len(b.in) > 0 {
		if b.in[0] == '\n' {
			if !b.dropLF {
				b.out = append(b.out, '\n')
			}
			start = 1
		}
		b.crEdge = false
	}
	for {
		end := eventEnd(b.in[start:])
		if end < 0 {
			break
		}
		ev := b.in[start : start+end]
		start += end
		drop := false
		data, isDone := eventData(ev)
		if isDone {
			b.done = true
			if err := b.end(true); err != nil {
				return err
			}
		} else if data != nil {
			if c, ok := b.chunks.decode(data); ok {
				b.reply.add(c, b.now())
				// The usage chunk the proxy asked for, not the client.
				drop = b.hideUsage && c.Usage != nil && len(c.Choices) == 0
			}
		}
		if start == len(b.in) && ev[len(ev)-1] == '\r' {
			b.crEdge, b.dropLF = true, drop
		}
		if !drop {
			b.out = append(b.out, ev...)
		}
	}
	b.in = append(b.in[:0], b.in[start:]...)
	return nil
}

func (b *streamBody) end(complete bool) error {
	var err error
	b.once.Do(func() { err = b.finish(complete && !b.reply.Failed) })
	return err
}

// Close ends the stream; when the client went away before [DONE], what was
// generated is recorded as incomplete.
func (b *streamBody) Close() error {
	_ = b.end(false)
	return b.src.Close()
}

// eventEnd returns the length of the first whole event in buf (through its
// blank line), or -1. Lines end in \n, \r\n or a lone \r, as the SSE
// specification allows.
func eventEnd(buf []byte) int {
	pos := 0
	for {
		line, next, ok := nextLine(buf, pos)
		if !ok {
			return -1
		}
		pos = next
		if len(line) == 0 {
			return pos
		}
	}
}

// nextLine returns the line that starts at pos and where the next one
// starts; ok is false when the line's end has not arrived yet. A \r at the
// very end of buf ends a line: waiting for a \n that may never come would
// hold an event framed by lone CRs until the upstream sends more. The
// caller keeps in mind that a \n arriving next belongs to that \r.
func nextLine(buf []byte, pos int) (line []byte, next int, ok bool) {
	// Two IndexByte (vectorized) instead of IndexAny, which goes byte by
	// byte: it was a quarter of a stream's framing and decoding.
	rest := buf[pos:]
	i := bytes.IndexByte(rest, '\n')
	if i < 0 {
		i = len(rest)
	}
	if cr := bytes.IndexByte(rest[:i], '\r'); cr >= 0 {
		i = cr
	}
	if i == len(rest) {
		return nil, 0, false
	}
	end := pos + i
	if buf[end] == '\r' && end+1 < len(buf) && buf[end+1] == '\n' {
		return buf[pos:end], end + 2, true
	}
	return buf[pos:end], end + 1, true
}

var doneData = []byte("[DONE]")

// eventData returns the data of an event (its data: lines joined by \n),
// and whether it is the [DONE] sentinel. Data that begins with [DONE] is
// the sentinel whatever follows it, because that is how the official SDKs
// (Go and Python) match it: a client stops reading there, so the proxy
// must have recorded the turn by then.
func eventData(ev []byte) (data []byte, done bool) {
	var parts [][]byte
	for pos := 0; pos < len(ev); {
		line, next, ok := nextLine(ev, pos)
		if !ok {
			line, next = bytes.TrimSuffix(ev[pos:], []byte("\r")), len(ev)
		}
		pos = next
		if v, ok := bytes.CutPrefix(line, []byte("data:")); ok {
			parts = append(parts, bytes.TrimPrefix(v, []byte(" ")))
		}
	}
	switch len(parts) {
	case 0:
		return nil, false
	case 1:
		data = parts[0]
	default:
		data = bytes.Join(parts, []byte("\n"))
	}
	return data, bytes.HasPrefix(data, doneData)
}

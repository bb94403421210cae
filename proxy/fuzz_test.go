package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	pathpkg "path"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/historyproxy/historyproxy/history"
)

// Seed corpora live in testdata/fuzz/<FuzzName>/; run one target with
//
//	go test -run '^$' -fuzz '^FuzzStreamBody$' -fuzztime 60s ./proxy/
//
// A failing input is written there and then runs with every go test.

// fzMaxErrMessage bounds an error message, whatever the input's size.
const fzMaxErrMessage = 512

// fzCheckPart checks one part of a resolved session id against the
// documented contract: 1 to 128 bytes of valid UTF-8, only letters, digits
// and "._@+-=", so never ':', '*' (the shared marker), '/', ',',
// whitespace or a control character.
func fzCheckPart(t *testing.T, what, v string) {
	t.Helper()
	if len(v) < 1 || len(v) > 128 {
		t.Fatalf("%s %q: got %d bytes, want 1..128", what, v, len(v))
	}
	if !utf8.ValidString(v) {
		t.Fatalf("%s %q: got invalid UTF-8, want valid", what, v)
	}
	for _, r := range v {
		switch {
		case r == ':' || r == '*' || r == '/' || r == ',' || r == utf8.RuneError:
			t.Fatalf("%s %q: got %q, want no separator, marker or replacement character", what, v, r)
		case unicode.IsSpace(r) || unicode.IsControl(r) || unicode.Is(unicode.Cf, r):
			t.Fatalf("%s %q: got space, control or format character %U, want none", what, v, r)
		case unicode.IsLetter(r) || unicode.IsDigit(r) || strings.ContainsRune("._@+-=", r):
		default:
			t.Fatalf("%s %q: got %q, want only letters, digits and ._@+-=", what, v, r)
		}
	}
}

func fzCheckSessionError(t *testing.T, e *apiError) {
	t.Helper()
	if e.Status != http.StatusBadRequest || e.Code != "invalid_session_id" || e.Type != "invalid_request_error" {
		t.Fatalf("got %d %s %s, want 400 invalid_request_error invalid_session_id", e.Status, e.Type, e.Code)
	}
	if len(e.Message) > fzMaxErrMessage {
		t.Fatalf("got an error message of %d bytes, want at most %d whatever the input", len(e.Message), fzMaxErrMessage)
	}
	if !utf8.ValidString(e.Message) {
		t.Fatalf("got error message %q, want valid UTF-8 (it is written into a JSON body)", e.Message)
	}
}

// FuzzResolveSession: any headers, path and body user give either a 400
// invalid_session_id or a session whose id is three valid parts; the path
// prefix, when taken, is exactly /s/{channel}/{user}/{agent} and the rest.
func FuzzResolveSession(f *testing.F) {
	f.Add("chat:john@example.com:support", "", "", "", uint8(1), "/v1/chat/completions", "")
	f.Add("", "web", "u1", "sales", uint8(28), "/s/web/p/sales/v1/chat/completions", "bob")
	f.Add("", "", "", "", uint8(0), "/s/web/jürgen/sales/v1/models", "x")
	f.Fuzz(func(t *testing.T, sid, ch, us, ag string, set uint8, path, bodyUser string) {
		ps, rest, perr := parsePathSession(path)
		switch {
		case perr != nil:
			fzCheckSessionError(t, perr)
			if !strings.HasPrefix(path, "/s/") {
				t.Fatalf("path %q: got an error, want none without the /s/ prefix", path)
			}
			return
		case ps.ok:
			if !strings.HasPrefix(rest, "/") {
				t.Fatalf("path %q: got rest %q, want it to start with /", path, rest)
			}
			prefix := "/s/" + ps.Channel + "/" + ps.User + "/" + ps.Agent
			if !strings.HasPrefix(path, prefix+"/") {
				t.Fatalf("path %q: got prefix %q, want the path to start with it", path, prefix)
			}
			// The rest is cleaned (a trailing slash kept), so ServeMux has
			// no reason to redirect and drop the prefix.
			want := pathpkg.Clean(path[len(prefix):])
			if strings.HasSuffix(path, "/") && want != "/" {
				want += "/"
			}
			if rest != want {
				t.Fatalf("path %q: got rest %q, want %q", path, rest, want)
			}
			if rest != "/v1" && !strings.HasPrefix(rest, "/v1/") {
				t.Fatalf("path %q: got rest %q, want the /v1 API after the three parts", path, rest)
			}
			fzCheckPart(t, "path channel", ps.Channel)
			fzCheckPart(t, "path user", ps.User)
			fzCheckPart(t, "path agent", ps.Agent)
		default:
			if rest != path || strings.HasPrefix(path, "/s/") {
				t.Fatalf("path %q: got no session and rest %q, want the path unchanged and no /s/ prefix", path, rest)
			}
		}

		h := http.Header{}
		if set&1 != 0 {
			h.Add(headerSessionID, sid)
			if set&2 != 0 {
				h.Add(headerSessionID, sid)
			}
		}
		if set&4 != 0 {
			h.Add(headerSessionChannel, ch)
		}
		if set&8 != 0 {
			h.Add(headerSessionUser, us)
			if set&32 != 0 {
				h.Add(headerSessionUser, us)
			}
		}
		if set&16 != 0 {
			h.Add(headerSessionAgent, ag)
		}
		s, ok, err := resolveSession(h, ps, bodyUser, "api", "default")
		if err != nil {
			fzCheckSessionError(t, err)
			return
		}
		fzCheckPart(t, "channel", s.Channel)
		fzCheckPart(t, "agent", s.Agent)
		if !ok {
			if s.User != "" {
				t.Fatalf("got stateless with user %q, want no user", s.User)
			}
			return
		}
		fzCheckPart(t, "user", s.User)
		id := s.ID()
		if parts := strings.Split(id, ":"); len(parts) != 3 {
			t.Fatalf("got id %q with %d parts, want 3", id, len(parts))
		}
		// Where the id came from: X-Session-ID names all three parts;
		// otherwise each part comes from the first source that names it.
		switch {
		case set&3 == 1:
			if id != sid {
				t.Fatalf("got id %q, want X-Session-ID %q", id, sid)
			}
		case set&3 == 3:
			t.Fatalf("got id %q from a repeated X-Session-ID, want an error", id)
		default:
			for _, c := range []struct {
				name, got   string
				header      bool
				hv, pv, def string
			}{
				{"channel", s.Channel, set&4 != 0, ch, ps.Channel, "api"},
				{"user", s.User, set&8 != 0, us, ps.User, bodyUser},
				{"agent", s.Agent, set&16 != 0, ag, ps.Agent, "default"},
			} {
				want := c.def
				switch {
				case c.header:
					want = c.hv
				case ps.ok:
					want = c.pv
				}
				if c.got != want {
					t.Fatalf("got %s %q, want %q (header %v, path %v)", c.name, c.got, want, c.header, ps.ok)
				}
			}
		}
	})
}

// fzSSE is an independent reading of a whole SSE stream: its whole events
// (each through its blank line; lines end in LF, CRLF or a lone CR, and
// a CR LF is one ending however the reads split it) and the incomplete
// rest.
func fzSSE(in []byte) (events [][]byte, rest []byte) {
	start, lineStart := 0, 0
	for pos := 0; pos < len(in); {
		c := in[pos]
		if c != '\n' && c != '\r' {
			pos++
			continue
		}
		blank := pos == lineStart
		if c == '\r' && pos+1 < len(in) && in[pos+1] == '\n' {
			pos++
		}
		pos++
		if blank {
			events = append(events, in[start:pos])
			start = pos
		}
		lineStart = pos
	}
	return events, in[start:]
}

// fzData is an event's data: its "data:" lines without the field name and
// one optional space, joined by "\n"; ok is false when it has none. Lines
// end in LF, CRLF or a lone CR.
func fzData(ev []byte) (data string, ok bool) {
	var parts []string
	norm := strings.NewReplacer("\r\n", "\n", "\r", "\n").Replace(string(ev))
	for _, line := range strings.Split(norm, "\n") {
		if v, found := strings.CutPrefix(line, "data:"); found {
			parts = append(parts, strings.TrimPrefix(v, " "))
		}
	}
	return strings.Join(parts, "\n"), len(parts) > 0
}

// fzStreamWant is what the client must receive from upstream bytes in.
type fzStreamWant struct {
	out          []byte
	done         bool // a whole data: [DONE] event came
	doneAt       int  // where the first [DONE] event starts in out
	finishReason bool // a whole chunk had a finish_reason for choice 0
	content      string
}

func fzExpectStream(in []byte, hide bool) fzStreamWant {
	var w fzStreamWant
	events, rest := fzSSE(in)
	for _, ev := range events {
		data, ok := fzData(ev)
		switch {
		case ok && strings.HasPrefix(data, "[DONE]"):
			if !w.done {
				w.done, w.doneAt = true, len(w.out)
			}
		case ok:
			var c chunk
			if json.Unmarshal([]byte(data), &c) == nil {
				for _, ch := range c.Choices {
					if ch.Index != 0 {
						continue
					}
					if ch.Delta.Content != nil {
						w.content += *ch.Delta.Content
					}
					if ch.FinishReason != nil && *ch.FinishReason != "" {
						w.finishReason = true
					}
				}
				if hide && c.Usage != nil && len(c.Choices) == 0 {
					continue // the usage-only chunk: dropped whole
				}
			}
		}
		w.out = append(w.out, ev...)
	}
	// At the end of the stream, data: [DONE] without its blank line still
	// ends the reply.
	if data, ok := fzData(rest); ok && strings.HasPrefix(data, "[DONE]") && !w.done {
		w.done, w.doneAt = true, len(w.out)
	}
	w.out = append(w.out, rest...)
	return w
}

// fzSizes turns fuzz bytes into upstream read sizes of 1 to 64 bytes.
func fzSizes(b []byte) []int {
	sizes := make([]int, len(b))
	for i, c := range b {
		sizes[i] = int(c)%64 + 1
	}
	return sizes
}

// FuzzStreamBody: whatever the upstream sends, split into whatever reads,
// the client gets exactly those bytes (less the whole usage-only events
// when hidden), finish runs exactly once, with complete as [DONE] or a
// finish_reason at EOF say, and before the [DONE] bytes reach the client.
func FuzzStreamBody(f *testing.F) {
	f.Add([]byte(sbEvents(sbRole, sbHello, sbStop, sbUsage, sbDone)), []byte{0, 7, 200}, false)
	f.Add([]byte(strings.ReplaceAll(sbToolCalls, "\n", "\r\n")), []byte{1}, true)
	f.Fuzz(func(t *testing.T, in, sizes []byte, hide bool) {
		want := fzExpectStream(in, hide)
		src := &sbReader{data: bytes.Clone(in), sizes: fzSizes(sizes), eofWithData: len(sizes)%2 == 1}
		var read int
		fin := &sbFinish{read: &read}
		r := &reply{}
		b := newStreamBody(src, hide, r, sbNow, fin.finish)
		bufSize := 32 << 10
		if len(sizes) > 0 {
			bufSize = int(sizes[0])*8 + 1
		}
		got, err := sbRelay(b, bufSize, &read)
		if err != nil {
			t.Fatalf("got error %v, want the stream to end at EOF", err)
		}
		if !bytes.Equal(got, want.out) {
			t.Fatalf("hide=%v: got\n%q\nwant\n%q", hide, got, want.out)
		}
		if fin.calls != 1 {
			t.Fatalf("got %d finish calls at EOF, want 1", fin.calls)
		}
		if wantComplete := want.done || want.finishReason; fin.complete != wantComplete {
			t.Fatalf("got complete %v, want %v (done %v, finish_reason %v)", fin.complete, wantComplete, want.done, want.finishReason)
		}
		if want.done && fin.readAt > want.doneAt {
			t.Fatalf("finish ran when the client had read %d bytes, want at most %d (where [DONE] starts)", fin.readAt, want.doneAt)
		}
		if got := r.Content.String(); got != want.content {
			t.Fatalf("got content %q, want %q", got, want.content)
		}
		if calls := r.toolCallsJSON(); calls != nil && !json.Valid(calls) {
			t.Fatalf("got tool calls %q, want valid JSON", calls)
		}
		if err := b.Close(); err != nil {
			t.Fatalf("got Close error %v, want none", err)
		}
		if fin.calls != 1 || src.closed != 1 {
			t.Fatalf("after Close: got %d finish calls and %d upstream closes, want 1 and 1", fin.calls, src.closed)
		}

		// The same bytes as one chunk: assembling a reply never panics and
		// yields valid tool calls JSON.
		var c chunk
		if json.Unmarshal(in, &c) == nil {
			r := &reply{}
			r.add(&c, sbNow())
			r.add(&c, sbNow())
			if calls := r.toolCallsJSON(); calls != nil && !json.Valid(calls) {
				t.Fatalf("got tool calls %q, want valid JSON", calls)
			}
			if len(r.calls) > 1025 {
				t.Fatalf("got %d tool calls, want at most 1025", len(r.calls))
			}
		}
	})
}

// fzHistory is the history the rewrite fuzz injects, and fzHistoryJSON the
// same messages as the API takes them.
var fzHistory = []history.Message{
	{ID: "1-0", Role: history.RoleUser, Content: "What's the weather in Paris?"},
	{ID: "1-1", Role: history.RoleAssistant, ContentNull: true,
		ToolCalls: json.RawMessage(`[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]`)},
	{ID: "1-2", Role: history.RoleTool, Content: "18C", ToolCallID: "call_1"},
	{ID: "1-3", Role: history.RoleAssistant, Content: "It is 18C in <Paris> & sunny."},
	{ID: "1-4", Role: history.RoleUser, Name: "ann", Parts: json.RawMessage(`[{"type":"text","text":"and this?"},{"type":"image_url","image_url":{"url":"https://example.com/a.png"}}]`)},
	{ID: "1-5", Role: history.RoleAssistant, Content: "", Refusal: "I can't help with that."},
}

const fzHistoryJSON = `[
 {"role":"user","content":"What's the weather in Paris?"},
 {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
 {"role":"tool","content":"18C","tool_call_id":"call_1"},
 {"role":"assistant","content":"It is 18C in <Paris> & sunny."},
 {"role":"user","name":"ann","content":[{"type":"text","text":"and this?"},{"type":"image_url","image_url":{"url":"https://example.com/a.png"}}]},
 {"role":"assistant","content":"","refusal":"I can't help with that."}
]`

// FuzzParseChat: parseChat never panics and rejects with an OpenAI-shaped
// 400; what it accepts is rewritten into valid JSON whose messages are the
// leading system and developer messages, the injected history, then the
// rest, with every other top-level field unchanged in value (stream_options
// gains include_usage:true on a stream whose client did not ask for it).
func FuzzParseChat(f *testing.F) {
	f.Add([]byte(`{"model":"gpt-4o","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`))
	f.Add([]byte(`{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false,"x":1},"messages":[{"role":"developer","content":"d"},{"role":"user","content":[{"type":"text","text":"look"}]}]}`))
	var want []any
	if err := json.Unmarshal([]byte(fzHistoryJSON), &want); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		orig := bytes.Clone(body)
		_, aerr := parseChat(body, limits{})
		if aerr != nil {
			if aerr.Status != http.StatusBadRequest || aerr.Code == "" || aerr.Type != "invalid_request_error" {
				t.Fatalf("got %d %s %s, want a 400 invalid_request_error with a code", aerr.Status, aerr.Type, aerr.Code)
			}
			return
		}
		if !bytes.Equal(body, orig) {
			t.Fatalf("parseChat changed the body")
		}
		in, err := fzDecode(orig)
		if err != nil {
			t.Fatalf("parseChat accepted %q, which is not a JSON object: %v", orig, err)
		}
		msgs, ok := in["messages"].([]any)
		if !ok || len(msgs) == 0 {
			t.Fatalf("parseChat accepted messages %v, want a non-empty array", in["messages"])
		}
		// The message limit counts without decoding: it must agree.
		if _, aerr := parseChat(body, limits{Messages: len(msgs)}); aerr != nil {
			t.Fatalf("at the limit of %d messages: got %s", len(msgs), aerr.Code)
		}
		if _, aerr := parseChat(body, limits{Messages: len(msgs) - 1}); len(msgs) > 1 && (aerr == nil || aerr.Code != "too_many_messages") {
			t.Fatalf("over the limit of %d messages: got %v, want too_many_messages", len(msgs)-1, aerr)
		}
		lead := 0
		for i, m := range msgs {
			obj, ok := m.(map[string]any)
			if !ok {
				t.Fatalf("parseChat accepted messages[%d] = %v, want an object", i, m)
			}
			if role := obj["role"]; lead == i && (role == "system" || role == "developer") {
				lead++
			}
		}
		stream := in["stream"] == true
		so, _ := in["stream_options"].(map[string]any)
		force := stream && so["include_usage"] != true

		for _, inject := range [][]history.Message{nil, fzHistory} {
			req, aerr := parseChat(orig, limits{})
			if aerr != nil {
				t.Fatalf("a second parse failed: %v", aerr)
			}
			out, err := req.body(orig, inject)
			if err != nil {
				t.Fatalf("got rewrite error %v, want none", err)
			}
			if inject == nil && !force && !bytes.Equal(out, orig) {
				t.Fatalf("with nothing to change: got %q, want the body as sent", out)
			}
			got, err := fzDecode(out)
			if err != nil {
				t.Fatalf("got invalid JSON %q: %v", out, err)
			}
			wantMsgs := msgs
			if inject != nil {
				wantMsgs = append(append(append([]any{}, msgs[:lead]...), want...), msgs[lead:]...)
			}
			if !fzJSONEqual(got["messages"], wantMsgs) {
				t.Fatalf("lead %d: got messages\n%s\nwant\n%s", lead, fzJSON(got["messages"]), fzJSON(wantMsgs))
			}
			if force {
				gso, _ := got["stream_options"].(map[string]any)
				if gso["include_usage"] != true {
					t.Fatalf("got stream_options %v, want include_usage true", got["stream_options"])
				}
				for k, v := range so {
					if k != "include_usage" && !fzJSONEqual(gso[k], v) {
						t.Fatalf("stream_options.%s: got %v, want %v", k, gso[k], v)
					}
				}
				wantLen := len(so)
				if _, ok := so["include_usage"]; !ok {
					wantLen++
				}
				if len(gso) != wantLen {
					t.Fatalf("got stream_options %v, want %v plus include_usage", gso, so)
				}
			}
			for k, v := range in {
				if k == "messages" || (force && k == "stream_options") {
					continue
				}
				if !fzJSONEqual(got[k], v) {
					t.Fatalf("field %q: got %s, want %s", k, fzJSON(got[k]), fzJSON(v))
				}
			}
			for k := range got {
				if _, ok := in[k]; !ok && !(force && k == "stream_options") {
					t.Fatalf("got new field %q, want none", k)
				}
			}
		}
	})
}

// fzDecode decodes one JSON object, numbers kept as written (so 1e400 or
// a 30-digit integer, valid JSON the proxy passes on, compare too).
func fzDecode(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v map[string]any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("data after the object: %v", err)
	}
	if v == nil {
		return nil, errors.New("null, not an object")
	}
	return v, nil
}

// fzJSONEqual compares decoded JSON values.
func fzJSONEqual(a, b any) bool {
	return bytes.Equal(fzJSON(a), fzJSON(b))
}

func fzJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

package proxy

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseChatLimits(t *testing.T) {
	msg := `{"role":"user","content":"x"}`
	partsMsg := func(n int) string {
		return `{"role":"user","content":[` + strings.TrimSuffix(strings.Repeat(`{"type":"text","text":"a,b"},`, n), ",") + `]}`
	}
	body := func(msgs ...string) []byte {
		return []byte(`{"model":"m","messages":[` + strings.Join(msgs, ",") + `]}`)
	}
	calls := func(n int) string {
		return `{"role":"assistant","content":null,"tool_calls":[` + strings.TrimSuffix(strings.Repeat(`{"id":"c","type":"function","function":{"name":"f","arguments":"[1,2]"}},`, n), ",") + `]}`
	}
	tools := func(n int) []byte {
		return []byte(`{"model":"m","tools":[` + strings.TrimSuffix(strings.Repeat(`{"type":"function","function":{"name":"a,b"}},`, n), ",") + `],"messages":[` + msg + `]}`)
	}
	lim := limits{Messages: 3, Parts: 4, Tools: 2}
	cases := []struct {
		name      string
		body      []byte
		code      string // "" means accepted
		wantParam string
	}{
		{"at the message limit", body(msg, msg, msg), "", ""},
		{"one message over", body(msg, msg, msg, msg), "too_many_messages", "messages"},
		{"at the part limit over messages", body(partsMsg(2), partsMsg(2)), "", ""},
		{"one part over in one message", body(partsMsg(5)), "too_many_content_parts", "messages[0].content"},
		{"one part over across messages", body(partsMsg(2), msg, partsMsg(3)), "too_many_content_parts", "messages[2].content"},
		{"string content is no part", body(msg, msg, partsMsg(4)), "", ""},
		{"at the tool limit", tools(2), "", ""},
		{"one tool over", tools(3), "too_many_tools", "tools"},
		{"at the tool call limit over messages", body(calls(1), msg, calls(1)), "", ""},
		{"one tool call over in one message", body(msg, calls(3)), "too_many_tool_calls", "messages[1].tool_calls"},
		{"one tool call over across messages", body(calls(1), msg, calls(2)), "too_many_tool_calls", "messages[2].tool_calls"},
		{"bad JSON still a type error", []byte(`{"messages":{"a":1}}`), "invalid_type", "messages"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseChat(tc.body, lim)
			if tc.code == "" {
				require.Nil(t, err)
				return
			}
			require.NotNil(t, err)
			require.Equal(t, tc.code, err.Code, err.Message)
			require.Equal(t, tc.wantParam, err.Param)
		})
	}
	_, err := parseChat(body(msg, msg, msg, msg, partsMsg(9), calls(9)), limits{})
	require.Nil(t, err, "zero limits bound nothing")
}

// BenchmarkParseChatRefused: a request far over max_request_messages,
// max_request_content_parts or max_request_tools is refused without an
// allocation per message, part, tool or tool call (the whole body is still
// decoded once, to find its fields).
func BenchmarkParseChatRefused(b *testing.B) {
	msg := `{"role":"user","content":""}`
	part := `{"type":"text","text":""}`
	for _, bc := range []struct{ name, body, code string }{
		{"messages=700000", `{"model":"m","messages":[` + strings.Repeat(msg+",", 700_000-1) + msg + `]}`, "too_many_messages"},
		{"parts=600000", `{"model":"m","messages":[{"role":"user","content":[` + strings.Repeat(part+",", 600_000-1) + part + `]}]}`, "too_many_content_parts"},
		{"tools=6000000", `{"model":"m","tools":[` + strings.Repeat("{},", 6_000_000-1) + `{}],"messages":[` + msg + `]}`, "too_many_tools"},
		{"tool_calls=6000000", `{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[` + strings.Repeat("{},", 6_000_000-1) + `{}]}]}`, "too_many_tool_calls"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			body := []byte(bc.body)
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := parseChat(body, limits{Messages: 4096, Parts: 4096, Tools: 4096}); err == nil || err.Code != bc.code {
					b.Fatalf("got %v, want %s", err, bc.code)
				}
			}
		})
	}
}

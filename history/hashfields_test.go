package history

import (
	"context"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// readmeSessionFields returns the fields README.md lists for the session
// hash, in its Redis layout table.
func readmeSessionFields(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile("../README.md")
	mustNoErr(t, err)
	row := regexp.MustCompile("(?m)^\\| `hp:\\{S\\}:session` \\| hash \\| (.*) \\|$").FindStringSubmatch(string(data))
	if row == nil {
		t.Fatal("README.md has no row for hp:{S}:session")
	}
	var fields []string
	for _, m := range regexp.MustCompile("`([a-z_]+)`").FindAllStringSubmatch(row[1], -1) {
		fields = append(fields, m[1])
	}
	slices.Sort(fields)
	return slices.Compact(fields)
}

// TestSessionHashHasEveryListedField: the session hash holds every field
// the README lists, 0 included, from a session's first turn on, whether
// that turn recorded messages or only usage (read-only, a repeat); and no
// field the README does not list.
func TestSessionHashHasEveryListedField(t *testing.T) {
	want := readmeSessionFields(t)
	if len(want) < 10 {
		t.Fatalf("README lists only %v", want)
	}
	c := redistest.Start(t).Client(t)
	s := NewRedis(c, "hf")
	ctx := context.Background()
	now := time.Now().UnixMilli()
	turns := map[string]Turn{
		"hf:messages:a": {NowMs: now, Usage: Usage{PromptTokens: 10, CompletionTokens: 2, Requests: 1},
			Messages: []Message{{Role: RoleUser, Content: "hi", Tokens: 4}, {Role: RoleAssistant, Content: "hello", Tokens: 5}}},
		"hf:usage:a":   {NowMs: now, Usage: Usage{PromptTokens: 10, Requests: 1}},
		"hf:nothing:a": {NowMs: now},
	}
	for session, turn := range turns {
		t.Run(session, func(t *testing.T) {
			_, err := s.Append(ctx, session, turn, Policy{})
			mustNoErr(t, err)
			h, err := c.HGetAll(ctx, s.sessionKeys(session)[0]).Result()
			mustNoErr(t, err)
			var got []string
			for k := range h {
				got = append(got, k)
			}
			slices.Sort(got)
			if !slices.Equal(got, want) {
				t.Errorf("session hash fields:\ngot  %s\nwant %s (README)", strings.Join(got, " "), strings.Join(want, " "))
			}
			for _, zero := range []string{"cached_tokens", "history_tokens", "cost_nanos"} {
				if h[zero] != "0" {
					t.Errorf("%s: got %q, want \"0\"", zero, h[zero])
				}
			}
			// The fields read back as the session's metadata.
			sess, ok, err := s.Session(ctx, session)
			mustNoErr(t, err)
			if !ok || sess.CreatedMs != now || sess.Totals.Requests != turn.Usage.Requests || sess.MessageCount != int64(len(turn.Messages)) {
				t.Errorf("Session: got %+v (found %v)", sess, ok)
			}
		})
	}
}

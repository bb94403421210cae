package history

import (
	"context"
	"reflect"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/historyproxy/historyproxy/internal/redistest"
)

// beforeSwap is a go-redis hook that runs write once, just before the
// first script call whose arguments hold marker: between what Migrate read
// and the swap that ends the session's migration.
type beforeSwap struct {
	marker string
	write  func(ctx context.Context)
	done   bool
}

func (h *beforeSwap) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *beforeSwap) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *beforeSwap) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		name := strings.ToLower(cmd.Name())
		if !h.done && (name == "evalsha" || name == "eval") && strings.Contains(cmd.String(), h.marker) {
			h.done = true
			h.write(ctx)
		}
		return next(ctx, cmd)
	}
}

// TestRedisMigrateKeepsOldWritesDuringItsCopy: during a rolling upgrade
// a proxy of the old version may still write to a session's old layout
// while Migrate copies it (the late turn TestRedisMigrateOldEntriesAfterCurrentOnes
// lets in before the copy starts, landing instead between the copy and
// the swap). The swap deletes the old streams; what was written to them
// after they were read must not go with them: an acknowledged turn is
// never lost. The same holds for a conversation the old version began
// meanwhile (a new member of the old set, with its own stream).
func TestRedisMigrateKeepsOldWritesDuringItsCopy(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(ctx context.Context, c redis.UniversalClient)
		conv  string
		want  []string
	}{
		{"a late turn in an old stream", func(ctx context.Context, c redis.UniversalClient) {
			for i, text := range []string{"late question", "late answer"} {
				mustNoErr(t, c.XAdd(ctx, &redis.XAddArgs{Stream: "hp:{" + session + "}:conv:c1", ID: "5001-" + string(rune('0'+i)), Values: []any{
					"role", []string{RoleUser, RoleAssistant}[i], "content", text, "kind", KindMessage, "status", StatusComplete,
				}}).Err())
			}
		}, "c1", []string{"old question", "old answer", "late question", "late answer"}},
		{"a new old conversation", func(ctx context.Context, c redis.UniversalClient) {
			oldConversation(t, c, "hp", session, "c2", 6000, []string{"6000-0", "6000-1"}, []string{"new question", "new answer"}, 0)
		}, "c2", []string{"new question", "new answer"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			srv := redistest.Start(t)
			c := srv.Client(t)
			other := srv.Client(t)
			oldConversation(t, c, "hp", session, "c1", 5000, []string{"5000-0", "5000-1"}, []string{"old question", "old answer"}, 0)
			mustNoErr(t, c.HSet(ctx, "hp:{"+session+"}:session", "conversation", "c1", "is_active", "1", "created_ms", 5000,
				"last_active_ms", 5001, "messages", 2, "conversations", 1).Err())
			mustNoErr(t, c.ZAdd(ctx, "hp:sessions", redis.Z{Score: 5001, Member: session}).Err())
			hook := &beforeSwap{marker: "c1:start", write: func(ctx context.Context) { tc.write(ctx, other) }}
			c.AddHook(hook)
			s := NewRedis(c, "")
			_, err := s.Migrate(ctx, nil)
			mustNoErr(t, err)
			if !hook.done {
				t.Fatal("the old version's write never ran: no swap seen")
			}
			// Whatever this run did, the old version's write is kept: in the
			// current layout, or in the old one for the next run.
			_, err = s.Migrate(ctx, nil)
			mustNoErr(t, err)
			got, err := s.Messages(ctx, session, tc.conv)
			mustNoErr(t, err)
			if !reflect.DeepEqual(contents(got), tc.want) {
				t.Errorf("%s after the migration: got %q, want %q", tc.conv, contents(got), tc.want)
			}
		})
	}
}

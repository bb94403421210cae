package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/openai/openai-go"
	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// twoTurns runs two turns through the program and returns the second
// reply, which echoes how many messages reached the upstream.
func twoTurns(t *testing.T, p *program, session string) string {
	t.Helper()
	c := p.client(session)
	for _, q := range []string{"first", "second"} {
		res, err := c.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
			Model: openai.ChatModelGPT4oMini, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(q)},
		})
		require.NoError(t, err)
		if q == "second" {
			return res.Choices[0].Message.Content
		}
	}
	return ""
}

func TestRedisClusterFromConfigFile(t *testing.T) {
	cl := redistest.StartCluster(t)
	up := fakeai.New(t)
	cfg := filepath.Join(t.TempDir(), "historyproxy.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("redis:\n  cluster_addrs: ['"+strings.Join(cl.Addrs, "', '")+"']\n"), 0o600))
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "-config", cfg)
	require.Equal(t, "echo: second [messages=3]", twoTurns(t, p, "chat:ann:cluster"))
	n, err := cl.Client(t).XLen(context.Background(), "hp:{chat:ann:cluster}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 4, n)
}

func TestRedisACLUser(t *testing.T) {
	rs := redistest.Start(t)
	admin := rs.Client(t)
	ctx := context.Background()
	require.NoError(t, admin.Do(ctx, "ACL", "SETUSER", "historyproxy", "on", ">s3cret", "~hp:*", "+@all").Err())
	up := fakeai.New(t)
	url := strings.Replace(rs.URL, "redis://", "redis://historyproxy:s3cret@", 1)
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL, "HISTORYPROXY_REDIS_URL": url})
	require.Equal(t, "echo: second [messages=3]", twoTurns(t, p, "chat:ann:acl"))
	require.NotContains(t, p.stderr.String(), "s3cret", "the password is never logged")

	// A wrong password leaves the store unusable: served without history
	// (fail open); the queued turns are given up at the end of the drain, and
	// run says so.
	cfg := filepath.Join(t.TempDir(), "historyproxy.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("redis:\n  url: '"+strings.Replace(rs.URL, "redis://", "redis://historyproxy:wrong@", 1)+"'\n"), 0o600))
	bad := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "-config", cfg, "-drain-timeout", "1s")
	require.Equal(t, "echo: second [messages=1]", twoTurns(t, bad, "chat:bob:acl"), "served without history (fail open)")
	require.ErrorContains(t, bad.stopErr(t), "2 turns could not be stored", "the lost turns are reported")
}

package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/historyproxy/historyproxy/internal/fakeai"
	"github.com/historyproxy/historyproxy/internal/redistest"
)

// TestRedisSentinelFromConfigFile: the program finds the master through a
// real Sentinel named in the config file, and the conversation lands on
// that master.
func TestRedisSentinelFromConfigFile(t *testing.T) {
	master := redistest.Start(t)
	sn := redistest.StartSentinel(t, master, "mymaster")
	up := fakeai.New(t)
	cfg := filepath.Join(t.TempDir(), "historyproxy.yaml")
	require.NoError(t, os.WriteFile(cfg, []byte("redis:\n  sentinel_master: mymaster\n  sentinel_addrs: ['"+sn.Addr+"']\n"), 0o600))
	p := start(t, map[string]string{"HISTORYPROXY_UPSTREAM": up.URL}, "-config", cfg)
	require.Contains(t, p.stderr.String(), "redis sentinel mymaster", "the start-up log names the store")
	require.Equal(t, "echo: second [messages=3]", twoTurns(t, p, "chat:ann:sentinel"))
	n, err := master.Client(t).XLen(context.Background(), "hp:{chat:ann:sentinel}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 4, n)
}

// TestRedisTLSWithSystemRoots runs the real binary against a TLS-only
// Redis whose certificate a test CA signed: the binary trusts the CA
// through SSL_CERT_FILE (read by crypto/x509 on Linux), as it would a
// private CA installed on the host. Without the CA the certificate is
// refused and the proxy serves without history (fail open).
func TestRedisTLSWithSystemRoots(t *testing.T) {
	buildBinary(t) // skips in -short mode before anything starts
	rs := redistest.Start(t, redistest.WithTLS())
	up := fakeai.New(t)

	b := startBinary(t, []string{"SSL_CERT_FILE=" + rs.CAFile}, "-upstream", up.URL, "-redis-url", rs.URL)
	require.Contains(t, b.stderr.String(), "rediss://127.0.0.1:", "the start-up log names the TLS store")
	// twoTurns needs only the proxy address of a program.
	require.Equal(t, "echo: second [messages=3]", twoTurns(t, &program{addrs: addrs{Proxy: b.addr}}, "chat:ann:tls"))
	n, err := rs.Client(t).XLen(context.Background(), "hp:{chat:ann:tls}:messages").Result()
	require.NoError(t, err)
	require.EqualValues(t, 4, n)

	// The same binary without the CA refuses the certificate and serves
	// without history (fail open); nothing reaches Redis.
	untrusted := startBinary(t, []string{"SSL_CERT_FILE=", "SSL_CERT_DIR="},
		"-upstream", up.URL, "-redis-url", rs.URL, "-drain-timeout", "500ms")
	require.Equal(t, "echo: second [messages=1]", twoTurns(t, &program{addrs: addrs{Proxy: untrusted.addr}}, "chat:bob:tls"))
	require.Contains(t, untrusted.stderr.String(), "certificate signed by unknown authority")
	n, err = rs.Client(t).Exists(context.Background(), "hp:{chat:bob:tls}:messages").Result()
	require.NoError(t, err)
	require.Zero(t, n, "nothing was written without a trusted connection")
}

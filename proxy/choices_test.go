package proxy

import (
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestOtherChoicesDoNotCutChoiceZero: with n > 1, the choices past 0 are
// held only to estimate usage. Their bytes must not count against the
// bound of the reply the proxy records: a stream whose choice 1 is longer
// than that bound still records choice 0 whole and complete.
func TestOtherChoicesDoNotCutChoiceZero(t *testing.T) {
	delta := func(index int, s string, finish string) string {
		f := "null"
		if finish != "" {
			f = `"` + finish + `"`
		}
		return fmt.Sprintf(`{"choices":[{"index":%d,"delta":{"content":%q},"finish_reason":%s}]}`, index, s, f)
	}
	events := []string{delta(0, "Hello", "")}
	for range 128 { // 128 KiB of choice 1: twice the bound below
		events = append(events, delta(1, strings.Repeat("y", 1024), ""))
	}
	events = append(events, delta(1, "", "stop"), delta(0, " world", "stop"), "[DONE]")
	var read int
	f := &sbFinish{read: &read}
	rp := &reply{}
	b := newStreamBody(&sbReader{data: []byte(sbEvents(events...)), sizes: []int{4096}}, false, rp, sbNow, f.finish)
	b.maxEvent, b.maxReply = 64<<10, 64<<10

	out, err := io.ReadAll(b)
	require.NoError(t, err)
	require.True(t, strings.HasSuffix(string(out), "data: [DONE]\n\n"), "relayed to the end")
	require.NoError(t, b.Close())
	require.Equal(t, 1, f.calls)
	require.True(t, f.complete, "choice 0 ended: the turn is complete")
	require.False(t, rp.Truncated)
	require.Equal(t, "Hello world", rp.Content.String())
}

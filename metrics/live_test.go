package metrics

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// TestOrderingMetricsByChannelAndAgent: lease waits and busy rejections
// are labelled by channel and agent like the request metrics; both
// rejection reasons exist at 0 from a channel and agent's first session
// request; a stateless request observes neither.
func TestOrderingMetricsByChannelAndAgent(t *testing.T) {
	reg := NewRegistry()
	m := New(reg, 100)
	req := func(agent, busy string, ordered bool, wait time.Duration) Request {
		return Request{Channel: "chat", Agent: agent, Model: "gpt-4o", Session: "chat:u:" + agent, Code: 200, Reached: true,
			Busy: busy, Ordered: ordered, LeaseWait: wait}
	}
	m.ObserveRequest(req("support", "", true, 2*time.Second))
	m.ObserveRequest(req("support", "", true, 0))
	m.ObserveRequest(req("support", "reject", false, 0))
	m.ObserveRequest(req("sales", "", false, 0)) // ordering: off
	m.ObserveRequest(Request{Channel: "chat", Agent: "bot", Model: "gpt-4o", Code: 200, Reached: true})

	require.Equal(t, 1.0, testutil.ToFloat64(m.live.busy.WithLabelValues("chat", "support", "reject")))
	require.Equal(t, 0.0, testutil.ToFloat64(m.live.busy.WithLabelValues("chat", "support", "timeout")))
	require.Equal(t, 0.0, testutil.ToFloat64(m.live.busy.WithLabelValues("chat", "sales", "timeout")))
	require.Equal(t, 4, testutil.CollectAndCount(m.live.busy), "two reasons for each of support and sales, none for a stateless request")
	require.Equal(t, 1, testutil.CollectAndCount(m.live.leaseWait), "only support took turns")
	fams, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range fams {
		if f.GetName() != "historyproxy_lease_wait_seconds" {
			continue
		}
		h := f.GetMetric()[0].GetHistogram()
		require.Equal(t, uint64(2), h.GetSampleCount(), "both turns of support")
		require.Equal(t, 2.0, h.GetSampleSum())
		return
	}
	t.Fatal("no historyproxy_lease_wait_seconds")
}

package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// nanoVec is a counter vector of US dollars that adds whole nano-USD in
// integers and divides by 10^9 only when collected. A float counter adding
// each request's dollars would round on every addition (half a micro-USD is
// no exact binary fraction), and the error would grow with the count; here
// the total is exact and only its exposition is rounded, once, to the
// nearest float64. An int64 holds 9.2 × 10^9 USD.
type nanoVec struct {
	desc *prometheus.Desc

	mu     sync.Mutex
	series map[nanoKey]*nanoSeries
}

type nanoSeries struct {
	values []string
	nanos  int64
}

func newNanoVec(desc *prometheus.Desc) *nanoVec {
	return &nanoVec{desc: desc, series: make(map[nanoKey]*nanoSeries)}
}

// maxNanoLabels is the most labels a nanoVec has (channel, agent, model,
// purpose).
const maxNanoLabels = 4

// nanoKey is a series' label values as a map key; a fixed array, so that
// looking a series up allocates nothing.
type nanoKey [maxNanoLabels]string

func keyOf(values []string) nanoKey {
	if len(values) > maxNanoLabels {
		panic("metrics: a nanoVec has at most 4 labels") // a programming error
	}
	var k nanoKey
	copy(k[:], values)
	return k
}

// add adds nanos (ignored when negative: a counter never goes down) to the
// series of values, creating it at 0 first.
func (v *nanoVec) add(nanos int64, values ...string) {
	k := keyOf(values)
	v.mu.Lock()
	defer v.mu.Unlock()
	s, ok := v.series[k]
	if !ok {
		s = &nanoSeries{values: append([]string(nil), values...)}
		v.series[k] = s
	}
	if nanos > 0 {
		s.nanos += nanos
	}
}

// value returns the series' total in nano-USD (tests).
func (v *nanoVec) value(values ...string) int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	if s, ok := v.series[keyOf(values)]; ok {
		return s.nanos
	}
	return 0
}

// delete removes the series of exactly values.
func (v *nanoVec) delete(values ...string) {
	v.mu.Lock()
	delete(v.series, keyOf(values))
	v.mu.Unlock()
}

// deleteMatching removes every series whose i-th label value is value.
func (v *nanoVec) deleteMatching(i int, value string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for k, s := range v.series {
		if s.values[i] == value {
			delete(v.series, k)
		}
	}
}

// Describe implements prometheus.Collector.
func (v *nanoVec) Describe(ch chan<- *prometheus.Desc) { ch <- v.desc }

// Collect implements prometheus.Collector.
func (v *nanoVec) Collect(ch chan<- prometheus.Metric) {
	v.mu.Lock()
	metrics := make([]prometheus.Metric, 0, len(v.series))
	for _, s := range v.series {
		metrics = append(metrics, prometheus.MustNewConstMetric(v.desc, prometheus.CounterValue, float64(s.nanos)/1e9, s.values...))
	}
	v.mu.Unlock()
	for _, m := range metrics {
		ch <- m
	}
}

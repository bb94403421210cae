package metrics

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// describing records the collectors New registers.
type describing struct{ cs []prometheus.Collector }

func (d *describing) Register(c prometheus.Collector) error   { d.cs = append(d.cs, c); return nil }
func (d *describing) MustRegister(cs ...prometheus.Collector) { d.cs = append(d.cs, cs...) }
func (d *describing) Unregister(prometheus.Collector) bool    { return false }

// TestReadmeMetricTable: the README's metrics table names exactly the
// metrics the proxy registers, each with its labels.
func TestReadmeMetricTable(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	start := strings.Index(text, "| metric | labels | what |")
	if start < 0 {
		t.Fatal("README.md has no metrics table")
	}
	table := text[start:]
	table = table[:strings.Index(table, "\n\n")]
	documented := map[string][]string{} // name -> labels
	name := regexp.MustCompile("`(historyproxy_[a-z_]+)(\\{[a-z_,]+\\})?`")
	for _, line := range strings.Split(table, "\n")[2:] {
		cols := strings.Split(line, "|")
		if len(cols) != 5 {
			t.Fatalf("README metrics row %q: got %d columns, want 3", line, len(cols)-2)
		}
		var labels []string
		for _, l := range strings.Split(cols[2], ",") {
			if l = strings.TrimSpace(l); l != "" {
				labels = append(labels, l)
			}
		}
		for _, m := range name.FindAllStringSubmatch(cols[1], -1) {
			ls := labels
			if m[2] != "" { // historyproxy_x_total{result}
				ls = strings.Split(strings.Trim(m[2], "{}"), ",")
			}
			documented[m[1]] = ls
		}
	}

	var reg describing
	New(&reg, 0).WindowCacheOn(func() (int64, int) { return 0, 0 }) // a Redis store's, when on
	descs := make(chan *prometheus.Desc, 100)
	for _, c := range reg.cs {
		c.Describe(descs)
	}
	close(descs)
	fq := regexp.MustCompile(`fqName: "([^"]+)".*variableLabels: \{([^}]*)\}`)
	for d := range descs {
		m := fq.FindStringSubmatch(d.String())
		if m == nil {
			t.Fatalf("cannot read %s", d)
		}
		var labels []string
		if m[2] != "" {
			labels = strings.Split(m[2], ",")
		}
		want, ok := documented[m[1]]
		if !ok {
			t.Errorf("README's metrics table lacks %s", m[1])
			continue
		}
		delete(documented, m[1])
		slices.Sort(labels)
		slices.Sort(want)
		if !slices.Equal(labels, want) {
			t.Errorf("%s: README says labels %v, the metric has %v", m[1], want, labels)
		}
	}
	for name := range documented {
		t.Errorf("README's metrics table lists %s, which the proxy does not export", name)
	}
}

package harness

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// row is one path's rounds in a scenario.
type row struct {
	name   string
	rounds []result
}

// loadTable is a scenario's table, header first. Every figure is the
// median over the rounds; a difference or ratio to another path is taken
// within each round first (the paths of a round ran back to back), then
// its median. "+p50" is the latency a path adds to going direct; "÷floor"
// columns divide by the floor's figure.
func loadTable(rows []row, stream bool) [][]string {
	out := [][]string{{"path", "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "TTFB ms",
		"CPU µs/req", "Redis µs/req", "peak RSS MB", "req/s ÷floor", "+p50 ÷floor", "+p99 ÷floor", "CPU ÷floor"}}
	direct, floor := find(rows, pathDirect), find(rows, pathFloor)
	for _, r := range rows {
		rate := series(r, func(x result) float64 { return x.rate })
		p50 := series(r, func(x result) float64 { return ms(x.p50) })
		p99 := series(r, func(x result) float64 { return ms(x.p99) })
		cpu := series(r, func(x result) float64 { return us(x.cpu) })
		added50, added99 := "-", "-"
		ratio50, ratio99, ratioCPU := "-", "-", "-"
		if direct != nil && r.name != pathDirect {
			a50, a99 := diff(p50, series(*direct, func(x result) float64 { return ms(x.p50) })),
				diff(p99, series(*direct, func(x result) float64 { return ms(x.p99) }))
			added50, added99 = fmt.Sprintf("%+.2f", median(a50)), fmt.Sprintf("%+.2f", median(a99))
			if floor != nil {
				f50 := diff(series(*floor, func(x result) float64 { return ms(x.p50) }), series(*direct, func(x result) float64 { return ms(x.p50) }))
				f99 := diff(series(*floor, func(x result) float64 { return ms(x.p99) }), series(*direct, func(x result) float64 { return ms(x.p99) }))
				ratio50, ratio99 = ratio(a50, f50), ratio(a99, f99)
				ratioCPU = ratio(cpu, series(*floor, func(x result) float64 { return us(x.cpu) }))
			}
		}
		ratioRate := "-"
		if floor != nil {
			ratioRate = ratio(rate, series(*floor, func(x result) float64 { return x.rate }))
		}
		ttfb, redisCPU := "-", "-"
		if stream {
			ttfb = fmt.Sprintf("%.2f", median(series(r, func(x result) float64 { return ms(x.ttfb) })))
		}
		if r.rounds[0].redisCPU >= 0 {
			redisCPU = fmt.Sprintf("%.0f", median(series(r, func(x result) float64 { return us(x.redisCPU) })))
		}
		peak := slices.Max(series(r, func(x result) float64 { return float64(x.peakBytes) }))
		out = append(out, []string{r.name, fmt.Sprintf("%.0f", median(rate)),
			fmt.Sprintf("%.2f", median(p50)), fmt.Sprintf("%.2f", median(p99)), added50, added99, ttfb,
			fmt.Sprintf("%.0f", median(cpu)), redisCPU, fmt.Sprintf("%.1f", peak/(1<<20)),
			ratioRate, ratio50, ratio99, ratioCPU})
	}
	return out
}

func find(rows []row, name string) *row {
	for i := range rows {
		if rows[i].name == name {
			return &rows[i]
		}
	}
	return nil
}

func series(r row, f func(result) float64) []float64 {
	out := make([]float64, len(r.rounds))
	for i, x := range r.rounds {
		out[i] = f(x)
	}
	return out
}

// diff is a - b, round by round.
func diff(a, b []float64) []float64 {
	out := make([]float64, len(a))
	for i := range a {
		out[i] = a[i] - b[i]
	}
	return out
}

// ratio is the median of a / b over the rounds where b is positive,
// formatted; "-" when there is none.
func ratio(a, b []float64) string {
	var q []float64
	for i := range a {
		if b[i] > 0 {
			q = append(q, a[i]/b[i])
		}
	}
	if len(q) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", median(q))
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(xs))
	if n := len(s); n%2 == 1 {
		return s[n/2]
	} else {
		return (s[n/2-1] + s[n/2]) / 2
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// writeTable prints a title and a table (header first), as aligned text
// or as Markdown, ready to paste into the README.
func writeTable(w io.Writer, title string, cells [][]string, markdown bool) {
	if markdown {
		fmt.Fprintf(w, "**%s**\n\n", title)
		for i, r := range cells {
			fmt.Fprintf(w, "| %s |\n", strings.Join(r, " | "))
			if i == 0 {
				sep := make([]string, len(r))
				for j := range sep {
					sep[j] = "---:"
				}
				sep[0] = "---"
				fmt.Fprintf(w, "|%s|\n", strings.Join(sep, "|"))
			}
		}
		return
	}
	fmt.Fprintln(w, title)
	// The path left-aligned, the figures right-aligned.
	widths := make([]int, len(cells[0]))
	for _, r := range cells {
		for j, c := range r {
			widths[j] = max(widths[j], utf8.RuneCountInString(c))
		}
	}
	for _, r := range cells {
		var b strings.Builder
		for j, c := range r {
			pad := strings.Repeat(" ", widths[j]-utf8.RuneCountInString(c))
			if j == 0 {
				b.WriteString(c + pad)
			} else {
				b.WriteString("  " + pad + c)
			}
		}
		fmt.Fprintln(w, b.String())
	}
}

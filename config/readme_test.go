package config

import (
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestReadmeFlagTable: the README's configuration table lists every flag
// with its variable, its YAML key and its default, as the program has them.
func TestReadmeFlagTable(t *testing.T) {
	data, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	start := strings.Index(text, "| flag | environment | YAML | default |")
	if start < 0 {
		t.Fatal("README.md has no flag table")
	}
	table := text[start:]
	table = table[:strings.Index(table, "\n\n")]
	cell := regexp.MustCompile("^`([^`]*)`")
	rows := map[string][]string{}
	for _, line := range strings.Split(table, "\n")[2:] {
		cols := strings.Split(line, "|")
		if len(cols) != 6 {
			t.Fatalf("README flag table row %q has %d columns, want 4", line, len(cols)-2)
		}
		cols = cols[1:5]
		for i, c := range cols {
			cols[i] = strings.TrimSpace(c)
		}
		rows[strings.Trim(cols[0], "`")] = cols
	}
	def := Default()
	for _, s := range settings {
		row, ok := rows["-"+s.flag]
		if !ok {
			t.Errorf("README flag table lacks -%s", s.flag)
			continue
		}
		delete(rows, "-"+s.flag)
		if got, want := row[1], "`"+EnvPrefix+s.env+"`"; got != want {
			t.Errorf("-%s: README says variable %s, want %s", s.flag, got, want)
		}
		wantKey := ""
		if s.key != "" {
			wantKey = "`" + s.key + "`"
		}
		if row[2] != wantKey {
			t.Errorf("-%s: README says YAML %q, want %q", s.flag, row[2], wantKey)
		}
		var want string
		if s.get != nil {
			want = s.get(def)
		}
		m := cell.FindStringSubmatch(row[3])
		switch {
		case want == "":
			if !strings.HasPrefix(row[3], "none") {
				t.Errorf("-%s: README default %q, want none", s.flag, row[3])
			}
		case m == nil:
			t.Errorf("-%s: README default %q, want `%s`", s.flag, row[3], want)
		default:
			got := m[1]
			if d, err := time.ParseDuration(got); err == nil {
				got = d.String()
			}
			if got != want {
				t.Errorf("-%s: README default %q, want %q", s.flag, m[1], want)
			}
		}
	}
	for flag := range rows {
		t.Errorf("README flag table lists %s, which is not a flag", flag)
	}
}

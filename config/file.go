package config

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// loadFile decodes the YAML file at path over cfg. Keys the file leaves out
// keep their current value. Every problem is returned, each naming the key
// by its YAML path and line and saying what would be valid: a key Config
// does not know (a misspelt key would otherwise be ignored without a word),
// and a value of the wrong kind. yaml.v3's own messages name Go types
// ("cannot unmarshal !!int into time.Duration"), which mean nothing to
// someone editing the file, so the document is checked against Config
// before it is decoded.
//
// where maps the YAML path of every key the file sets (store.timeout,
// upstream.passthrough[1]) to the file and line that set it, so that a
// problem validation finds later in a value from the file names its line.
//
// given is how the path was given (-config or HISTORYPROXY_CONFIG), which
// a file that cannot be read is reported under.
func loadFile(cfg *Config, path, given string) (errs []error, where map[string]string) {
	data, err := os.ReadFile(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err // the path is in the message already
		}
		return []error{fmt.Errorf("%s: cannot read %q: %w", given, path, err)}, nil
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		// A syntax error: yaml.v3 says where ("yaml: line 3: ...").
		return []error{fmt.Errorf("config file %s: %w", path, err)}, nil
	}
	if doc.Kind == 0 { // an empty file
		return nil, nil
	}
	fc := fileChecker{path: path, where: map[string]string{}}
	fc.check(&doc, reflect.TypeFor[Config](), "")
	// Decode even when the check found problems, so that the values that
	// are right still reach validation and all problems show at once.
	// Whatever the decoder rejects, the check has reported in better words.
	dec := doc.Decode(cfg)
	if len(fc.errs) == 0 && dec != nil {
		return []error{fmt.Errorf("config file %s: %w", path, dec)}, fc.where
	}
	return fc.errs, fc.where
}

// fileChecker walks a YAML document alongside the type it decodes into.
type fileChecker struct {
	path  string
	errs  []error
	where map[string]string // YAML path -> "file line N"
}

// at is how a problem on node n's line is located: "file line N".
func (fc *fileChecker) at(n *yaml.Node) string { return fmt.Sprintf("%s line %d", fc.path, n.Line) }

var durationType = reflect.TypeFor[time.Duration]()

// addf records a problem with the key at field (a YAML path) on node n's
// line.
func (fc *fileChecker) addf(field string, n *yaml.Node, format string, args ...any) {
	fc.errs = append(fc.errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...), Where: fc.at(n)})
}

func (fc *fileChecker) check(n *yaml.Node, t reflect.Type, field string) {
	for n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml.DocumentNode {
		if len(n.Content) > 0 {
			fc.check(n.Content[0], t, field)
		}
		return
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // an empty value keeps what was there
	}
	name := field
	if name == "" {
		name = "the top level"
	}
	switch {
	case t == durationType:
		fc.duration(n, field)
	case t.Kind() == reflect.Struct:
		if n.Kind != yaml.MappingNode {
			fc.addf(name, n, "must be a mapping of keys (%s)", strings.Join(structKeys(t), ", "))
			return
		}
		fc.mapping(n, field, func(key string, v *yaml.Node) {
			f, ok := fieldByKey(t, key)
			if !ok {
				keys := structKeys(t)
				hint := ""
				if k, ok := closest(key, keys); ok {
					hint = fmt.Sprintf(" (did you mean %s?)", k)
				}
				fc.addf(join(field, key), v, "unknown key%s; %s takes %s", hint, name, strings.Join(keys, ", "))
				return
			}
			fc.check(v, f.Type, join(field, key))
		})
	case t.Kind() == reflect.Map:
		if n.Kind != yaml.MappingNode {
			fc.addf(name, n, "must be a mapping of names to entries")
			return
		}
		fc.mapping(n, field, func(key string, v *yaml.Node) {
			fc.check(v, t.Elem(), join(field, key))
		})
	case t.Kind() == reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			fc.addf(name, n, "must be a list, like [\"host:6379\"]")
			return
		}
		for i, e := range n.Content {
			elem := fmt.Sprintf("%s[%d]", field, i)
			fc.where[elem] = fc.at(e)
			fc.check(e, t.Elem(), elem)
		}
	default:
		fc.scalar(n, t, field)
	}
}

// mapping calls each for every key of a mapping node, reporting keys set
// twice and following merge keys (<<).
func (fc *fileChecker) mapping(n *yaml.Node, field string, each func(key string, v *yaml.Node)) {
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			fc.addf(join(field, "?"), k, "a key must be a plain name")
			continue
		}
		if k.Tag == "!!merge" {
			for v.Kind == yaml.AliasNode {
				v = v.Alias
			}
			srcs := []*yaml.Node{v}
			if v.Kind == yaml.SequenceNode {
				srcs = v.Content
			}
			for _, s := range srcs {
				for s.Kind == yaml.AliasNode {
					s = s.Alias
				}
				if s.Kind == yaml.MappingNode {
					fc.mapping(s, field, each)
				}
			}
			continue
		}
		if line, dup := seen[k.Value]; dup {
			fc.addf(join(field, k.Value), k, "is set twice (first on line %d)", line)
			continue
		}
		seen[k.Value] = k.Line
		fc.where[join(field, k.Value)] = fc.at(k)
		each(k.Value, v)
	}
}

// duration accepts a Go duration written with its unit. A bare number is
// refused: read as nanoseconds it would be a mistake every time.
func (fc *fileChecker) duration(n *yaml.Node, field string) {
	if n.Kind != yaml.ScalarNode {
		fc.addf(field, n, "must be a duration, like \"30s\"")
		return
	}
	if n.Tag == "!!int" || n.Tag == "!!float" {
		fc.addf(field, n, "%s is not a duration: write it with its unit, like \"%ss\" for seconds", n.Value, n.Value)
		return
	}
	if _, err := time.ParseDuration(n.Value); err != nil {
		fc.addf(field, n, "%q is not a duration (like \"500ms\", \"30s\", \"10m\" or \"720h\")", n.Value)
	}
}

// scalar checks a plain value by decoding it alone into its field's type.
func (fc *fileChecker) scalar(n *yaml.Node, t reflect.Type, field string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem() // an optional value (enabled: in an agents entry)
	}
	want := map[reflect.Kind]string{
		reflect.Bool: "true or false", reflect.String: "a string",
		reflect.Int: "a whole number", reflect.Int64: "a whole number",
		reflect.Float64: "a number",
	}[t.Kind()]
	if want == "" {
		want = "a " + t.Kind().String()
	}
	if n.Kind != yaml.ScalarNode {
		fc.addf(field, n, "must be %s", want)
		return
	}
	err := n.Decode(reflect.New(t).Interface())
	if err == nil && n.Tag == "!!float" && (t.Kind() == reflect.Int || t.Kind() == reflect.Int64) {
		// yaml.v3 cuts a fraction off silently (4000.7 becomes 4000);
		// only a float with none (1e6) is a whole number.
		var f float64
		if n.Decode(&f) == nil && f != math.Trunc(f) {
			err = errors.New("fraction")
		}
	}
	if err != nil {
		shown := n.Value
		if n.Tag == "!!str" {
			shown = strconv.Quote(n.Value)
		}
		fc.addf(field, n, "%s is not %s", shown, want)
	}
}

// fieldByKey finds the field of struct t whose YAML key is key.
func fieldByKey(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		if f := t.Field(i); yamlKey(f) == key {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// structKeys lists the YAML keys of struct t, in declaration order.
func structKeys(t reflect.Type) []string {
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		if k := yamlKey(t.Field(i)); k != "" {
			keys = append(keys, k)
		}
	}
	return keys
}

func yamlKey(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if name == "-" {
		return ""
	}
	return name
}

func join(field, key string) string {
	if field == "" {
		return key
	}
	return field + "." + key
}

// closest returns the key a misspelt one most likely meant: one that
// starts with it, or one at most two edits away.
func closest(key string, keys []string) (string, bool) {
	best, bestD := "", 3
	for _, k := range keys {
		if strings.HasPrefix(k, key) || strings.HasPrefix(key, k) {
			return k, true
		}
		if d := editDistance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best, best != ""
}

// editDistance is the Levenshtein distance of a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

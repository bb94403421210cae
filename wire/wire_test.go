package wire

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestArrayLen(t *testing.T) {
	for _, raw := range []string{
		`[]`, ` [ ] `, `[1]`, `[1,2,3]`, `[null]`, `[true,false]`, `[""]`, `["a,b","c"]`,
		`["\"",","]`, `["\\",1]`, `["\\\"]",2]`, `[{"a":[1,2,{"b":","}]},[3,4],"x"]`,
		"[\n\t{}\r\n,\n[]\n]", `[{"role":"user","content":[{"type":"text","text":"[,]"}]}]`,
		`["é,ü","\u002c"]`, `[-1.5e3,0]`,
	} {
		var want []json.RawMessage
		require.NoError(t, json.Unmarshal([]byte(raw), &want), raw)
		require.Equal(t, len(want), ArrayLen([]byte(strings.TrimSpace(raw))), raw)
	}
}

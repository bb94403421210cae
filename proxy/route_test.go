package proxy

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"unicode"

	"github.com/stretchr/testify/require"
)

func TestCanonicalPath(t *testing.T) {
	cases := []struct {
		name, in      string
		wantDec, want string // want "" means refused
	}{
		{"plain", "/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions"},
		{"root", "/", "/", "/"},
		{"trailing slash", "/v1/chat/completions/", "/v1/chat/completions", "/v1/chat/completions"},
		{"doubled slashes", "//v1//models///", "/v1/models", "/v1/models"},
		{"escapes kept", "/v1/files/a%3Fb%23c%20d", "/v1/files/a?b#c d", "/v1/files/a%3Fb%23c%20d"},
		{"colons of a fine-tuned model", "/v1/models/ft:gpt-4o-mini:org::id", "/v1/models/ft:gpt-4o-mini:org::id", "/v1/models/ft:gpt-4o-mini:org::id"},
		{"dots inside a segment", "/v1/models/llama-3.1..8b", "/v1/models/llama-3.1..8b", "/v1/models/llama-3.1..8b"},
		{"percent sign", "/v1/files/100%25", "/v1/files/100%", "/v1/files/100%25"},
		{"non-ASCII", "/v1/files/%C3%A9t%C3%A9", "/v1/files/été", "/v1/files/%C3%A9t%C3%A9"},

		{"dot-dot resolved", "/v1/../internal", "/internal", "/internal"},
		{"dot-dot above the root", "/../../v1/models", "/v1/models", "/v1/models"},
		{"dot resolved", "/v1/./models/.", "/v1/models", "/v1/models"},
		{"dot-dot after an escape", "/v1/files/a%3Fb/../c", "/v1/files/c", "/v1/files/c"},
		{"encoded dot-dot", "/v1/%2e%2e/internal", "", ""},
		{"encoded dot-dot upper", "/v1/%2E%2E/internal", "", ""},
		{"half encoded dot-dot", "/v1/.%2e/internal", "", ""},
		{"double encoded dot-dot", "/v1/%252e%252e/internal", "", ""},
		{"encoded slash", "/v1/chat%2Fcompletions", "", ""},
		{"encoded slash lower", "/v1/..%2f..%2finternal", "", ""},
		{"double encoded slash", "/v1/chat%252Fcompletions", "", ""},
		{"triple encoded dot-dot", "/v1/%25252e%25252e/internal", "", ""},
		{"four times encoded slash", "/v1/chat%2525252Fcompletions", "", ""},
		{"encoded percent before a bad escape", "/v1/files/100%25zz", "/v1/files/100%zz", "/v1/files/100%25zz"},
		{"fullwidth full stops", "/v1/%EF%BC%8E%EF%BC%8E/internal", "", ""},
		{"two dot leader", "/v1/%E2%80%A5/internal", "", ""},
		{"fullwidth solidus", "/v1/chat%EF%BC%8Fcompletions", "", ""},
		{"fullwidth percent", "/v1/%EF%BC%852e%EF%BC%852e/internal", "", ""},
		{"small reverse solidus", "/v1/..%EF%B9%A8internal", "", ""},
		{"three dots", "/v1/.../internal", "", ""},
		{"dot-dot and a space", "/v1/..%20/internal", "", ""},
		{"trailing dot", "/v1/chat/completions.", "", ""},
		{"trailing space", "/v1/chat/completions%20", "", ""},
		{"backslash", `/v1/chat\completions`, "", ""},
		{"encoded backslash", "/v1/..%5c..%5cinternal", "", ""},
		{"semicolon", "/v1/chat/completions;x", "", ""},
		{"encoded semicolon", "/v1/chat/completions%3bx", "", ""},
		{"NUL", "/v1/models%00", "", ""},
		{"newline", "/v1/models%0a", "", ""},
		{"DEL", "/v1/models%7f", "", ""},
		{"overlong dot", "/v1/%c0%ae%c0%ae/internal", "", ""},
		{"bad escape", "/v1/models%zz", "", ""},
		{"not absolute", "v1/models", "", ""},
		{"empty", "", "", ""},
		{"asterisk", "*", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dec, esc, err := canonicalPath(tc.in)
			if tc.want == "" {
				require.NotNil(t, err, "got %q, want refused", dec)
				require.Equal(t, "invalid_path", err.Code)
				require.Equal(t, http.StatusBadRequest, err.Status)
				return
			}
			require.Nil(t, err)
			require.Equal(t, tc.wantDec, dec)
			require.Equal(t, tc.want, esc)
		})
	}
}

func TestEndpointsAllow(t *testing.T) {
	def, err := newEndpoints(DefaultPassthrough)
	require.NoError(t, err)
	star, err := newEndpoints([]string{"GET /v1/models", "*"})
	require.NoError(t, err)
	cases := []struct {
		name        string
		e           *endpoints
		method, url string
		want        bool
	}{
		{"default: chat", def, http.MethodPost, "/v1/chat/completions", true},
		{"default: stored completions", def, http.MethodGet, "/v1/chat/completions", false},
		{"default: a stored completion", def, http.MethodGet, "/v1/chat/completions/c1", false},
		{"default: models", def, http.MethodGet, "/v1/models", true},
		{"default: a model", def, http.MethodGet, "/v1/models/gpt-4o", true},
		{"default: a model id with a slash", def, http.MethodGet, "/v1/models/meta-llama/Llama-3", true},
		{"default: HEAD models", def, http.MethodHead, "/v1/models", true},
		{"default: delete a model", def, http.MethodDelete, "/v1/models/ft:x", false},
		{"default: embeddings", def, http.MethodPost, "/v1/embeddings", true},
		{"default: moderations", def, http.MethodPost, "/v1/moderations", true},
		{"default: files", def, http.MethodGet, "/v1/files", false},
		{"default: responses", def, http.MethodPost, "/v1/responses", false},
		{"default: the base", def, http.MethodGet, "/v1", false},
		{"default: case differs", def, http.MethodGet, "/v1/Models", false},
		{"star", star, http.MethodDelete, "/v1/files/f1", true},
		{"nil allows all", nil, http.MethodPost, "/v1/batches", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, tc.url, nil)
			require.Equal(t, tc.want, tc.e.allows(r))
		})
	}
	_, err = newEndpoints([]string{"GET /v1/models", "GET /v1/models"})
	require.ErrorContains(t, err, "GET /v1/models")
}

// TestNFKCSeparators: the table holds exactly the characters whose NFKC
// form contains ".", "/", "\", ";" or "%" (listed from Python's
// unicodedata, Unicode 14), and nothing of the ASCII range or letters
// around them.
func TestNFKCSeparators(t *testing.T) {
	want := []rune{0x37e, 0x2024, 0x2025, 0x2026, 0x2100, 0x2101, 0x2105, 0x2106,
		0x2488, 0x2489, 0x248a, 0x248b, 0x248c, 0x248d, 0x248e, 0x248f, 0x2490, 0x2491, 0x2492, 0x2493,
		0x2494, 0x2495, 0x2496, 0x2497, 0x2498, 0x2499, 0x249a, 0x249b, 0x33c2, 0x33c7, 0x33d8,
		0xfe14, 0xfe19, 0xfe30, 0xfe52, 0xfe54, 0xfe68, 0xfe6a, 0xff05, 0xff0e, 0xff0f, 0xff1b, 0xff3c, 0x1f100}
	var got []rune
	for r := rune(0); r <= 0x10ffff; r++ {
		if unicode.Is(nfkcSeparators, r) {
			got = append(got, r)
		}
	}
	require.Equal(t, want, got)
	for _, s := range []string{"gpt-4o", "été", "模型", "ｇｐｔ"} {
		require.True(t, plainSegment(s), s)
	}
}

func TestMethodInQuery(t *testing.T) {
	for _, tc := range []struct {
		query string
		want  bool
	}{
		{"", false},
		{"api-version=2024-06-01", false},
		{"method=GET", false},
		{"_method=GET", true},
		{"a=1&_method=DELETE", true},
		{".method=GET", true},
		{"_METHOD=GET", true},
		{"_method[]=GET", true},
		{"%5Fmethod=GET", true},
		{"x_method=GET", false},
	} {
		require.Equal(t, tc.want, methodInQuery(tc.query), tc.query)
	}
}

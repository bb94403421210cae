package history

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"
)

// recount is the memory store's size worked out from scratch: what its
// running estimate must always equal.
func recount(s *MemoryStore) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for id, ss := range s.sessions {
		n += int64(memSessionOverhead + len(id))
		for _, m := range ss.stream {
			n += messageBytes(m)
		}
		for k := range ss.idem {
			n += int64(memIdemOverhead + len(k))
		}
		for cid, c := range ss.convs {
			n += int64(memConvOverhead+len(cid)) + int64(len(c.title)+len(c.autoTitle))
		}
	}
	return n
}

func TestMemorySizeEstimateStaysExact(t *testing.T) {
	ctx := context.Background()
	clock := &fakeClock{t: time.UnixMilli(t0)}
	s := NewMemory()
	s.now = clock.Now
	rng := rand.New(rand.NewPCG(1, 2))
	sessions := []string{"c:a:x", "c:b:x", "c:c:y"}
	p := Policy{Retention: time.Hour, IdleTimeout: 10 * time.Minute}
	now := t0
	for i := 0; i < 2000; i++ {
		id := sessions[rng.IntN(len(sessions))]
		now += rng.Int64N(20 * time.Minute.Milliseconds())
		clock.Add(time.Duration(rng.Int64N(int64(20 * time.Minute))))
		switch op := rng.IntN(10); {
		case op < 6:
			key := ""
			if rng.IntN(2) == 0 {
				key = "k" + strconvI(rng.IntN(50))
			}
			msgs := qa(i)
			msgs[0].Content = strings.Repeat("w ", rng.IntN(40))
			_, err := s.Append(ctx, id, Turn{Messages: msgs, NowMs: now, IdempotencyKey: key}, p)
			mustNoErr(t, err)
		case op == 6:
			_, err := s.Reset(ctx, id)
			mustNoErr(t, err)
		case op == 7:
			_, err := s.SetTitle(ctx, id, "", strings.Repeat("t", rng.IntN(30)))
			mustNoErr(t, err)
		case op == 8:
			s.Sweep()
		default:
			if rng.IntN(5) == 0 {
				_, err := s.Erase(ctx, id)
				mustNoErr(t, err)
			}
		}
		if got, want := s.Stats().Bytes, recount(s); got != want {
			t.Fatalf("step %d: got estimate %d, want %d", i, got, want)
		}
	}
}

func TestMemoryCapErasesLeastRecentlyActive(t *testing.T) {
	ctx := context.Background()
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	const cap = 64 << 10
	s := NewMemory(WithMaxBytes(cap), WithLogger(log))
	big := strings.Repeat("x", 1000)
	turn := func(id string, at int64) {
		t.Helper()
		_, err := s.Append(ctx, id, Turn{Messages: []Message{{Role: RoleUser, Content: big}, {Role: RoleAssistant, Content: big}}, NowMs: at}, Policy{})
		mustNoErr(t, err)
	}
	// Sessions 0..n-1 in order of activity; session 0 is touched again
	// last, so it is the most recently active when the cap bites.
	n := 0
	for ; s.Stats().Bytes < cap*8/10; n++ {
		turn("c:u"+strconvI(n)+":a", t0+int64(n))
	}
	turn("c:u0:a", t0+1000)
	if logs.Len() != 0 {
		t.Fatalf("under the cap: got log %q, want none", logs.String())
	}
	for i := n; s.Stats().Bytes <= cap*8/10 || logs.Len() == 0; i++ {
		turn("c:new"+strconvI(i)+":a", t0+2000+int64(i))
		if st := s.Stats(); st.Bytes > cap {
			t.Fatalf("after an append: got %d bytes, want at most the cap %d", st.Bytes, cap)
		}
		if i > 10*n {
			t.Fatal("the cap never bit")
		}
	}
	if !strings.Contains(logs.String(), "memory store over its size cap") || !strings.Contains(logs.String(), "erased_sessions=") {
		t.Errorf("got log %q, want a line saying the cap erased sessions", logs.String())
	}
	if _, ok, _ := s.Session(ctx, "c:u1:a"); ok {
		t.Errorf("the least recently active session is still there")
	}
	if _, ok, _ := s.Session(ctx, "c:u0:a"); !ok {
		t.Errorf("a recently active session was erased")
	}
	if got, want := s.Stats().Bytes, recount(s); got != want {
		t.Errorf("got estimate %d, want %d", got, want)
	}
	if got := s.Stats().Bytes; got > cap/10*9 {
		t.Errorf("after the cap bit: got %d bytes, want at most nine tenths of the cap (%d)", got, cap/10*9)
	}
}

func TestDeriveTitle(t *testing.T) {
	long := strings.Repeat("word ", 30)
	tests := []struct {
		name string
		m    Message
		want string
	}{
		{name: "short", m: Message{Content: "What is my name?"}, want: "What is my name?"},
		{name: "white space collapsed", m: Message{Content: "  a\n\n b\tc  "}, want: "a b c"},
		{name: "cut on a word boundary", m: Message{Content: long}, want: strings.Repeat("word ", 11) + "word…"},
		{name: "exactly sixty", m: Message{Content: strings.Repeat("abcde ", 9) + "abcde"}, want: strings.Repeat("abcde ", 9) + "abcde"},
		{name: "one long word", m: Message{Content: strings.Repeat("é", 100)}, want: strings.Repeat("é", 59) + "…"},
		{name: "content parts", m: Message{Parts: json.RawMessage(`[{"type":"input_audio","input_audio":{}},{"type":"text","text":"Look"},{"type":"text","text":"at this"}]`)}, want: "Look at this"},
		{name: "no text", m: Message{Parts: json.RawMessage(`[{"type":"image_url","image_url":{"url":"x"}}]`)}, want: ""},
		{name: "empty", m: Message{}, want: ""},
	}
	for _, tt := range tests {
		if got := DeriveTitle(tt.m); got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, got, tt.want)
		}
		if n := len([]rune(DeriveTitle(tt.m))); n > titleLen {
			t.Errorf("%s: got %d characters, want at most %d", tt.name, n, titleLen)
		}
	}
}

// TestDeriveTitleCostsTheTitle: a title of a message of megabytes costs
// what the title does, not a slice of every word or the whole text as
// runes.
func TestDeriveTitleCostsTheTitle(t *testing.T) {
	for name, text := range map[string]string{
		"words":    strings.Repeat("word ", 1<<20),
		"one word": strings.Repeat("x", 4<<20),
	} {
		m := Message{Content: text}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		DeriveTitle(m)
		runtime.ReadMemStats(&after)
		if got := after.TotalAlloc - before.TotalAlloc; got > 4<<10 {
			t.Errorf("%s: %d bytes allocated, want at most 4 KiB", name, got)
		}
	}
}

func TestSplitID(t *testing.T) {
	tests := []struct {
		id   string
		want []string
	}{
		{id: "chat:john@example.com:support", want: []string{"chat", "john@example.com", "support"}},
		{id: "web:*:team", want: []string{"web", "*", "team"}},
		{id: "a:b", want: nil},
		{id: "a:b:c:d", want: nil},
		{id: "a::c", want: nil},
		{id: "", want: nil},
	}
	for _, tt := range tests {
		ch, u, a, ok := SplitID(tt.id)
		var got []string
		if ok {
			got = []string{ch, u, a}
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%q: got %q, want %q", tt.id, got, tt.want)
		}
	}
}

func TestCursorRoundTrip(t *testing.T) {
	for _, c := range []cursor{{score: t0, id: "chat:a:b"}, {byCost: true, score: 12345, id: "chat:a:b"}} {
		got, err := parseCursor(c.String(), c.byCost)
		if err != nil || got != c {
			t.Errorf("got %+v, %v, want %+v", got, err, c)
		}
		if _, err := parseCursor(c.String(), !c.byCost); err != ErrBadCursor {
			t.Errorf("%+v read in the other order: got %v, want ErrBadCursor", c, err)
		}
	}
	for _, bad := range []string{"", "!!", "bm9jb2xvbg", "MTIz"} {
		for _, byCost := range []bool{false, true} {
			if _, err := parseCursor(bad, byCost); err != ErrBadCursor {
				t.Errorf("%q: got %v, want ErrBadCursor", bad, err)
			}
		}
	}
}

func TestParseID(t *testing.T) {
	tests := []struct {
		id      string
		want    []string
		wantErr string
	}{
		{id: "chat:john@example.com:support", want: []string{"chat", "john@example.com", "support"}},
		{id: "web:*:team", want: []string{"web", "*", "team"}},
		{id: "wéb:jürgen:支援", want: []string{"wéb", "jürgen", "支援"}},
		{id: "*:a:b", wantErr: `session id part "*" may hold only`},
		{id: "a:b", wantErr: "must be channel:user:agent"},
		{id: "a:b:c:d", wantErr: "must be channel:user:agent"},
		{id: "a::c", wantErr: "is empty"},
		{id: "a:b c:d", wantErr: "may hold only"},
		{id: "a:{b}:c", wantErr: "may hold only"},
		{id: "a:" + strings.Repeat("x", 129) + ":c", wantErr: "longer than 128 bytes"},
		{id: "a:\xff:c", wantErr: "not valid UTF-8"},
	}
	for _, tt := range tests {
		ch, u, a, err := ParseID(tt.id)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%q: got %v, want an error with %q", tt.id, err, tt.wantErr)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual([]string{ch, u, a}, tt.want) {
			t.Errorf("%q: got %q, %q, %q, %v, want %q", tt.id, ch, u, a, err, tt.want)
		}
	}
}

package history

import (
	"errors"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxPartLen is the longest channel, user or agent part of a session id,
// in bytes.
const MaxPartLen = 128

// SharedUser is the user part of a shared agent's session
// ("channel:*:agent"). It is not a valid part of a client's session id,
// so it never collides with a user's own.
const SharedUser = "*"

// CheckPart reports why v cannot be a channel, user or agent part of a
// session id, or nil: a part is 1 to 128 bytes of letters, digits (Unicode
// ones included) and "._@+-=". So no ':' (the separator), no spaces,
// control characters, braces or invalid UTF-8, which keeps ids safe in
// Redis keys and hash tags, Prometheus labels and logs.
func CheckPart(v string) error {
	switch {
	case v == "":
		return errors.New("session id part is empty")
	case len(v) > MaxPartLen:
		return errors.New("session id part is longer than 128 bytes")
	case !utf8.ValidString(v):
		return errors.New("session id part is not valid UTF-8")
	}
	for _, r := range v {
		if !partRune(r) {
			return errors.New("session id part " + quote(v) + " may hold only letters, digits and ._@+-=")
		}
	}
	return nil
}

// partRune allows Unicode letters and digits (international user names)
// and the few punctuation marks that e-mail addresses and ids need.
func partRune(r rune) bool {
	if r < utf8.RuneSelf {
		switch {
		case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z', '0' <= r && r <= '9':
			return true
		}
		return strings.IndexRune("._@+-=", r) >= 0
	}
	return unicode.IsLetter(r) || unicode.IsDigit(r)
}

// ParseID checks a stored session id, "channel:user:agent", and splits it.
// Each part must pass CheckPart, except that the user may be SharedUser.
func ParseID(id string) (channel, user, agent string, err error) {
	parts := strings.Split(id, ":")
	if len(parts) != 3 {
		return "", "", "", errors.New("session id must be channel:user:agent, got " + quote(id))
	}
	for i, p := range parts {
		if i == 1 && p == SharedUser {
			continue
		}
		if err := CheckPart(p); err != nil {
			return "", "", "", err
		}
	}
	return parts[0], parts[1], parts[2], nil
}

// quote shows a value in an error, bounded so a huge value cannot bloat it.
func quote(v string) string {
	if len(v) > 64 {
		return strconv.Quote(v[:64]) + "..."
	}
	return strconv.Quote(v)
}

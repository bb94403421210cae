package metrics

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Session label modes, the values of metrics.session_label.
const (
	SessionLabelID   = "id"   // the session id itself (the default)
	SessionLabelHash = "hash" // channel:<keyed hash>:agent
	SessionLabelOff  = "off"  // no per-session series
)

// MinSessionLabelKey is the shortest key NewSessionLabel accepts for hash
// mode: a short key could be guessed, and with it every label reversed by
// hashing candidate ids.
const MinSessionLabelKey = 16

// maxSessionIDLen is the longest valid session id: three parts of at most
// 128 bytes and two colons. A longer value (never from the proxy, which
// validates ids) is hashed in id mode too, so that it is never cut short
// and never merged with another.
const maxSessionIDLen = 3*128 + 2

// hashLen is how many bytes of the HMAC a hashed label keeps: 128 bits, hex
// encoded, so that two sessions never share a label in practice.
const hashLen = 16

// SessionLabel turns a session id into the value of the "session" label of
// the per-session series. Its zero value is id mode. Build another with
// NewSessionLabel; it is safe for concurrent use.
//
// In id mode the label is the whole id: every valid id (up to 386 bytes)
// has its own series. In hash mode the label is
// "channel:" + hex(HMAC-SHA256(key, id)[:16]) + ":agent": the user part,
// which often holds an e-mail address, is replaced by a keyed hash of the
// whole id, stable across restarts and instances that share the key, so a
// dashboard can still filter by channel and agent and an admin holding the
// key can find the session of a label (by computing Label for candidate
// ids). Without the key a label cannot be traced back by hashing guessed ids.
// In off mode there are no per-session series at all.
type SessionLabel struct {
	mode string // "" is id
	key  []byte
}

// NewSessionLabel returns the labeler for mode (id, hash or off; "" is id).
// Hash mode needs a key of at least MinSessionLabelKey bytes; the other
// modes ignore key.
func NewSessionLabel(mode string, key []byte) (SessionLabel, error) {
	switch mode {
	case "", SessionLabelID:
		return SessionLabel{}, nil
	case SessionLabelOff:
		return SessionLabel{mode: SessionLabelOff}, nil
	case SessionLabelHash:
		if len(key) < MinSessionLabelKey {
			return SessionLabel{}, fmt.Errorf("session label hash: the key has %d bytes, want at least %d", len(key), MinSessionLabelKey)
		}
		return SessionLabel{mode: SessionLabelHash, key: append([]byte(nil), key...)}, nil
	}
	return SessionLabel{}, errors.New("session label: mode " + quote(mode) + " is not one of id, hash, off")
}

// Label returns the label value of session id; ok is false in off mode,
// where no session has series.
func (l SessionLabel) Label(id string) (label string, ok bool) {
	switch {
	case l.mode == SessionLabelOff:
		return "", false
	case l.mode == SessionLabelHash:
		return l.hashed(id), true
	case len(id) > maxSessionIDLen:
		// Not a valid id: hashed (with an empty key) rather than cut.
		return SessionLabel{}.hashed(id), true
	}
	return strings.ToValidUTF8(id, "\uFFFD"), true
}

// hashed is the hash-mode label of id: the hash of the whole id between its
// channel and agent, or the hash alone when id is not channel:user:agent.
func (l SessionLabel) hashed(id string) string {
	mac := hmac.New(sha256.New, l.key)
	mac.Write([]byte(id))
	sum := hex.EncodeToString(mac.Sum(nil)[:hashLen])
	channel, rest, ok1 := strings.Cut(id, ":")
	_, agent, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 || strings.Contains(agent, ":") || len(id) > maxSessionIDLen {
		return sum
	}
	return strings.ToValidUTF8(channel+":"+sum+":"+agent, "\uFFFD")
}

func quote(s string) string { return fmt.Sprintf("%q", s) }

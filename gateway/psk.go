package gateway

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// PSKTable holds the DTLS pre-shared keys of psk_file: for each identity its
// key and the sensors it may post for. It is never changed once parsed; a
// reload builds a new table.
type PSKTable struct {
	ids map[string]pskEntry
}

type pskEntry struct {
	key     []byte
	digest  [sha256.Size]byte // tells a changed key without comparing keys in the open
	sensors []string          // sorted; the identity itself when the line names none
}

// ParsePSK reads a psk_file: one `identity:hexkey` a line, which binds the
// identity to the sensor of the same name, or `identity:hexkey:sensorA,sensorB`
// for those sensors. Blank lines and lines starting with '#' are skipped.
// Every problem is returned, each naming its line; no key is ever quoted.
func ParsePSK(text string) (*PSKTable, error) {
	t := &PSKTable{ids: map[string]pskEntry{}}
	var errs []error
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		bad := func(format string, args ...any) {
			errs = append(errs, fmt.Errorf("line %d: "+format, append([]any{i + 1}, args...)...))
		}
		parts := strings.Split(line, ":")
		if len(parts) < 2 || len(parts) > 3 {
			bad("want identity:hexkey or identity:hexkey:sensor,sensor")
			continue
		}
		id, hexKey := parts[0], parts[1]
		if id == "" || strings.ContainsAny(id, " \t") {
			bad("identity %q is empty or holds spaces", id)
			continue
		}
		if _, dup := t.ids[id]; dup {
			bad("identity %q is listed twice", id)
			continue
		}
		key, err := hex.DecodeString(hexKey)
		if err != nil || len(key) == 0 {
			bad("the key of %q is not hex digits in pairs", id)
			continue
		}
		e := pskEntry{key: key, digest: sha256.Sum256(key), sensors: []string{id}}
		if len(parts) == 3 {
			e.sensors = strings.Split(parts[2], ",")
			if slices.ContainsFunc(e.sensors, func(s string) bool { return s == "" || strings.ContainsAny(s, " \t") }) {
				bad("the sensor list of %q has an empty name or spaces", id)
				continue
			}
			slices.Sort(e.sensors)
		}
		t.ids[id] = e
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return t, nil
}

// Len is the number of identities.
func (t *PSKTable) Len() int {
	if t == nil {
		return 0
	}
	return len(t.ids)
}

func (t *PSKTable) entry(identity string) (pskEntry, bool) {
	if t == nil {
		return pskEntry{}, false
	}
	e, ok := t.ids[identity]
	return e, ok
}

// allows reports whether identity may post for sensor.
func (e pskEntry) allows(sensor string) bool {
	_, ok := slices.BinarySearch(e.sensors, sensor)
	return ok
}

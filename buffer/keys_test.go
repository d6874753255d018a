package buffer

import (
	"bytes"
	"encoding/binary"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// writeKeys appends one message per id, each with its MQTT key kept in a
// window of keep, closes the buffer and returns its key bytes before Close.
func writeKeys(t *testing.T, dir string, keep int, ids ...string) int64 {
	t.Helper()
	b, err := Open(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	m := msg(ClassTelemetry, reading("s1", 1))
	for _, id := range ids {
		m.Key = &Key{Space: "mqtt", ID: []byte(id), Keep: keep}
		mustAppend(t, b, m)
	}
	keyBytes := b.Stats().KeyBytes
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	return keyBytes
}

// TestKeysSurviveReopen: the in-memory key index is rebuilt from the file,
// with the same window, and the key bytes are counted again.
func TestKeysSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	before := writeKeys(t, dir, 3, "a", "b", "c", "d")
	b := openTest(t, dir, Options{})
	m := msg(ClassTelemetry, reading("s1", 1))
	if got := b.Stats().KeyBytes; got != before || got != 3*accountedKey([]byte("a")) {
		t.Fatalf("key bytes after reopen %d, before %d, want %d", got, before, 3*accountedKey([]byte("a")))
	}
	// In this order: "a" is not found, so it is stored and pushes "b" out.
	for _, c := range []struct {
		id   string
		want bool
	}{{"b", true}, {"d", true}, {"a", false}} {
		m.Key = &Key{Space: "mqtt", ID: []byte(c.id), Check: true, Keep: 3}
		if res := mustAppend(t, b, m); res.Duplicate != c.want {
			t.Errorf("key %q after reopen: duplicate %v, want %v", c.id, res.Duplicate, c.want)
		}
	}
}

// TestKeysFromOldLayout: a file written before the index (an id -> order
// bucket beside the order bucket, and a stored byte count) opens with its
// keys intact and the old bucket and count removed.
func TestKeysFromOldLayout(t *testing.T) {
	dir := t.TempDir()
	writeKeys(t, dir, 10, "kept")
	db, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		kb, err := tx.CreateBucket([]byte("k:mqtt"))
		if err != nil {
			return err
		}
		if err := kb.Put([]byte("kept"), seqKey(1)); err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keyKeyBytes, binary.BigEndian.AppendUint64(nil, 999))
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	b := openTest(t, dir, Options{})
	if got, want := b.Stats().KeyBytes, accountedKey([]byte("kept")); got != want {
		t.Fatalf("key bytes %d, want %d", got, want)
	}
	m := msg(ClassTelemetry, reading("s1", 1))
	m.Key = &Key{Space: "mqtt", ID: []byte("kept"), Check: true, Keep: 10}
	if res := mustAppend(t, b, m); !res.Duplicate {
		t.Fatal("key of the old layout not found")
	}
	err = b.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("k:mqtt")) != nil {
			t.Error("old key bucket still there")
		}
		if tx.Bucket(bucketMeta).Get(keyKeyBytes) != nil {
			t.Error("old key byte count still there")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestKeyIndexRollback: a transaction that fails leaves the index as it was.
func TestKeyIndexRollback(t *testing.T) {
	b := &Buffer{keys: map[string]map[keyID]uint64{"mqtt": {fingerprint([]byte("old")): 1}}}
	tx := &txn{b: b}
	tx.setKey("mqtt", fingerprint([]byte("new")), 2)
	tx.setKey("mqtt", fingerprint([]byte("old")), 0)
	tx.setKey("coap", fingerprint([]byte("other")), 3)
	tx.setKey("mqtt", fingerprint([]byte("new")), 4)
	tx.rollback()
	if got := b.keys["mqtt"]; len(got) != 1 || got[fingerprint([]byte("old"))] != 1 {
		t.Fatalf("mqtt index after rollback: %v", got)
	}
	if got := b.keys["coap"]; len(got) != 0 {
		t.Fatalf("coap index after rollback: %v", got)
	}
}

// TestKeyFingerprintCollision: with every id sharing one fingerprint, a new
// message is never taken for a redelivery (the id on file is compared); the
// cost of a collision is at most a redelivery stored twice.
func TestKeyFingerprintCollision(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{})
	b.fp = func([]byte) keyID { return 7 }
	m := msg(ClassTelemetry, reading("s1", 1))
	m.Key = &Key{Space: "coap", ID: []byte("first"), Keep: 10}
	mustAppend(t, b, m)
	m.Key = &Key{Space: "coap", ID: []byte("never stored"), Check: true, Keep: 10}
	if res := mustAppend(t, b, m); res.Duplicate || res.Stored != 1 {
		t.Fatalf("new id sharing a fingerprint: %+v, want stored", res)
	}
	m.Key = &Key{Space: "coap", ID: []byte("never stored"), Check: true, Keep: 10}
	if res := mustAppend(t, b, m); !res.Duplicate {
		t.Fatalf("redelivery of the latest id: %+v, want duplicate", res)
	}
}

func TestFingerprint(t *testing.T) {
	ids := [][]byte{nil, []byte("a"), []byte("a\x00"), []byte("b"), bytes.Repeat([]byte("x"), 40)}
	seen := map[keyID][]byte{}
	for _, id := range ids {
		f := fingerprint(id)
		if other, dup := seen[f]; dup {
			t.Errorf("ids %q and %q share fingerprint %x", other, id, f)
		}
		seen[f] = id
		if f != fingerprint(bytes.Clone(id)) {
			t.Errorf("fingerprint of %q not stable", id)
		}
	}
}

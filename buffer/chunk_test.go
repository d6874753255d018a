package buffer

import (
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestChunkGolden pins the chunk layouts: a change to these bytes is a
// format change.
func TestChunkGolden(t *testing.T) {
	cases := encodingCases()
	var records chunkBuilder
	records.start(41, nil, 0)
	for _, name := range []string{"number", "string"} {
		r := cases[name]
		records.add(AppendRecord(nil, &r))
	}
	var keys keyBuilder
	keys.add(7, time.Date(2026, 3, 1, 8, 30, 0, 0, time.UTC).UnixMicro(), []byte("peer-1"), 0)
	keys.add(8, time.Date(2026, 3, 1, 8, 30, 1, 0, time.UTC).UnixMicro(), []byte{0, 0xff}, 0)
	for name, got := range map[string][]byte{"chunk-two-records": records.b, "key-chunk-two-keys": keys.chunk.b} {
		path := filepath.Join("testdata", name+".hex")
		if *update {
			if err := os.WriteFile(path, []byte(hex.EncodeToString(got)+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got) != strings.TrimSpace(string(want)) {
			t.Errorf("%s:\n got %x\nwant %s", name, got, want)
		}
	}
	var seqs []uint64
	for seq, rec := range chunkRecords(41, 43, records.b) {
		if _, err := DecodeRecord(rec); err != nil {
			t.Fatalf("record %d: %v", seq, err)
		}
		seqs = append(seqs, seq)
	}
	if len(seqs) != 2 || seqs[0] != 41 || seqs[1] != 42 {
		t.Fatalf("records at %v, want 41 and 42", seqs)
	}
	var ids []string
	for order, e := range keyEntries(7, keys.chunk.b) {
		ids = append(ids, string(e.id))
		if order != uint64(6+len(ids)) {
			t.Fatalf("key %q at order %d", e.id, order)
		}
	}
	if len(ids) != 2 || ids[0] != "peer-1" {
		t.Fatalf("keys %q", ids)
	}
}

// FuzzChunkRecords: whatever a queue value holds, every sequence number of
// its span comes out once, in order, and a record is part of the value.
func FuzzChunkRecords(f *testing.F) {
	r := encodingCases()["number"]
	var c chunkBuilder
	c.start(1, nil, 0)
	c.add(AppendRecord(nil, &r))
	c.add([]byte{1, 2, 3})
	f.Add(c.b, uint8(2))
	f.Add(AppendRecord(nil, &r), uint8(1))
	f.Add([]byte{chunkTag, 0, 0, 0, 9, 200}, uint8(9))
	f.Add(AppendRecord(nil, &r), uint8(0)) // a bare record in an empty span yields nothing
	f.Fuzz(func(t *testing.T, v []byte, span uint8) {
		next := uint64(100)
		for seq, rec := range chunkRecords(100, 100+uint64(span), v) {
			if seq != next {
				t.Fatalf("sequence %d after %d", seq, next-1)
			}
			next++
			if len(rec) > len(v) {
				t.Fatalf("record of %d bytes from a value of %d", len(rec), len(v))
			}
		}
		if next != 100+uint64(span) {
			t.Fatalf("%d records for a span of %d", next-100, span)
		}
		for range keyEntries(1, v) {
		}
	})
}

// TestPartlySentChunk: an Ack inside a chunk moves the head, which survives
// a reopen; the chunk goes once its last record is acknowledged.
func TestPartlySentChunk(t *testing.T) {
	dir := t.TempDir()
	b := openTest(t, dir, Options{})
	mustAppend(t, b, msg(ClassTelemetry, readings("s1", 10)...))
	batch, _ := b.Peek(4)
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	bytesBefore := b.Stats().Bytes
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b = openTest(t, dir, Options{})
	st := b.Stats()
	if st.Readings != 6 || !st.Oldest.Equal(t0.Add(4*time.Second)) || st.Bytes != bytesBefore {
		t.Fatalf("after reopen: %d readings, oldest %v, %d bytes; want 6, %v, %d", st.Readings, st.Oldest, st.Bytes, t0.Add(4*time.Second), bytesBefore)
	}
	batch, _ = b.Peek(100)
	if len(batch.Records) != 6 || batch.Records[0].Seq != 5 || batch.Records[0].Reading.Number != 4 {
		t.Fatalf("after reopen: %d records from seq %d", len(batch.Records), batch.Records[0].Seq)
	}
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	if st := b.Stats(); st.Readings != 0 || st.Bytes != 0 {
		t.Fatalf("all acknowledged: %d readings, %d bytes left", st.Readings, st.Bytes)
	}
}

// TestDamagedChunkIsCountedExactly: a chunk whose framing is damaged loses
// the records after the damage, each counted once as corrupt, and the queue
// goes on with the next chunk.
func TestDamagedChunkIsCountedExactly(t *testing.T) {
	dir := t.TempDir()
	b := openTest(t, dir, Options{})
	mustAppend(t, b, msg(ClassTelemetry, readings("s1", 5)...))
	mustAppend(t, b, msg(ClassTelemetry, reading("s1", 5)))
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		q := tx.Bucket(queueBucket(ClassTelemetry))
		v := append([]byte(nil), q.Get(seqKey(1))...)
		// The third record's length runs past the value.
		first, w := binary.Uvarint(v[chunkHeaderLen:])
		second, w2 := binary.Uvarint(v[chunkHeaderLen+w+int(first):])
		third := chunkHeaderLen + w + int(first) + w2 + int(second)
		v[third] = 0x7f
		return q.Put(seqKey(1), v[:third+3])
	})
	if cerr := db.Close(); err != nil || cerr != nil {
		t.Fatal(err, cerr)
	}
	b = openTest(t, dir, Options{})
	batch, err := b.Peek(100)
	if err != nil {
		t.Fatal(err)
	}
	if len(batch.Records) != 2 || batch.Last() != 2 {
		t.Fatalf("first batch: %d records up to %d, want the 2 before the damage", len(batch.Records), batch.Last())
	}
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	batch, _ = b.Peek(100)
	if len(batch.Records) != 1 || batch.Records[0].Seq != 6 {
		t.Fatalf("after the damage: %d records from %d, want seq 6 alone", len(batch.Records), batch.Records[0].Seq)
	}
	if st := b.Stats(); st.Dropped[DropCorrupt] != 3 || st.Readings != 1 {
		t.Fatalf("%d dropped as corrupt, %d left; want 3 and 1", st.Dropped[DropCorrupt], st.Readings)
	}
}

// TestKeyWindowIsExact: keys are pruned a chunk at a time, but a key out of
// the window is never matched, even while its chunk is still on file.
func TestKeyWindowIsExact(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{CommitInterval: time.Second})
	var ps []*Pending
	for i := range 5 {
		m := msg(ClassTelemetry, reading("s1", i))
		m.Key = &Key{Space: "mqtt", ID: []byte{byte(i)}, Keep: 3}
		ps = append(ps, b.AppendAsync(m)) // at most two commits: keys 1..4 share a chunk
	}
	for _, p := range ps {
		if _, err := p.Result(); err != nil {
			t.Fatal(err)
		}
	}
	// Newest first: a key found is not stored again, so the window stays put
	// until the first one out of it is.
	for i := 4; i >= 0; i-- {
		want := i >= 2
		m := msg(ClassTelemetry, reading("s1", 10+i))
		m.Key = &Key{Space: "mqtt", ID: []byte{byte(i)}, Check: true, Keep: 3}
		if res := mustAppend(t, b, m); res.Duplicate != want {
			t.Errorf("key %d of 5 with a window of 3: duplicate %v, want %v", i, res.Duplicate, want)
		}
	}
}

// TestFormat1FileOpens: a file written by format 1 (a value per reading, a
// value per key, no head) opens with its readings, sequence numbers and keys,
// and is format 2 from then on.
func TestFormat1FileOpens(t *testing.T) {
	dir := t.TempDir()
	stream := [16]byte{0x11, 0x22, 6: 0x40, 8: 0x80}
	db, err := bolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	var bytesOnFile uint64
	err = db.Update(func(tx *bolt.Tx) error {
		m, _ := tx.CreateBucket(bucketMeta)
		_ = m.Put(keyFormat, binary.BigEndian.AppendUint32(nil, 1))
		_ = m.Put(keyClean, []byte{1})
		_, _ = tx.CreateBucket(bucketDead)
		sb, _ := tx.CreateBucket(bucketStreams)
		_, _ = tx.CreateBucket(queueBucket(ClassAlarm))
		q, _ := tx.CreateBucket(queueBucket(ClassTelemetry))
		for seq := uint64(4); seq <= 10; seq++ { // 1..3 were sent
			r := reading("old", int(seq))
			v := AppendRecord(nil, &r)
			bytesOnFile += accountedChunk(v)
			if err := q.Put(seqKey(seq), v); err != nil {
				return err
			}
		}
		v1 := func(id [16]byte, next, readings, bytes uint64) []byte {
			v := append([]byte(nil), id[:]...)
			v = binary.BigEndian.AppendUint64(v, next)
			v = binary.BigEndian.AppendUint64(v, readings)
			return binary.BigEndian.AppendUint64(v, bytes)
		}
		_ = sb.Put([]byte(ClassAlarm), v1([16]byte{1, 6: 0x40, 8: 0x80}, 1, 0, 0))
		_ = sb.Put([]byte(ClassTelemetry), v1(stream, 11, 7, bytesOnFile))
		ob, _ := tx.CreateBucket(orderBucket("mqtt"))
		for i, id := range []string{"k1", "k2", "k3"} {
			v := binary.BigEndian.AppendUint64(nil, uint64(t0.UnixMicro()))
			if err := ob.Put(seqKey(uint64(i+1)), append(v, id...)); err != nil {
				return err
			}
		}
		return ob.SetSequence(3)
	})
	if cerr := db.Close(); err != nil || cerr != nil {
		t.Fatal(err, cerr)
	}

	b := openTest(t, dir, Options{})
	st := b.Stats()
	if st.Readings != 7 || st.Bytes != int64(bytesOnFile) || st.KeyBytes != 3*accountedKey([]byte("k1")) {
		t.Fatalf("opened: %d readings, %d bytes, %d key bytes", st.Readings, st.Bytes, st.KeyBytes)
	}
	batch, _ := b.Peek(3)
	if batch.Stream != stream || len(batch.Records) != 3 || batch.Records[0].Seq != 4 || batch.Records[0].Reading.Number != 4 {
		t.Fatalf("first batch: stream %x, %d records from %d", batch.Stream, len(batch.Records), batch.Records[0].Seq)
	}
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	m := msg(ClassTelemetry, reading("new", 1))
	m.Key = &Key{Space: "mqtt", ID: []byte("k2"), Check: true, Keep: 10}
	if res := mustAppend(t, b, m); !res.Duplicate {
		t.Fatal("a key of the format 1 file was not found")
	}
	m.Key = &Key{Space: "mqtt", ID: []byte("k4"), Keep: 10}
	mustAppend(t, b, m)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b = openTest(t, dir, Options{})
	batch, _ = b.Peek(100)
	var seqs []uint64
	for _, r := range batch.Records {
		seqs = append(seqs, r.Seq)
	}
	if len(seqs) != 5 || seqs[0] != 7 || seqs[4] != 11 || batch.Records[4].Reading.Name != "new:temp" {
		t.Fatalf("after reopen: records %v, want 7..11 with the new one last", seqs)
	}
	err = b.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(keyFormat); binary.BigEndian.Uint32(v) != formatVersion {
			t.Errorf("format %x after open, want %d", v, formatVersion)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// readings are readings 0 .. n-1 of sensor.
func readings(sensor string, n int) []Reading {
	rs := make([]Reading, n)
	for i := range rs {
		rs[i] = reading(sensor, i)
	}
	return rs
}

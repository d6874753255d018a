package buffer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func reading(sensor string, i int) Reading {
	return Reading{
		Name: sensor + ":temp", Sensor: sensor, Metric: "temp", Unit: "Cel",
		Time: t0.Add(time.Duration(i) * time.Second), Kind: KindNumber, Number: float64(i),
		Received: t0.Add(time.Duration(i) * time.Second), ClockSynced: true,
	}
}

func msg(class Class, rs ...Reading) Message { return Message{Class: class, Readings: rs} }

func openTest(t *testing.T, dir string, opts Options) *Buffer {
	t.Helper()
	opts.Dir = dir
	b, err := Open(opts)
	if err != nil {
		t.Fatalf("open buffer: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func mustAppend(t *testing.T, b *Buffer, m Message) Result {
	t.Helper()
	res, err := b.Append(context.Background(), m)
	if err != nil {
		t.Fatalf("append: %v", err)
	}
	return res
}

func TestAppendPeekAck(t *testing.T) {
	dir := t.TempDir()
	b := openTest(t, dir, Options{})
	for i := range 10 {
		if res := mustAppend(t, b, msg(ClassTelemetry, reading("s1", i))); res.Stored != 1 {
			t.Fatalf("stored %d readings, want 1", res.Stored)
		}
	}
	batch, err := b.Peek(4)
	if err != nil {
		t.Fatal(err)
	}
	if len(batch.Records) != 4 || batch.Records[0].Seq != 1 || batch.Last() != 4 {
		t.Fatalf("peek: got %d records, first seq %d, last %d; want 4, 1, 4", len(batch.Records), batch.Records[0].Seq, batch.Last())
	}
	if got := batch.Records[2].Reading; got.Number != 2 || got.Name != "s1:temp" {
		t.Fatalf("third record = %+v", got)
	}
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	st := b.Stats()
	if st.Readings != 6 {
		t.Fatalf("after ack: %d readings, want 6", st.Readings)
	}
	if !st.Oldest.Equal(t0.Add(4 * time.Second)) {
		t.Fatalf("oldest = %v, want %v", st.Oldest, t0.Add(4*time.Second))
	}
	// Acknowledging the same prefix again changes nothing.
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	if got := b.Stats().Readings; got != 6 {
		t.Fatalf("after repeated ack: %d readings, want 6", got)
	}
}

func TestReopenKeepsStreamAndSequence(t *testing.T) {
	dir := t.TempDir()
	b := openTest(t, dir, Options{})
	mustAppend(t, b, msg(ClassTelemetry, reading("s1", 1), reading("s1", 2)))
	first, _ := b.Peek(10)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := b.Append(context.Background(), msg(ClassTelemetry, reading("s1", 3))); !errors.Is(err, ErrClosed) {
		t.Fatalf("append after close: %v, want ErrClosed", err)
	}
	b2 := openTest(t, dir, Options{})
	mustAppend(t, b2, msg(ClassTelemetry, reading("s1", 3)))
	again, err := b2.Peek(10)
	if err != nil {
		t.Fatal(err)
	}
	if again.Stream != first.Stream {
		t.Fatalf("stream changed across reopen: %x then %x", first.Stream, again.Stream)
	}
	if len(again.Records) != 3 || again.Last() != 3 {
		t.Fatalf("after reopen: %d records up to seq %d, want 3 up to 3", len(again.Records), again.Last())
	}
	if b2.Recovered() != nil {
		t.Fatalf("clean reopen reported a recovery: %+v", b2.Recovered())
	}
}

func TestGroupCommitSharesTransactions(t *testing.T) {
	var commits, committed atomic.Int64
	b := openTest(t, t.TempDir(), Options{OnCommit: func(_ time.Duration, n int) {
		commits.Add(1)
		committed.Add(int64(n))
	}})
	const writers, each = 50, 40
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				if _, err := b.Append(context.Background(), msg(ClassTelemetry, reading(fmt.Sprintf("w%d", w), i))); err != nil {
					t.Errorf("append: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	if got := b.Stats().Readings; got != writers*each {
		t.Fatalf("stored %d readings, want %d", got, writers*each)
	}
	if committed.Load() != writers*each {
		t.Fatalf("OnCommit counted %d readings, want %d", committed.Load(), writers*each)
	}
	if commits.Load() >= writers*each/2 {
		t.Fatalf("%d commits for %d appends: appends are not sharing transactions", commits.Load(), writers*each)
	}
	// Sequence numbers are dense and unique.
	batch, _ := b.Peek(writers * each)
	for i, r := range batch.Records {
		if r.Seq != uint64(i+1) {
			t.Fatalf("record %d has seq %d", i, r.Seq)
		}
	}
}

func TestPriorityClassesAreSeparateStreams(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{})
	mustAppend(t, b, msg(ClassTelemetry, reading("s1", 1)))
	mustAppend(t, b, msg(ClassAlarm, reading("a1", 2)))
	batch, _ := b.Peek(10)
	if batch.Class != ClassAlarm || len(batch.Records) != 1 || batch.Records[0].Seq != 1 {
		t.Fatalf("first batch: class %s, %d records; want the alarm first", batch.Class, len(batch.Records))
	}
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	next, _ := b.Peek(10)
	if next.Class != ClassTelemetry || next.Stream == batch.Stream || next.Records[0].Seq != 1 {
		t.Fatalf("second batch: class %s stream %x seq %d", next.Class, next.Stream, next.Records[0].Seq)
	}
}

func TestIdempotencyKeys(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{})
	key := func(id string, check bool) *Key {
		return &Key{Space: "mqtt", ID: []byte(id), Check: check, Keep: 3}
	}
	m := msg(ClassTelemetry, reading("s1", 1))
	m.Key = key("a", false)
	mustAppend(t, b, m)
	m.Key = key("a", true)
	if res := mustAppend(t, b, m); !res.Duplicate || res.Stored != 0 {
		t.Fatalf("redelivery of a stored key: %+v, want duplicate", res)
	}
	// A first delivery is never checked, even when its key is known.
	m.Key = key("a", false)
	if res := mustAppend(t, b, m); res.Duplicate {
		t.Fatal("first delivery was treated as a duplicate")
	}
	// Keep 3: after three more keys, "a" is forgotten.
	for _, id := range []string{"b", "c", "d"} {
		m.Key = key(id, false)
		mustAppend(t, b, m)
	}
	m.Key = key("a", true)
	if res := mustAppend(t, b, m); res.Duplicate {
		t.Fatal("key outside the Keep window still matched")
	}
	m.Key = key("d", true)
	if res := mustAppend(t, b, m); !res.Duplicate {
		t.Fatal("recent key did not match")
	}
}

func TestIdempotencyKeyTTL(t *testing.T) {
	now := t0
	var mu sync.Mutex
	b := openTest(t, t.TempDir(), Options{Now: func() time.Time { mu.Lock(); defer mu.Unlock(); return now }})
	m := msg(ClassTelemetry, reading("s1", 1))
	m.Key = &Key{Space: "coap", ID: []byte("peer-1"), TTL: time.Minute}
	mustAppend(t, b, m)
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	m.Key = &Key{Space: "coap", ID: []byte("peer-2"), TTL: time.Minute}
	mustAppend(t, b, m)
	m.Key = &Key{Space: "coap", ID: []byte("peer-1"), Check: true, TTL: time.Minute}
	if res := mustAppend(t, b, m); res.Duplicate {
		t.Fatal("expired key still matched")
	}
}

func TestRejectWhenFull(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{MaxBytes: 1 << 20, OnFull: Reject})
	big := func(i int) Reading {
		r := reading("s1", i)
		r.Kind, r.Number, r.Text = KindString, 0, string(bytes.Repeat([]byte("x"), 4000))
		return r
	}
	var full error
	n := 0
	for i := range 1000 {
		_, err := b.Append(context.Background(), msg(ClassTelemetry, big(i)))
		if err != nil {
			full = err
			break
		}
		n++
	}
	if !errors.Is(full, ErrFull) {
		t.Fatalf("append to a full buffer: %v, want ErrFull", full)
	}
	if got := b.Stats().Readings; got != int64(n) {
		t.Fatalf("%d readings stored, %d acknowledged", got, n)
	}
	if !b.Stats().Full {
		t.Fatal("stats do not say full")
	}
	// Room comes back once the uplink acknowledges.
	batch, _ := b.Peek(n)
	if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Append(context.Background(), msg(ClassTelemetry, big(2000))); err != nil {
		t.Fatalf("append after ack: %v", err)
	}
}

func TestDropOldestEvictsTelemetryBeforeAlarms(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{MaxBytes: 1 << 20, CommitInterval: time.Microsecond})
	text := string(bytes.Repeat([]byte("y"), 2000))
	mk := func(s string, i int) Reading {
		r := reading(s, i)
		r.Kind, r.Text = KindString, text
		return r
	}
	for i := range 20 {
		mustAppend(t, b, msg(ClassAlarm, mk("alarm", i)))
	}
	for i := 0; i < 2000; i += 10 {
		var rs []Reading
		for j := i; j < i+10; j++ {
			rs = append(rs, mk("tele", j))
		}
		mustAppend(t, b, msg(ClassTelemetry, rs...))
	}
	st := b.Stats()
	if st.Dropped[DropFull] == 0 {
		t.Fatal("nothing was dropped although 4 MB went into a 1 MiB buffer")
	}
	if st.Classes[0].Readings != 20 {
		t.Fatalf("alarms: %d left, want all 20 (telemetry goes first)", st.Classes[0].Readings)
	}
	if got := st.Readings + st.Dropped[DropFull]; got != 2020 {
		t.Fatalf("stored + dropped = %d, want 2020", got)
	}
	// The newest telemetry survives, the oldest went.
	tele, _ := b.Peek(1) // alarms first
	if tele.Class != ClassAlarm {
		t.Fatalf("first batch is %s", tele.Class)
	}
	if fi, _ := os.Stat(filepath.Join(b.opts.Dir, FileName)); fi.Size() > 1<<20 {
		t.Fatalf("file grew to %d bytes, over max_bytes", fi.Size())
	}
}

func TestMaxAge(t *testing.T) {
	now := t0
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	b := openTest(t, t.TempDir(), Options{MaxAge: time.Hour, Now: clock})
	mustAppend(t, b, msg(ClassTelemetry, reading("s1", 0), reading("s1", 1)))
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	fresh := reading("s1", 2)
	fresh.Received = now
	mustAppend(t, b, msg(ClassTelemetry, fresh))
	b.housekeep()
	st := b.Stats()
	if st.Readings != 1 || st.Dropped[DropAge] != 2 {
		t.Fatalf("after age bound: %d readings, %d dropped by age; want 1 and 2", st.Readings, st.Dropped[DropAge])
	}
}

func TestDeadLettersAndRequeue(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{})
	mustAppend(t, b, msg(ClassTelemetry, reading("s1", 1), reading("s1", 2), reading("s1", 3)))
	batch, _ := b.Peek(10)
	dead := []DeadLetter{{Record: batch.Records[1], Err: "value out of range"}}
	if err := b.Ack(batch.Stream, batch.Last(), dead); err != nil {
		t.Fatal(err)
	}
	if st := b.Stats(); st.Readings != 0 || st.DeadLetters != 1 {
		t.Fatalf("after ack with a dead letter: %d readings, %d dead letters", st.Readings, st.DeadLetters)
	}
	var got []DeadLetter
	if err := b.DeadLetters(func(d DeadLetter) error { got = append(got, d); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Err != "value out of range" || got[0].Record.Seq != 2 || got[0].Record.Number != 2 {
		t.Fatalf("dead letters = %+v", got)
	}
	n, err := b.Requeue(func(DeadLetter) bool { return true })
	if err != nil || n != 1 {
		t.Fatalf("requeue: %d, %v", n, err)
	}
	again, _ := b.Peek(10)
	if len(again.Records) != 1 || again.Records[0].Seq != 4 || again.Records[0].Name != "s1:temp" {
		t.Fatalf("requeued reading: %+v", again.Records)
	}
	if st := b.Stats(); st.DeadLetters != 0 {
		t.Fatalf("%d dead letters after requeue", st.DeadLetters)
	}
}

func TestSecondOpenIsLocked(t *testing.T) {
	dir := t.TempDir()
	openTest(t, dir, Options{})
	_, err := Open(Options{Dir: dir})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
}

func TestDamagedFileIsMovedAside(t *testing.T) {
	dir := t.TempDir()
	b := openTest(t, dir, Options{})
	for i := range 200 {
		mustAppend(t, b, msg(ClassTelemetry, reading("s1", i)))
	}
	old, _ := b.Peek(1)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, FileName)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Overwrite both meta pages and the pages after them with garbage.
	for i := range min(len(data), 6*4096) {
		data[i] = byte(i*7 + 3)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	b2 := openTest(t, dir, Options{})
	rec := b2.Recovered()
	if rec == nil {
		t.Fatal("a damaged file was opened without a recovery")
	}
	if _, err := os.Stat(rec.MovedTo); err != nil {
		t.Fatalf("damaged file not kept at %s: %v", rec.MovedTo, err)
	}
	fresh, _ := b2.Peek(1)
	if len(fresh.Records) != 0 {
		t.Fatalf("new buffer holds %d readings", len(fresh.Records))
	}
	mustAppend(t, b2, msg(ClassTelemetry, reading("s1", 1)))
	fresh, _ = b2.Peek(1)
	if fresh.Stream == old.Stream {
		t.Fatal("the new file reuses the damaged file's stream id")
	}
	// The recovery is remembered across a clean restart, for status and heartbeat.
	if err := b2.Close(); err != nil {
		t.Fatal(err)
	}
	b3 := openTest(t, dir, Options{})
	if r := b3.Recovered(); r == nil || r.MovedTo != rec.MovedTo {
		t.Fatalf("recovery after restart: %+v", r)
	}
}

func TestSuspectMarkerMovesFileAside(t *testing.T) {
	dir := t.TempDir()
	b := openTest(t, dir, Options{})
	mustAppend(t, b, msg(ClassTelemetry, reading("s1", 1)))
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, FileName+".suspect"), []byte("test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b2 := openTest(t, dir, Options{})
	if rec := b2.Recovered(); rec == nil || rec.LostReadings != 1 {
		t.Fatalf("recovery = %+v, want one lost reading reported", rec)
	}
}

func TestValidate(t *testing.T) {
	err := Options{MaxBytes: 10, OnFull: "drop-newest", CommitInterval: -1, MaxAge: -1}.Validate()
	if err == nil {
		t.Fatal("bad options validated")
	}
	for _, key := range []string{"max_bytes", "on_full", "commit_interval", "max_age"} {
		if !bytes.Contains([]byte(err.Error()), []byte(key+":")) {
			t.Errorf("validation does not name %s: %v", key, err)
		}
	}
}

func TestAppendRejectsInvalidReadings(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{})
	bad := reading("s1", 1)
	bad.Name = ""
	if _, err := b.Append(context.Background(), msg(ClassTelemetry, bad)); err == nil {
		t.Fatal("a reading without a name was stored")
	}
	if _, err := b.Append(context.Background(), msg("bulk", reading("s1", 1))); err == nil {
		t.Fatal("an unknown class was accepted")
	}
}

// TestKeysCountAgainstTheBudget: a small buffer with a full window of
// idempotency keys keeps taking messages through fill and drain cycles.
func TestKeysCountAgainstTheBudget(t *testing.T) {
	b := openTest(t, t.TempDir(), Options{MaxBytes: 1 << 20, OnFull: Reject, CommitInterval: time.Microsecond})
	next := 0
	for round := range 4 {
		// Submit many at once so that they share commits, until one is refused.
		for full := false; !full; {
			var ps []*Pending
			for range 256 {
				m := msg(ClassTelemetry, reading("k", next))
				m.Key = &Key{Space: "mqtt", ID: []byte(fmt.Sprintf("key-%08d", next)), Keep: 4096}
				ps = append(ps, b.AppendAsync(m))
				next++
			}
			for _, p := range ps {
				if _, err := p.Result(); err != nil {
					if !errors.Is(err, ErrFull) {
						t.Fatalf("round %d: %v", round, err)
					}
					full = true
				}
			}
		}
		// The window, and at most one commit's keys more: keys are pruned a
		// commit's chunk at a time (lookups still see only the window).
		st := b.Stats()
		if st.KeyBytes == 0 || st.KeyBytes > (4096+256)*accountedKey([]byte("key-00000000")) {
			t.Fatalf("round %d: key bytes %d", round, st.KeyBytes)
		}
		if st.Readings == 0 {
			t.Fatalf("round %d: the keys left no room for readings", round)
		}
		for {
			batch, _ := b.Peek(1000)
			if len(batch.Records) == 0 {
				break
			}
			if err := b.Ack(batch.Stream, batch.Last(), nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	if next < 4*2000 {
		t.Fatalf("only %d messages in four fill-and-drain rounds", next)
	}
}

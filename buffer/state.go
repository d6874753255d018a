package buffer

import (
	"encoding/binary"
	"hash/maphash"
	"time"
)

// DropReason says why readings were dropped without being uploaded.
type DropReason int

// Drop reasons; their String is the metric label.
const (
	DropFull    DropReason = iota // evicted by on_full = "drop-oldest" (also at min_free_disk)
	DropAge                       // older than max_age
	DropCorrupt                   // a stored record that no longer decodes
	dropReasons
)

func (r DropReason) String() string {
	switch r {
	case DropFull:
		return "buffer_full"
	case DropAge:
		return "max_age"
	case DropCorrupt:
		return "corrupt_record"
	}
	return "unknown"
}

// DropReasons lists every drop reason.
var DropReasons = []DropReason{DropFull, DropAge, DropCorrupt}

// classState is one class's stream as persisted in the streams bucket. The
// unsent readings are the sequence numbers head .. nextSeq-1.
type classState struct {
	stream  [16]byte
	nextSeq uint64
	bytes   uint64    // accounted bytes of the class's chunks
	head    uint64    // the first unsent sequence number
	oldest  time.Time // receive time of the first unsent reading (memory only)
}

// unsent is the number of the class's unsent readings.
func (cs *classState) unsent() uint64 { return cs.nextSeq - cs.head }

// Stream values: stream id, next sequence number, unsent readings (for
// tools that read only the counters), bytes, head. Format 1 files have no
// head (40 bytes): their queue starts at its first key.
const (
	streamValueLen   = 16 + 8 + 8 + 8 + 8
	streamValueLenV1 = 16 + 8 + 8 + 8
)

func encodeStream(cs *classState) []byte {
	v := append(make([]byte, 0, streamValueLen), cs.stream[:]...)
	v = binary.BigEndian.AppendUint64(v, cs.nextSeq)
	v = binary.BigEndian.AppendUint64(v, cs.unsent())
	v = binary.BigEndian.AppendUint64(v, cs.bytes)
	return binary.BigEndian.AppendUint64(v, cs.head)
}

// decodeStream reads a stream value of either length; hasHead is false for
// one of format 1, whose head is then taken from its count of readings.
func decodeStream(v []byte) (cs classState, hasHead bool) {
	copy(cs.stream[:], v)
	cs.nextSeq = binary.BigEndian.Uint64(v[16:])
	cs.bytes = binary.BigEndian.Uint64(v[32:])
	if len(v) >= streamValueLen {
		cs.head, hasHead = binary.BigEndian.Uint64(v[40:]), true
	} else {
		cs.head = cs.nextSeq - min(cs.nextSeq, binary.BigEndian.Uint64(v[24:]))
	}
	return cs, hasHead
}

// state is the buffer's committed state; transactions work on a copy and
// publish it only after commit.
type state struct {
	classes     [2]classState // indexed like Classes
	dropped     [dropReasons]uint64
	deadLetters int64
	keyBytes    int64 // accounted size of the idempotency keys, every space
}

// readingBytes is the accounted size of the unsent readings.
func (s *state) readingBytes() int64 {
	var n uint64
	for i := range s.classes {
		n += s.classes[i].bytes
	}
	return int64(n)
}

// usedBytes is what counts against the budget: readings and keys.
func (s *state) usedBytes() int64 { return s.readingBytes() + s.keyBytes }

func encodeCounters(c [dropReasons]uint64) []byte {
	var v []byte
	for _, n := range c {
		v = binary.BigEndian.AppendUint64(v, n)
	}
	return v
}

func decodeCounters(v []byte) (c [dropReasons]uint64) {
	for i := range c {
		if len(v) >= 8 {
			c[i] = binary.BigEndian.Uint64(v)
			v = v[8:]
		}
	}
	return c
}

// elementOverhead approximates bbolt's per-element cost in a leaf page.
const elementOverhead = 16

// accountedKey is what one idempotency key costs against the budget: as
// format 1 stored it, an element of its own (order -> time + id); in a key
// chunk it takes less.
func accountedKey(id []byte) int64 { return int64(len(id) + 8 + 8 + elementOverhead) }

// keyID is an idempotency key as the in-memory index holds it: a 64-bit
// fingerprint. Eight bytes and no pointers, so a full CoAP window of 131,072
// keys takes about 5 MiB and nothing for the garbage collector to scan. A
// fingerprint that matches is confirmed against the id on file, so two ids
// that share one can never make a new message look like a redelivery.
type keyID uint64

// keySeed makes fingerprints differ between processes: the index is rebuilt
// at every start, and nobody can aim ids at one another's fingerprint.
var keySeed = maphash.MakeSeed()

func fingerprint(id []byte) keyID { return keyID(maphash.Bytes(keySeed, id)) }

func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(make([]byte, 0, 8), seq) }

// ClassStats describes one priority class's stream.
type ClassStats struct {
	Class    Class
	Stream   [16]byte
	NextSeq  uint64 // the sequence number the next reading gets
	Readings int64
	Bytes    int64
	Oldest   time.Time // receive time of the oldest unsent reading; zero when none
}

// Stats is a snapshot of the buffer.
type Stats struct {
	Readings    int64     // unsent readings
	Bytes       int64     // their accounted size
	Oldest      time.Time // receive time of the oldest unsent reading; zero when none
	Classes     []ClassStats
	Dropped     map[DropReason]int64 // since the file was created
	DeadLetters int64
	KeyBytes    int64 // accounted size of the idempotency keys
	MaxBytes    int64
	FileBytes   int64 // the file's size on flash
	Full        bool  // the last append found no room
}

// Stats returns a snapshot without touching the file; it is cheap enough
// for every metrics scrape.
func (b *Buffer) Stats() Stats {
	b.mu.Lock()
	st, full := b.st, b.full
	b.mu.Unlock()
	s := Stats{
		Full:        full,
		Dropped:     make(map[DropReason]int64, len(DropReasons)),
		DeadLetters: st.deadLetters,
		KeyBytes:    st.keyBytes,
		MaxBytes:    b.opts.MaxBytes,
	}
	for i, c := range Classes {
		cs := st.classes[i]
		s.Classes = append(s.Classes, ClassStats{
			Class: c, Stream: cs.stream, NextSeq: cs.nextSeq,
			Readings: int64(cs.unsent()), Bytes: int64(cs.bytes), Oldest: cs.oldest,
		})
		s.Readings += int64(cs.unsent())
		s.Bytes += int64(cs.bytes)
		if !cs.oldest.IsZero() && (s.Oldest.IsZero() || cs.oldest.Before(s.Oldest)) {
			s.Oldest = cs.oldest
		}
	}
	for _, r := range DropReasons {
		s.Dropped[r] = int64(st.dropped[r])
	}
	if fi, err := statFile(b.path); err == nil {
		s.FileBytes = fi
	}
	return s
}

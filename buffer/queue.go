package buffer

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// Batch is a run of consecutive unsent readings of one stream, oldest first.
type Batch struct {
	Class   Class
	Stream  [16]byte
	Records []Record
}

// Last is the sequence number of the batch's last record (0 when empty).
func (b *Batch) Last() uint64 {
	if len(b.Records) == 0 {
		return 0
	}
	return b.Records[len(b.Records)-1].Seq
}

// DeadLetter is a reading that the sink refused for its content, kept aside
// with the error so that the queue moves on.
type DeadLetter struct {
	Class  Class
	Stream [16]byte
	Record Record
	Err    string
	At     time.Time
}

// Peek returns up to max of the oldest unsent readings of the highest priority
// class that has any; an empty batch when there are none. The records are
// copies: Peek's read transaction has ended when it returns, so a slow upload
// does not pin pages of the file.
func (b *Buffer) Peek(max int) (Batch, error) { return b.PeekAppend(nil, max) }

// PeekAppend is Peek that appends the records to dst[:0], so that a caller
// that is done with its last batch can lend it for the next.
func (b *Buffer) PeekAppend(dst []Record, max int) (Batch, error) {
	b.mu.Lock()
	st := b.st
	b.mu.Unlock()
	ci := -1
	for i := range Classes {
		if st.classes[i].unsent() > 0 {
			ci = i
			break
		}
	}
	if ci < 0 || max <= 0 {
		return Batch{}, nil
	}
	cs := &st.classes[ci]
	if n := int(min(uint64(max), cs.unsent())); cap(dst) < n {
		dst = make([]Record, 0, n)
	}
	batch := Batch{Class: Classes[ci], Stream: cs.stream, Records: dst[:0]}
	corrupt := false // the record at the head does not decode
	err := b.guard(func() error {
		return b.db.View(func(tx *bolt.Tx) error {
			strs := newArena(b.maxChunk)
			for seq, rec := range unsentRecords(tx.Bucket(queueBucket(Classes[ci])), cs) {
				if len(batch.Records) >= max {
					break
				}
				r, err := decodeRecord(rec, strs.str)
				if rec == nil || err != nil {
					// One rotten record must not stop the queue: the batch
					// ends before it, and at the head it is dropped and counted.
					corrupt = len(batch.Records) == 0
					b.opts.Logger.Error("buffer record does not decode", "class", string(Classes[ci]), "seq", seq, "err", err)
					break
				}
				batch.Records = append(batch.Records, Record{Seq: seq, Reading: r})
			}
			return nil
		})
	})
	if err != nil {
		return Batch{}, fmt.Errorf("peek buffer: %w", err)
	}
	if corrupt {
		if err := b.dropCorrupt(ci); err != nil {
			return Batch{}, err
		}
		return b.PeekAppend(dst, max)
	}
	return batch, nil
}

// dropCorrupt drops the undecodable records at the head of class ci and
// counts them.
func (b *Buffer) dropCorrupt(ci int) error {
	return b.writeState(func(t *txn) error {
		return t.consume(ci, func(_ uint64, rec []byte) bool {
			if rec != nil {
				if _, err := DecodeRecord(rec); err == nil {
					return false
				}
			}
			t.st.dropped[DropCorrupt]++
			return true
		})
	})
}

// Ack removes every reading of stream up to and including upTo, and moves
// dead into the dead-letter bucket, in one transaction. Readings already
// gone (evicted, or acknowledged before) are skipped. Safe for concurrent use.
func (b *Buffer) Ack(stream [16]byte, upTo uint64, dead []DeadLetter) error {
	b.writeMu.Lock()
	defer b.writeMu.Unlock()
	ci := -1
	err := b.writeStateLocked(func(t *txn) error {
		for i := range t.st.classes {
			if t.st.classes[i].stream == stream {
				ci = i
			}
		}
		if ci < 0 {
			return fmt.Errorf("unknown stream %x", stream)
		}
		err := t.consume(ci, func(seq uint64, _ []byte) bool { return seq <= upTo })
		if err != nil {
			return err
		}
		db := t.tx.Bucket(bucketDead)
		now := b.opts.Now()
		for i := range dead {
			d := &dead[i]
			d.Class, d.Stream, d.At = Classes[ci], stream, now
			if err := db.Put(deadKey(stream, d.Record.Seq), encodeDead(d)); err != nil {
				return err
			}
			t.st.deadLetters++
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("ack buffer up to %d: %w", upTo, err)
	}
	b.mu.Lock()
	empty := b.st.readingBytes() == 0
	b.mu.Unlock()
	if empty {
		// Empty again: whatever crowded the file has been freed.
		b.budget = b.fullBudget
	}
	return nil
}

func deadKey(stream [16]byte, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(append(make([]byte, 0, 24), stream[:]...), seq)
}

// encodeDead: class, error text, time (µs), then the record.
func encodeDead(d *DeadLetter) []byte {
	v := appendString(nil, string(d.Class))
	v = appendString(v, d.Err)
	v = binary.AppendVarint(v, d.At.UnixMicro())
	return AppendRecord(v, &d.Record.Reading)
}

func decodeDead(k, v []byte) (DeadLetter, error) {
	var d DeadLetter
	if len(k) != 24 {
		return d, fmt.Errorf("%w: dead letter key of %d bytes", errRecord, len(k))
	}
	copy(d.Stream[:], k)
	d.Record.Seq = binary.BigEndian.Uint64(k[16:])
	dec := decoder{b: v}
	d.Class = Class(dec.string())
	d.Err = dec.string()
	d.At = time.UnixMicro(dec.varint()).UTC()
	if dec.err != nil {
		return d, dec.err
	}
	r, err := DecodeRecord(dec.b)
	if err != nil {
		return d, err
	}
	d.Record.Reading = r
	return d, nil
}

// writeState runs fn in a write transaction on a copy of the state and
// publishes the copy after commit.
func (b *Buffer) writeState(fn func(t *txn) error) error {
	b.writeMu.Lock()
	defer b.writeMu.Unlock()
	return b.writeStateLocked(fn)
}

// writeStateLocked is writeState for a caller that holds writeMu.
func (b *Buffer) writeStateLocked(fn func(t *txn) error) error {
	b.mu.Lock()
	base := b.st
	b.mu.Unlock()
	var next state
	err := b.guard(func() error {
		return b.db.Update(func(tx *bolt.Tx) error {
			t := &txn{b: b, tx: tx, base: base, st: base}
			if err := fn(t); err != nil {
				return err
			}
			if err := t.persist(); err != nil {
				return err
			}
			next = t.st
			return nil
		})
	})
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.st = next
	b.mu.Unlock()
	return nil
}

// housekeep applies the age bound and watches free disk space; the
// committer runs it between commits.
func (b *Buffer) housekeep() {
	var fs unix.Statfs_t
	if err := unix.Statfs(b.opts.Dir, &fs); err == nil {
		free := int64(fs.Bavail) * int64(fs.Bsize)
		low := free < b.opts.MinFreeDisk
		if low != b.lowDisk.Load() {
			b.opts.Logger.Warn("buffer disk space", "low", low, "free_bytes", free, "min_free_disk", b.opts.MinFreeDisk)
		}
		b.lowDisk.Store(low)
	}
	if b.opts.MaxAge <= 0 {
		return
	}
	cutoff := b.opts.Now().Add(-b.opts.MaxAge)
	b.mu.Lock()
	st := b.st
	b.mu.Unlock()
	stale := false
	for i := range st.classes {
		if o := st.classes[i].oldest; !o.IsZero() && o.Before(cutoff) {
			stale = true
		}
	}
	if !stale {
		return
	}
	err := b.writeState(func(t *txn) error {
		for ci := range Classes {
			err := t.consume(ci, func(_ uint64, rec []byte) bool {
				reason := DropAge
				if r, err := DecodeRecord(rec); err != nil {
					reason = DropCorrupt
				} else if !r.Received.Before(cutoff) {
					return false
				}
				t.st.dropped[reason]++
				return true
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.opts.Logger.Warn("buffer age bound failed", "err", err)
	}
}

// DeadLetters calls fn for every dead letter, oldest stream position first.
func (b *Buffer) DeadLetters(fn func(DeadLetter) error) error {
	return b.guard(func() error {
		return b.db.View(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketDead).ForEach(func(k, v []byte) error {
				d, err := decodeDead(k, v)
				if err != nil {
					return fmt.Errorf("dead letter %x: %w", k, err)
				}
				return fn(d)
			})
		})
	})
}

// Unsent calls fn for every unsent reading, class by class, oldest first.
func (b *Buffer) Unsent(fn func(Class, [16]byte, Record) error) error {
	b.mu.Lock()
	st := b.st
	b.mu.Unlock()
	return b.guard(func() error {
		return b.db.View(func(tx *bolt.Tx) error {
			for ci, c := range Classes {
				cs := &st.classes[ci]
				for seq, rec := range unsentRecords(tx.Bucket(queueBucket(c)), cs) {
					r, err := DecodeRecord(rec)
					if err != nil {
						return fmt.Errorf("class %s record %d: %w", c, seq, err)
					}
					if err := fn(c, cs.stream, Record{Seq: seq, Reading: r}); err != nil {
						return err
					}
				}
			}
			return nil
		})
	})
}

// Requeue moves dead letters back into their class's queue as new readings
// (new sequence numbers), for after the cause was fixed. match selects which;
// it returns how many were moved.
func (b *Buffer) Requeue(match func(DeadLetter) bool) (int, error) {
	moved := 0
	err := b.writeState(func(t *txn) error {
		dead := t.tx.Bucket(bucketDead)
		var keys [][]byte
		var msgs []Message
		err := dead.ForEach(func(k, v []byte) error {
			d, err := decodeDead(k, v)
			if err != nil {
				return fmt.Errorf("dead letter %x: %w", k, err)
			}
			if !d.Class.Valid() {
				d.Class = ClassTelemetry
			}
			if match(d) {
				keys = append(keys, bytes.Clone(k))
				msgs = append(msgs, Message{Class: d.Class, Readings: []Reading{d.Record.Reading}})
			}
			return nil
		})
		if err != nil {
			return err
		}
		t.evict = false
		for i := range msgs {
			if _, err := t.append(&msgs[i]); err != nil {
				return fmt.Errorf("requeue: %w", err)
			}
			if err := dead.Delete(keys[i]); err != nil {
				return err
			}
			t.st.deadLetters--
			moved++
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return moved, nil
}

func statFile(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

package buffer

import (
	"encoding/binary"
	"iter"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// A class's queue bucket holds chunks: each value is a run of consecutive
// records, stored under the sequence number of its first one, and the next
// value's key (or the class's next sequence number) ends the run. A commit
// adds one chunk per class it appends to, so a reading costs bbolt no key,
// no tree insertion and no page of its own: a bbolt Put per reading was the
// largest part of a commit. The class's head is the first unsent sequence
// number; a chunk whose records are all behind it is deleted, one partly
// behind it stays until the rest are sent.
//
// Layout: chunkTag, the record count (uint32), then each record as a uvarint
// length and the record. A value that starts with recordVersion instead is
// one bare record, as format 1 files stored every reading.
const (
	chunkTag       = 2
	chunkHeaderLen = 5
	// chunkOverhead is what a chunk costs beyond its records: its key,
	// bbolt's element header and the chunk header.
	chunkOverhead = 8 + elementOverhead + chunkHeaderLen
	// pageHeaderSize is bbolt's page header.
	pageHeaderSize = 16
)

// maxChunkBytes caps a chunk so that two fit a page of pageSize: bbolt puts
// at least two elements in a leaf page, so larger values make nodes of
// several pages, which need free runs of pages that a nearly full file may
// not have. It is also all a partly sent chunk keeps on flash.
func maxChunkBytes(pageSize int) int {
	return (pageSize-pageHeaderSize)/2 - elementOverhead - 8
}

// accountedChunk is what a queue value costs against the budget.
func accountedChunk(v []byte) uint64 { return uint64(8 + len(v) + elementOverhead) }

// recordCost is what one record adds to the chunk it goes into.
func recordCost(rec []byte) uint64 { return uint64(uvarintLen(uint64(len(rec))) + len(rec)) }

func uvarintLen(v uint64) int {
	n := 1
	for ; v >= 0x80; v >>= 7 {
		n++
	}
	return n
}

// chunkBuilder gathers the records one transaction appends to a class.
type chunkBuilder struct {
	first uint64 // sequence number of the first record; b is empty when there is none
	b     []byte
}

func (c *chunkBuilder) empty() bool { return len(c.b) == 0 }

// start begins a chunk at seq in buf, which must not be in use by bbolt
// (nil: a new buffer of capacity size).
func (c *chunkBuilder) start(seq uint64, buf []byte, size int) {
	if buf == nil {
		buf = make([]byte, 0, size)
	}
	c.first = seq
	c.b = append(buf[:0], chunkTag, 0, 0, 0, 0)
}

func (c *chunkBuilder) add(rec []byte) {
	c.b = binary.AppendUvarint(c.b, uint64(len(rec)))
	c.b = append(c.b, rec...)
	c.count()
}

// count adds one to the chunk's count of what it holds.
func (c *chunkBuilder) count() {
	binary.BigEndian.PutUint32(c.b[1:], binary.BigEndian.Uint32(c.b[1:])+1)
}

// full reports whether an entry of n bytes and its length would take the
// chunk past limit bytes.
func (c *chunkBuilder) full(n, limit int) bool {
	return !c.empty() && len(c.b)+binary.MaxVarintLen32+n > limit
}

// put stores the chunk in bk under its first sequence number and starts none.
func (c *chunkBuilder) put(bk *bolt.Bucket) error {
	bk.FillPercent = 1 // keys only grow: pack pages full
	if err := bk.Put(seqKey(c.first), c.b); err != nil {
		return err
	}
	*c = chunkBuilder{}
	return nil
}

// chunkRecords yields the records of the chunk v that spans sequence numbers
// first up to (not including) end. Records its framing has lost (a damaged
// value) come as nil, so that every sequence number is accounted for.
func chunkRecords(first, end uint64, v []byte) iter.Seq2[uint64, []byte] {
	return func(yield func(uint64, []byte) bool) {
		seq := first
		switch {
		case len(v) > 0 && v[0] == recordVersion && seq < end:
			if !yield(seq, v) {
				return
			}
			seq++
		case len(v) >= chunkHeaderLen && v[0] == chunkTag:
			rest := v[chunkHeaderLen:]
			for n := binary.BigEndian.Uint32(v[1:]); n > 0 && seq < end; n-- {
				l, w := binary.Uvarint(rest)
				if w <= 0 || l > uint64(len(rest)-w) {
					break
				}
				if !yield(seq, rest[w:w+int(l)]) {
					return
				}
				rest = rest[w+int(l):]
				seq++
			}
		}
		for ; seq < end; seq++ {
			if !yield(seq, nil) {
				return
			}
		}
	}
}

// frontChunks calls fn for the chunks of q from the oldest on, each with its
// key, the sequence numbers it spans and its value, until fn returns false.
// nextSeq ends the last chunk. The values are valid for the transaction; fn
// must not change the bucket.
func frontChunks(q *bolt.Bucket, nextSeq uint64, fn func(k []byte, first, end uint64, v []byte) bool) {
	c := q.Cursor()
	k, v := c.First()
	for k != nil {
		nk, nv := c.Next()
		end := nextSeq
		if nk != nil {
			end = binary.BigEndian.Uint64(nk)
		}
		if !fn(k, binary.BigEndian.Uint64(k), end, v) {
			return
		}
		k, v = nk, nv
	}
}

// unsentRecords yields the unsent records of class cs from its head on, with
// their sequence numbers; a record a damaged chunk lost comes as nil. The
// records are valid for q's transaction.
func unsentRecords(q *bolt.Bucket, cs *classState) iter.Seq2[uint64, []byte] {
	return func(yield func(uint64, []byte) bool) {
		frontChunks(q, cs.nextSeq, func(_ []byte, first, end uint64, v []byte) bool {
			for seq, rec := range chunkRecords(first, end, v) {
				if seq >= cs.head && !yield(seq, rec) {
					return false
				}
			}
			return true
		})
	}
}

// consume drops unsent records of class ci from its head for as long as take
// accepts them, oldest first, and deletes every chunk it empties. take sees
// nil for a record the framing of a damaged chunk lost. A chunk's bytes are
// freed when it is emptied, so a take that watches the budget stops at a
// chunk's end.
func (t *txn) consume(ci int, take func(seq uint64, rec []byte) bool) error {
	cs := &t.st.classes[ci]
	q := t.tx.Bucket(queueBucket(Classes[ci]))
	var emptied [][]byte
	frontChunks(q, cs.nextSeq, func(k []byte, first, end uint64, v []byte) bool {
		for seq, rec := range chunkRecords(first, end, v) {
			if seq < cs.head {
				continue
			}
			if !take(seq, rec) {
				return false
			}
			cs.head = seq + 1
		}
		cs.head = max(cs.head, end)
		emptied = append(emptied, k)
		cs.bytes -= min(cs.bytes, accountedChunk(v))
		return true
	})
	for _, k := range emptied {
		if err := q.Delete(k); err != nil {
			return err
		}
	}
	cs.oldest = headReceived(q, cs)
	return nil
}

// headReceived is the receive time of the first decodable unsent record of
// cs, zero when none; an undecodable one is skipped here and dropped by Peek.
func headReceived(q *bolt.Bucket, cs *classState) time.Time {
	tries := 16
	for _, rec := range unsentRecords(q, cs) {
		if r, err := DecodeRecord(rec); err == nil {
			return r.Received
		}
		if tries--; tries == 0 {
			break
		}
	}
	return time.Time{}
}

// arena holds the strings of decoded records in blocks of about a chunk's
// size, one allocation each.
type arena struct {
	sb    strings.Builder
	block int
}

func newArena(block int) *arena { return &arena{block: block} }

func (a *arena) str(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	if a.sb.Cap()-a.sb.Len() < len(b) {
		// A new block: the strings already made keep the old one.
		a.sb = strings.Builder{}
		a.sb.Grow(max(a.block, len(b)))
	}
	off := a.sb.Len()
	a.sb.Write(b)
	return a.sb.String()[off:]
}

package buffer

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"iter"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Key is a message's idempotency key: stored in the transaction that appends
// the message, so that a redelivery of it can be recognised after a crash.
type Key struct {
	Space string // "mqtt", "coap": keys of different ingresses never meet
	ID    []byte
	// Check marks a redelivery: when ID is already stored the message is a
	// duplicate and nothing is appended. A first delivery is never checked, so
	// an old key cannot swallow a new message that repeats it.
	Check bool
	// Keep bounds the space to the last Keep keys stored (0: no count bound).
	Keep int
	// TTL drops keys stored longer ago than this (0: no age bound).
	TTL time.Duration
}

// On file, a space's keys are in its order bucket, in the order they were
// stored: one value per transaction (a key chunk) under the order of its
// first key, holding keyChunkTag, the key count (uint32), then each key's
// time (µs, 8 bytes), a uvarint id length and the id. Storing is an append
// at the bucket's end and pruning takes whole chunks from its front. A value
// that does not start with keyChunkTag is one key as format 1 stored it:
// time (8 bytes) and id; a time of the last four thousand years starts with
// a zero byte. Lookups go to the in-memory index (fingerprint -> order),
// which a transaction updates and rolls back if its commit fails.
const keyChunkTag = chunkTag

func orderBucket(space string) []byte { return []byte("ko:" + space) }

// keyEntry is one stored key.
type keyEntry struct {
	at int64 // when it was stored, µs since the epoch
	id []byte
}

// keyEntries yields the keys of an order bucket value stored under order
// first, with their orders. It stops at damaged framing.
func keyEntries(first uint64, v []byte) iter.Seq2[uint64, keyEntry] {
	return func(yield func(uint64, keyEntry) bool) {
		if len(v) >= 8 && v[0] != keyChunkTag {
			yield(first, keyEntry{at: int64(binary.BigEndian.Uint64(v)), id: v[8:]})
			return
		}
		if len(v) < chunkHeaderLen {
			return
		}
		rest := v[chunkHeaderLen:]
		for n, order := binary.BigEndian.Uint32(v[1:]), first; n > 0; n, order = n-1, order+1 {
			if len(rest) < 8 {
				return
			}
			at := int64(binary.BigEndian.Uint64(rest))
			l, w := binary.Uvarint(rest[8:])
			if w <= 0 || l > uint64(len(rest)-8-w) {
				return
			}
			id := rest[8+w : 8+w+int(l)]
			if !yield(order, keyEntry{at: at, id: id}) {
				return
			}
			rest = rest[8+w+int(l):]
		}
	}
}

// keyBuilder gathers the keys one transaction stores in a space.
type keyBuilder struct {
	chunk chunkBuilder // chunk.first is the order of the first key
	last  uint64       // order of the last key
	keep  int          // the bounds of the latest key
	ttl   time.Duration
}

func (kb *keyBuilder) add(order uint64, at int64, id []byte, size int) {
	if kb.chunk.empty() {
		kb.chunk.start(order, nil, size)
	}
	b := binary.BigEndian.AppendUint64(kb.chunk.b, uint64(at))
	b = binary.AppendUvarint(b, uint64(len(id)))
	kb.chunk.b = append(b, id...)
	kb.chunk.count()
	kb.last = order
}

// putKey stores k in the transaction's key chunk of its space.
func (t *txn) putKey(k *Key) error {
	ob, err := t.tx.CreateBucketIfNotExists(orderBucket(k.Space))
	if err != nil {
		return err
	}
	order, err := ob.NextSequence()
	if err != nil {
		return err
	}
	if t.keys == nil {
		t.keys = make(map[string]*keyBuilder)
	}
	kb := t.keys[k.Space]
	if kb == nil {
		kb = &keyBuilder{}
		t.keys[k.Space] = kb
	}
	if kb.chunk.full(8+len(k.ID), t.b.maxChunk) {
		if err := kb.chunk.put(ob); err != nil {
			return err
		}
	}
	kb.add(order, t.b.opts.Now().UnixMicro(), k.ID, t.b.maxChunk)
	kb.keep, kb.ttl = k.Keep, k.TTL
	t.setKey(k.Space, t.b.fp(k.ID), order)
	t.st.keyBytes += accountedKey(k.ID)
	return nil
}

// flushKeys writes the transaction's key chunks and prunes each space they
// went to: whole chunks from the front whose newest key is out of the window
// or older than the TTL, so that a space keeps at least its window.
func (t *txn) flushKeys() error {
	for space, kb := range t.keys {
		ob := t.tx.Bucket(orderBucket(space))
		if !kb.chunk.empty() {
			if err := kb.chunk.put(ob); err != nil {
				return err
			}
		}
		cutoff := int64(-1 << 63)
		if kb.ttl > 0 {
			cutoff = t.b.opts.Now().Add(-kb.ttl).UnixMicro()
		}
		var pruned [][]byte
		frontChunks(ob, kb.last+1, func(k []byte, first, end uint64, v []byte) bool {
			newest := end - 1
			var newestAt int64
			for _, e := range keyEntries(first, v) {
				newestAt = e.at
			}
			stale := kb.keep > 0 && kb.last-newest >= uint64(kb.keep)
			if !stale && newestAt >= cutoff {
				return false
			}
			for order, e := range keyEntries(first, v) {
				t.st.keyBytes = max(0, t.st.keyBytes-accountedKey(e.id))
				// The key may have been stored again since (or another id
				// shares its fingerprint): forget it only if this entry is
				// still the latest.
				if ik := t.b.fp(e.id); t.b.keys[space][ik] == order {
					t.setKey(space, ik, 0)
				}
			}
			pruned = append(pruned, k)
			return true
		})
		for _, k := range pruned {
			if err := ob.Delete(k); err != nil {
				return err
			}
		}
	}
	clear(t.keys)
	return nil
}

// hasKey reports whether k's id is a stored key of its space within k's
// bounds: its fingerprint is in the index, the entry it points to holds this
// very id, and it is among the last Keep keys and younger than the TTL.
// Pruning takes whole chunks, so the file may still hold a key just out of
// the window; it is not matched.
func (t *txn) hasKey(k *Key) bool {
	order, ok := t.b.keys[k.Space][t.b.fp(k.ID)]
	if !ok {
		return false
	}
	ob := t.tx.Bucket(orderBucket(k.Space))
	if ob == nil || (k.Keep > 0 && ob.Sequence()-order >= uint64(k.Keep)) {
		return false
	}
	var first uint64
	var v []byte
	if kb := t.keys[k.Space]; kb != nil && !kb.chunk.empty() && order >= kb.chunk.first {
		first, v = kb.chunk.first, kb.chunk.b // stored earlier in this transaction
	} else {
		c := ob.Cursor()
		k, cv := c.Seek(seqKey(order))
		if k == nil || binary.BigEndian.Uint64(k) > order {
			k, cv = c.Prev()
		}
		if k == nil {
			return false
		}
		first, v = binary.BigEndian.Uint64(k), cv
	}
	for o, e := range keyEntries(first, v) {
		if o == order {
			return bytes.Equal(e.id, k.ID) && (k.TTL <= 0 || e.at >= t.b.opts.Now().Add(-k.TTL).UnixMicro())
		}
	}
	return false
}

// setKey records id's latest order in the index (0: forget it) and how to
// undo that.
func (t *txn) setKey(space string, ik keyID, order uint64) {
	idx := t.b.keys[space]
	if idx == nil {
		idx = make(map[keyID]uint64)
		t.b.keys[space] = idx
	}
	prev, had := idx[ik]
	t.undo = append(t.undo, keyChange{space: space, id: ik, prev: prev, had: had})
	if order == 0 {
		delete(idx, ik)
	} else {
		idx[ik] = order
	}
}

// keyChange is one index entry as it was before the transaction.
type keyChange struct {
	space string
	id    keyID
	prev  uint64
	had   bool
}

// rollback undoes the transaction's index changes, newest first, after its
// commit failed.
func (t *txn) rollback() {
	for i := len(t.undo) - 1; i >= 0; i-- {
		u := t.undo[i]
		if u.had {
			t.b.keys[u.space][u.id] = u.prev
		} else {
			delete(t.b.keys[u.space], u.id)
		}
	}
	t.undo = nil
}

// loadKeys builds the in-memory index of idempotency keys from the order
// buckets and returns their accounted bytes. It removes what versions before
// the index kept on file (the id -> order buckets and their byte count).
func (b *Buffer) loadKeys(tx *bolt.Tx) (int64, error) {
	b.keys = make(map[string]map[keyID]uint64)
	var total int64
	var old [][]byte
	err := tx.ForEach(func(name []byte, bk *bolt.Bucket) error {
		switch {
		case len(name) > 2 && string(name[:2]) == "k:":
			old = append(old, bytes.Clone(name))
		case len(name) > 3 && string(name[:3]) == "ko:":
			idx := make(map[keyID]uint64)
			b.keys[string(name[3:])] = idx
			return bk.ForEach(func(k, v []byte) error {
				if len(k) != 8 || len(v) < 8 {
					return fmt.Errorf("key order entry %x of %s is malformed", k, name)
				}
				for order, e := range keyEntries(binary.BigEndian.Uint64(k), v) {
					idx[b.fp(e.id)] = order
					total += accountedKey(e.id)
				}
				return nil
			})
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	for _, name := range old {
		if err := tx.DeleteBucket(name); err != nil {
			return 0, fmt.Errorf("remove old key bucket %s: %w", name, err)
		}
	}
	if err := tx.Bucket(bucketMeta).Delete(keyKeyBytes); err != nil {
		return 0, err
	}
	return total, nil
}

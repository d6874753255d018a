package buffer

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
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

// Message is what one source delivery adds: all of it is stored or none.
type Message struct {
	Class    Class
	Readings []Reading
	Key      *Key // nil: no idempotency key
}

// Result is the outcome of a successful Append.
type Result struct {
	Stored    int  // readings appended
	Duplicate bool // the key was known: nothing was appended
}

// Pending is an Append in progress.
type Pending struct {
	msg  Message
	done chan struct{}
	res  Result
	err  error
}

// Done is closed once the outcome is known.
func (p *Pending) Done() <-chan struct{} { return p.done }

// Result returns the outcome; call it after Done is closed.
func (p *Pending) Result() (Result, error) {
	<-p.done
	return p.res, p.err
}

func (p *Pending) finish(res Result, err error) {
	p.res, p.err = res, err
	close(p.done)
}

// AppendAsync submits msg for the next group commit and returns at once,
// unless many appends are already waiting, in which case it waits for room.
// The readings are durable once the Pending is done without error. The
// caller must not modify msg's slices until then.
func (b *Buffer) AppendAsync(msg Message) *Pending {
	p := &Pending{msg: msg, done: make(chan struct{})}
	if err := checkMessage(&msg); err != nil {
		p.finish(Result{}, err)
		return p
	}
	b.closeMu.RLock()
	defer b.closeMu.RUnlock()
	if b.isShut {
		p.finish(Result{}, ErrClosed)
		return p
	}
	b.reqs <- p
	return p
}

// Append stores msg durably: it returns once the readings are on flash (one
// fsync shared with concurrent callers), or with ErrFull, ErrClosed,
// ErrTooLarge, ErrDamaged or an I/O error, in which case nothing of msg was
// stored. If ctx ends first Append returns ctx's error, and the message may or
// may not be stored: use a Key to make a retry safe. Safe for concurrent use.
func (b *Buffer) Append(ctx context.Context, msg Message) (Result, error) {
	p := b.AppendAsync(msg)
	select {
	case <-p.done:
		return p.res, p.err
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

func checkMessage(m *Message) error {
	if !m.Class.Valid() {
		return fmt.Errorf("append: unknown priority class %q", m.Class)
	}
	for i := range m.Readings {
		if err := m.Readings[i].Valid(); err != nil {
			return fmt.Errorf("append: %w", err)
		}
	}
	if m.Key != nil && (m.Key.Space == "" || len(m.Key.ID) == 0) {
		return errors.New("append: key without space or id")
	}
	return nil
}

// run is the committer: the one goroutine that writes appends. Appends that
// arrive while a commit runs, or within CommitInterval of the start of the
// last one, share the next transaction.
func (b *Buffer) run() {
	defer close(b.stopped)
	hk := time.NewTicker(housekeepingInterval)
	defer hk.Stop()
	b.housekeep()
	var batch []*Pending
	var last time.Time
	for {
		select {
		case p := <-b.reqs:
			batch = append(batch[:0], p)
		case <-hk.C:
			b.housekeep()
			continue
		case <-b.closing:
			// Commit what was submitted before Close; nothing new can arrive.
			batch = batch[:0]
			for {
				select {
				case p := <-b.reqs:
					batch = append(batch, p)
					continue
				default:
				}
				break
			}
			if len(batch) > 0 {
				b.commit(batch)
			}
			return
		}
		if wait := b.opts.CommitInterval - time.Since(last); wait > 0 {
			t := time.NewTimer(wait)
		gather:
			for len(batch) < maxBatch {
				select {
				case p := <-b.reqs:
					batch = append(batch, p)
				case <-t.C:
					break gather
				}
			}
			t.Stop()
		}
		for len(batch) < maxBatch {
			select {
			case p := <-b.reqs:
				batch = append(batch, p)
				continue
			default:
			}
			break
		}
		// The interval runs from the start of one commit to the start of the
		// next: a commit that took longer than it is followed at once by the
		// appends that waited for it, and commits still number at most one
		// per interval.
		last = time.Now()
		b.commit(batch)
		clear(batch)
		batch = batch[:0]
	}
}

const (
	maxBatch             = 4096 // appends in one transaction
	housekeepingInterval = 5 * time.Second
)

// txn is one write transaction's working copy of the state.
type txn struct {
	b     *Buffer
	tx    *bolt.Tx
	st    state
	enc   []byte
	added int
	evict bool        // drop-oldest may evict in this transaction
	undo  []keyChange // index changes, undone if the commit fails
}

// keyChange is one index entry as it was before the transaction.
type keyChange struct {
	space string
	id    keyID
	prev  uint64
	had   bool
}

func (b *Buffer) commit(batch []*Pending) {
	start := time.Now()
	b.writeMu.Lock()
	defer b.writeMu.Unlock()
	b.mu.Lock()
	base := b.st
	b.mu.Unlock()
	results := make([]Result, len(batch))
	errs := make([]error, len(batch))
	var next state
	attempt := func() error {
		t := &txn{b: b, st: base, evict: b.opts.OnFull == DropOldest}
		err := b.guard(func() error {
			return b.db.Update(func(tx *bolt.Tx) error {
				t.tx = tx
				for i, p := range batch {
					results[i], errs[i] = t.append(&p.msg)
				}
				if err := t.persist(); err != nil {
					return err
				}
				next = t.st
				return nil
			})
		})
		if err != nil {
			t.rollback()
		}
		return err
	}
	err := attempt()
	if isNoSpace(err) {
		// The file could not grow. Pages freed by uploads are reusable only
		// once no reader holds them, so under load the file fills before the
		// data reaches its budget: lower the budget to what fits now (never
		// below half of the configured one, or a transient shortage would
		// shrink it for good), make room under the policy, and try once more
		// (under "reject" the retry refuses what no longer fits).
		if lowered := max(base.usedBytes()*15/16, b.fullBudget/2); lowered < b.budget {
			b.budget = lowered
			b.opts.Logger.Warn("buffer file reached its size limit, lowering the data budget",
				"err", err, "budget_bytes", b.budget)
		}
		if errors.Is(err, syscall.ENOSPC) && !b.lowDisk.Load() {
			// The filesystem is full, not the file: low disk from now on
			// (housekeeping would see it only at its next round), so that
			// each append makes room under the policy.
			b.lowDisk.Store(true)
			b.opts.Logger.Warn("buffer disk full", "err", err)
		}
		if b.opts.OnFull == DropOldest {
			target := b.budget * 7 / 8
			if b.lowDisk.Load() {
				// Free pages for the retry: a transaction cannot reuse the
				// pages its own deletes free.
				target = min(target, base.usedBytes()*15/16)
			}
			if eerr := b.writeStateLocked(func(t *txn) error { return t.evictUntil(target) }); eerr != nil {
				b.opts.Logger.Warn("buffer eviction failed", "err", eerr)
			}
		}
		b.mu.Lock()
		base = b.st
		b.mu.Unlock()
		err = attempt()
	}
	// Publish the new state before any caller learns its append is done, so
	// that Stats and Peek right after Append see it.
	full := isNoSpace(err)
	readings := 0
	if err == nil {
		for i := range batch {
			full = full || errors.Is(errs[i], ErrFull)
			readings += results[i].Stored
		}
		b.mu.Lock()
		b.st = next
		if readings > 0 {
			close(b.wake)
			b.wake = make(chan struct{})
		}
		b.mu.Unlock()
	}
	b.mu.Lock()
	b.full = full
	b.mu.Unlock()
	// Counted before any caller learns its append is done, as the state is.
	if err == nil && b.opts.OnCommit != nil {
		b.opts.OnCommit(time.Since(start), readings)
	}
	for i, p := range batch {
		switch {
		case err != nil && isNoSpace(err):
			p.finish(Result{}, fmt.Errorf("%w: %w", ErrFull, err))
		case err != nil:
			p.finish(Result{}, fmt.Errorf("append to buffer: %w", err))
		default:
			p.finish(results[i], errs[i])
		}
	}
}

// append adds one message inside the transaction. A returned error concerns
// this message only; the transaction goes on with the others.
func (t *txn) append(m *Message) (Result, error) {
	if m.Key != nil && m.Key.Check {
		if t.hasKey(m.Key.Space, m.Key.ID) {
			return Result{Duplicate: true}, nil
		}
	}
	ci := m.Class.index()
	// bbolt keeps the value slices until commit, so encodings are only ever
	// appended to t.enc, never written over.
	var need uint64
	offs := make([]int, 0, len(m.Readings)+1)
	for i := range m.Readings {
		offs = append(offs, len(t.enc))
		t.enc = AppendRecord(t.enc, &m.Readings[i])
		need += accounted(t.enc[offs[i]:])
	}
	offs = append(offs, len(t.enc))
	enc := t.enc
	// Too large is judged against the configured budget, not the current
	// one: a message that merely waits for room is full, not too large.
	if int64(need) > t.b.fullBudget/2 {
		return Result{}, fmt.Errorf("%w: %d bytes, budget %d", ErrTooLarge, need, t.b.fullBudget)
	}
	limit := t.b.budget
	if t.b.lowDisk.Load() {
		limit = min(limit, t.st.usedBytes())
	}
	if m.Key != nil {
		need += uint64(accountedKey(m.Key.ID))
	}
	if free := limit - t.st.usedBytes(); int64(need) > free {
		if !t.evict {
			return Result{}, ErrFull
		}
		if err := t.evictUntil(limit - int64(need)); err != nil {
			return Result{}, err
		}
	}
	cs := &t.st.classes[ci]
	q := t.tx.Bucket(queueBucket(m.Class))
	q.FillPercent = 1 // keys only grow: pack pages full
	for i := range m.Readings {
		if err := q.Put(seqKey(cs.nextSeq), enc[offs[i]:offs[i+1]]); err != nil {
			return Result{}, err
		}
		if cs.readings == 0 {
			cs.oldest = m.Readings[i].Received
		}
		cs.nextSeq++
		cs.readings++
		cs.bytes += accounted(enc[offs[i]:offs[i+1]])
	}
	if m.Key != nil {
		if err := t.putKey(m.Key); err != nil {
			return Result{}, err
		}
	}
	t.added += len(m.Readings)
	return Result{Stored: len(m.Readings)}, nil
}

// evictUntil drops the oldest readings, lowest priority first, until the
// accounted readings and keys are at most target bytes (or no reading is left).
func (t *txn) evictUntil(target int64) error {
	for ci := len(Classes) - 1; ci >= 0 && t.st.usedBytes() > target; ci-- {
		cs := &t.st.classes[ci]
		q := t.tx.Bucket(queueBucket(Classes[ci]))
		err := deleteFront(q, func(_, v []byte) bool {
			if t.st.usedBytes() <= target {
				return false
			}
			cs.readings--
			cs.bytes -= accounted(v)
			t.st.dropped[DropFull]++
			return true
		})
		if err != nil {
			return err
		}
		cs.oldest = headReceived(q)
	}
	return nil
}

// persist writes the working state's counters into the transaction.
func (t *txn) persist() error {
	sb := t.tx.Bucket(bucketStreams)
	for i, c := range Classes {
		if err := sb.Put([]byte(c), encodeStream(&t.st.classes[i])); err != nil {
			return err
		}
	}
	m := t.tx.Bucket(bucketMeta)
	if err := m.Put(keyDropped, encodeCounters(t.st.dropped)); err != nil {
		return err
	}
	return m.Put(keyDeadCount, binary.BigEndian.AppendUint64(nil, uint64(t.st.deadLetters)))
}

func orderBucket(space string) []byte { return []byte("ko:" + space) }

// putKey stores k and prunes its space. On file the order bucket lists keys
// by insertion (order -> time + key), so a store is an append at its end and
// pruning takes from its front: two leaves per commit however many keys are
// kept. Lookups go to the in-memory index, which the transaction updates and
// rolls back if the commit fails.
func (t *txn) putKey(k *Key) error {
	ob, err := t.tx.CreateBucketIfNotExists(orderBucket(k.Space))
	if err != nil {
		return err
	}
	ob.FillPercent = 1
	order, err := ob.NextSequence()
	if err != nil {
		return err
	}
	ov := binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(k.ID)), uint64(t.b.opts.Now().UnixMicro()))
	if err := ob.Put(seqKey(order), append(ov, k.ID...)); err != nil {
		return err
	}
	t.setKey(k.Space, t.b.fp(k.ID), order)
	t.st.keyBytes += accountedKey(k.ID)
	cutoff := int64(-1 << 63)
	if k.TTL > 0 {
		cutoff = t.b.opts.Now().Add(-k.TTL).UnixMicro()
	}
	return deleteFront(ob, func(key, v []byte) bool {
		o := binary.BigEndian.Uint64(key)
		stale := k.Keep > 0 && order-o >= uint64(k.Keep)
		expired := len(v) >= 8 && int64(binary.BigEndian.Uint64(v)) < cutoff
		if !stale && !expired {
			return false
		}
		id := v[min(8, len(v)):]
		t.st.keyBytes = max(0, t.st.keyBytes-accountedKey(id))
		// The key may have been stored again since (or another id shares its
		// fingerprint): forget it only if this entry is still the latest.
		if ik := t.b.fp(id); t.b.keys[k.Space][ik] == o {
			t.setKey(k.Space, ik, 0)
		}
		return true
	})
}

// deleteFront deletes entries from the front of bk (8-byte sequence keys)
// for as long as take, which sees each entry first, returns true. It seeks
// past the deleted key rather than taking First again: leaves emptied in this
// transaction stay until commit and First walks them all, which made a large
// deletion quadratic.
func deleteFront(bk *bolt.Bucket, take func(k, v []byte) bool) error {
	c := bk.Cursor()
	var at [8]byte
	for k, v := c.First(); k != nil && take(k, v); k, v = c.Seek(at[:]) {
		copy(at[:], k)
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// hasKey reports whether id is a stored key of space: its fingerprint is in
// the index and the entry on file holds this very id.
func (t *txn) hasKey(space string, id []byte) bool {
	order, ok := t.b.keys[space][t.b.fp(id)]
	if !ok {
		return false
	}
	v := t.tx.Bucket(orderBucket(space)).Get(seqKey(order))
	return len(v) >= 8 && bytes.Equal(v[8:], id)
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

// isNoSpace reports a commit that failed because the file could not grow.
func isNoSpace(err error) bool {
	return errors.Is(err, bolterrors.ErrMaxSizeReached) || errors.Is(err, syscall.ENOSPC)
}

package buffer

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

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
	b      *Buffer
	tx     *bolt.Tx
	base   state // the committed state the transaction started from
	st     state // the working copy
	added  int
	evict  bool                   // drop-oldest may evict in this transaction
	chunks [2]chunkBuilder        // the records appended to each class, indexed like Classes
	keys   map[string]*keyBuilder // the keys stored in each space
	undo   []keyChange            // index changes, undone if the commit fails
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
		t := &txn{b: b, base: base, st: base, evict: b.opts.OnFull == DropOldest}
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
		if t.hasKey(m.Key) {
			return Result{Duplicate: true}, nil
		}
	}
	ci := m.Class.index()
	// The message's records go into t.b.scratch first: its size decides
	// whether it fits before anything of it is stored.
	enc := t.b.scratch[:0]
	ends := t.b.ends[:0]
	var need uint64
	for i := range m.Readings {
		start := len(enc)
		enc = AppendRecord(enc, &m.Readings[i])
		ends = append(ends, len(enc))
		need += recordCost(enc[start:])
	}
	t.b.scratch, t.b.ends = enc, ends
	// Too large is judged against the configured budget, not the current
	// one: a message that merely waits for room is full, not too large.
	if int64(need) > t.b.fullBudget/2 {
		return Result{}, fmt.Errorf("%w: %d bytes, budget %d", ErrTooLarge, need, t.b.fullBudget)
	}
	limit := t.b.budget
	if t.b.lowDisk.Load() {
		limit = min(limit, t.st.usedBytes())
	}
	need += chunkOverhead // at most one chunk more
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
	start := 0
	for i, end := range ends {
		if err := t.addRecord(ci, enc[start:end]); err != nil {
			return Result{}, err
		}
		start = end
		if cs.unsent() == 0 {
			cs.oldest = m.Readings[i].Received
		}
		cs.nextSeq++
	}
	if m.Key != nil {
		if err := t.putKey(m.Key); err != nil {
			return Result{}, err
		}
	}
	t.added += len(m.Readings)
	return Result{Stored: len(m.Readings)}, nil
}

// addRecord adds the record of class ci's next sequence number to the
// class's chunk, storing the chunk first when the record would take it past
// the chunk size.
func (t *txn) addRecord(ci int, rec []byte) error {
	c := &t.chunks[ci]
	cs := &t.st.classes[ci]
	if c.full(len(rec), t.b.maxChunk) {
		if err := t.putChunk(ci); err != nil {
			return err
		}
	}
	if c.empty() {
		// The first chunk of a commit reuses the buffer of the last commit's;
		// bbolt holds a stored chunk's bytes until this commit ends.
		buf := t.b.chunkBufs[ci]
		t.b.chunkBufs[ci] = nil
		c.start(cs.nextSeq, buf, t.b.maxChunk)
		cs.bytes += chunkOverhead
	}
	c.add(rec)
	cs.bytes += recordCost(rec)
	return nil
}

// putChunk stores class ci's chunk and starts none.
func (t *txn) putChunk(ci int) error {
	return t.chunks[ci].put(t.tx.Bucket(queueBucket(Classes[ci])))
}

// evictUntil drops the oldest readings, lowest priority first, until the
// accounted readings and keys are at most target bytes (or no reading is
// left). It drops whole chunks: a chunk's bytes are freed only with its
// last record.
func (t *txn) evictUntil(target int64) error {
	for ci := len(Classes) - 1; ci >= 0 && t.st.usedBytes() > target; ci-- {
		if !t.chunks[ci].empty() {
			// Records of this very transaction, not yet stored: store them,
			// so that eviction sees them in order.
			if err := t.putChunk(ci); err != nil {
				return err
			}
		}
		err := t.consume(ci, func(uint64, []byte) bool {
			if t.st.usedBytes() <= target {
				return false
			}
			t.st.dropped[DropFull]++
			return true
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// persist stores what the transaction gathered (chunks, keys) and writes the
// working state's counters that changed: every page a commit dirties is
// written and synced.
func (t *txn) persist() error {
	for ci := range t.chunks {
		if t.chunks[ci].empty() {
			continue
		}
		buf := t.chunks[ci].b
		if err := t.putChunk(ci); err != nil {
			return err
		}
		t.b.chunkBufs[ci] = buf[:0] // free again once the commit has ended
	}
	if err := t.flushKeys(); err != nil {
		return err
	}
	sb := t.tx.Bucket(bucketStreams)
	for i, c := range Classes {
		if cs := &t.st.classes[i]; *cs != t.base.classes[i] {
			if err := sb.Put([]byte(c), encodeStream(cs)); err != nil {
				return err
			}
		}
	}
	m := t.tx.Bucket(bucketMeta)
	if t.st.dropped != t.base.dropped {
		if err := m.Put(keyDropped, encodeCounters(t.st.dropped)); err != nil {
			return err
		}
	}
	if t.st.deadLetters != t.base.deadLetters {
		return m.Put(keyDeadCount, binary.BigEndian.AppendUint64(nil, uint64(t.st.deadLetters)))
	}
	return nil
}

// isNoSpace reports a commit that failed because the file could not grow.
func isNoSpace(err error) bool {
	return errors.Is(err, bolterrors.ErrMaxSizeReached) || errors.Is(err, syscall.ENOSPC)
}

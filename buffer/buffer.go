package buffer

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// FileName is the buffer's file inside the data directory.
const FileName = "buffer.db"

// formatVersion is the layout of buckets and keys; a file of a later layout
// is moved aside rather than misread. Format 2 stores records and keys in
// chunks (chunk.go, keys.go) and each class's head; a format 1 file (a value
// per reading and per key) is read as it is and becomes format 2 at open.
const formatVersion = 2

// Bucket and key names.
var (
	bucketMeta    = []byte("meta")
	bucketStreams = []byte("streams")
	bucketDead    = []byte("dead")
	keyFormat     = []byte("format")
	keyClean      = []byte("clean")
	keyGateway    = []byte("gateway_id")
	keySite       = []byte("site")
	keyDropped    = []byte("dropped") // dropped counters, one uint64 per drop reason
	keyDeadCount  = []byte("dead_letters")
	keyKeyBytes   = []byte("key_bytes") // written by versions before the in-memory key index
	keyRecovery   = []byte("recovery")  // last move-aside: unix µs + text
)

func queueBucket(c Class) []byte { return []byte("q:" + string(c)) }

// Buffer is the durable FIFO of readings. It is safe for concurrent use.
type Buffer struct {
	opts Options
	path string
	db   *bolt.DB

	reqs       chan *Pending               // appends waiting for the committer
	closing    chan struct{}               // closed when Close begins
	stopped    chan struct{}               // closed when the committer has returned
	close      sync.Once                   // guards Close
	closeMu    sync.RWMutex                // held shared while sending on reqs; Close takes it to stop sends
	isShut     bool                        // guarded by closeMu
	wake       chan struct{}               // readings arrived; replaced on each signal (guarded by mu)
	writeMu    sync.Mutex                  // serialises state-changing transactions; taken before mu
	mu         sync.Mutex                  // guards st, wake, damaged, full, rec
	st         state                       // committed state, mirrored from the file
	damaged    error                       // set once the file has shown damage
	full       bool                        // the last append found no room
	budget     int64                       // data bytes the file may hold now; lowered when bbolt hits MaxSize (writeMu)
	fullBudget int64                       // the budget MaxBytes allows; budget returns to it once the queue is empty
	lowDisk    atomic.Bool                 // the filesystem is below MinFreeDisk: set by the committer, read by every writer
	rec        *Recovery                   // what Open had to do, if anything
	keys       map[string]map[keyID]uint64 // idempotency keys by space: fingerprint -> order (writeMu)
	fp         func([]byte) keyID          // fingerprint; tests replace it to force collisions
	scratch    []byte                      // one message's encoded records (writeMu)
	ends       []int                       // where each of them ends in scratch (writeMu)
	chunkBufs  [2][]byte                   // chunk buffers free for the next commit, by class (writeMu)
	maxChunk   int                         // the largest chunk that is not alone in a page

	gatewayID, site string // as stored in the file
}

// Recovery describes a buffer file that was found damaged and moved aside.
type Recovery struct {
	At      time.Time // when it was moved
	MovedTo string    // the damaged file's new path
	Reason  string    // what was wrong
	// LostReadings is how many unsent readings the damaged file held, -1 when
	// its counters could not be read either.
	LostReadings int64
}

// Open opens or creates the buffer in opts.Dir. A file that cannot be read is
// moved aside and a new one (new streams) is started; Recovery then reports it.
// It returns ErrLocked when another process has the file open.
func Open(opts Options) (*Buffer, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if opts.Dir == "" {
		return nil, errors.New("open buffer: no data directory")
	}
	opts.setDefaults()
	if err := os.MkdirAll(opts.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("open buffer: create data directory: %w", err)
	}
	b := &Buffer{
		opts:    opts,
		path:    filepath.Join(opts.Dir, FileName),
		reqs:    make(chan *Pending, 1024),
		closing: make(chan struct{}),
		stopped: make(chan struct{}),
		wake:    make(chan struct{}),
		fp:      fingerprint,
	}
	b.fullBudget = dataBudget(opts.MaxBytes)
	b.budget = b.fullBudget
	if err := b.openFile(); err != nil {
		return nil, err
	}
	go b.run()
	return b, nil
}

// dataBudget is how many accounted data bytes fit a file of max bytes:
// bbolt needs room for branch pages, page headers and the freelist, and
// pages freed by an upload are reusable only once no reader holds them.
func dataBudget(max int64) int64 { return max * 3 / 4 }

func (b *Buffer) openFile() error {
	marker := b.path + ".suspect"
	if _, err := os.Stat(marker); err == nil {
		if err := b.moveAside(errors.New("marked damaged while in use")); err != nil {
			return err
		}
		_ = os.Remove(marker)
	}
	db, err := b.openDB()
	if errors.Is(err, ErrLocked) {
		return err
	}
	if err == nil {
		err = b.load(db)
		if err != nil {
			_ = db.Close()
		}
	}
	if err != nil {
		if errors.Is(err, ErrLocked) {
			return err
		}
		if merr := b.moveAside(err); merr != nil {
			return merr
		}
		if db, err = b.openDB(); err != nil {
			return fmt.Errorf("open new buffer %s: %w", b.path, err)
		}
		if err = b.load(db); err != nil {
			_ = db.Close()
			return fmt.Errorf("initialise new buffer %s: %w", b.path, err)
		}
	}
	b.db = db
	b.maxChunk = maxChunkBytes(db.Info().PageSize)
	return nil
}

// openDB opens the bbolt file, turning a panic or memory fault inside bbolt
// (a torn file after power loss) into an error.
func (b *Buffer) openDB() (db *bolt.DB, err error) {
	if err := walkPages(b.path); err != nil {
		return nil, err
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("open %s: bbolt panicked: %v", b.path, r)
		}
	}()
	db, err = bolt.Open(b.path, 0o600, &bolt.Options{
		Timeout:        time.Second,
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
		MaxSize:        int(b.opts.MaxBytes),
		Logger:         nil,
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: %w", b.path, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", b.path, err)
	}
	return db, nil
}

// walkPages reads every page of an existing file read-only, here, where a
// panic or memory fault becomes an error. A read-write bolt.Open rebuilds the
// freelist (NoFreelistSync) by walking the pages on a goroutine of its own,
// where a damaged page crashes the process, at every start.
func walkPages(path string) (err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil // no file yet, or one Open reports on
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("read %s: bbolt panicked: %v", path, r)
		}
	}()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return fmt.Errorf("open %s: %w", path, ErrLocked)
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer db.Close()
	return db.View(func(tx *bolt.Tx) error {
		if tx.Size() > fi.Size() {
			return fmt.Errorf("read %s: %d bytes, but its pages reach to byte %d (torn)", path, fi.Size(), tx.Size())
		}
		return tx.ForEach(func(_ []byte, bk *bolt.Bucket) error { return walkBucket(bk) })
	})
}

// walkBucket visits every element of bk and its sub-buckets, and so every
// branch and leaf page they live on.
func walkBucket(bk *bolt.Bucket) error {
	return bk.ForEach(func(k, v []byte) error {
		if v == nil {
			if sub := bk.Bucket(k); sub != nil {
				return walkBucket(sub)
			}
		}
		return nil
	})
}

// moveAside renames a damaged file so that a new one can start, and records
// what was lost for status and the next heartbeat.
func (b *Buffer) moveAside(cause error) error {
	lost := salvageCount(b.path)
	at := b.opts.Now()
	dst := fmt.Sprintf("%s.damaged-%s", b.path, at.UTC().Format("20060102T150405.000000000"))
	if err := os.Rename(b.path, dst); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("move damaged buffer %s aside: %w (first problem: %v)", b.path, err, cause)
	}
	b.rec = &Recovery{At: at, MovedTo: dst, Reason: cause.Error(), LostReadings: lost}
	b.opts.Logger.Error("buffer file damaged, moved aside; starting new streams",
		"err", cause, "moved_to", dst, "readings", lost)
	return nil
}

// salvageCount reads the unsent reading count of a damaged file, if bbolt
// can still read that much of it; -1 otherwise.
func salvageCount(path string) (n int64) {
	n = -1
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if recover() != nil {
			n = -1
		}
	}()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return -1
	}
	defer db.Close()
	_ = db.View(func(tx *bolt.Tx) error {
		sb := tx.Bucket(bucketStreams)
		if sb == nil {
			return nil
		}
		var total int64
		for _, c := range Classes {
			if v := sb.Get([]byte(c)); len(v) == streamValueLen || len(v) == streamValueLenV1 {
				if cs, _ := decodeStream(v); cs.head <= cs.nextSeq {
					total += int64(cs.unsent())
				}
			}
		}
		n = total
		return nil
	})
	return n
}

// load checks and reads the file into memory, creating what is missing.
// An error means the file is unusable and should be moved aside.
func (b *Buffer) load(db *bolt.DB) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("read %s: bbolt panicked: %v", b.path, r)
		}
	}()
	var clean bool
	if err := db.View(func(tx *bolt.Tx) error {
		if m := tx.Bucket(bucketMeta); m != nil {
			if v := m.Get(keyFormat); v != nil && (len(v) != 4 || binary.BigEndian.Uint32(v) == 0 || binary.BigEndian.Uint32(v) > formatVersion) {
				return fmt.Errorf("unknown buffer format %x", v)
			}
			clean = len(m.Get(keyClean)) == 1 && m.Get(keyClean)[0] == 1
		} else {
			clean = true // a new file
		}
		return nil
	}); err != nil {
		return err
	}
	if !clean {
		// The last process did not close the file: check every page before trusting it.
		if err := db.View(func(tx *bolt.Tx) error {
			for cerr := range tx.Check() {
				return fmt.Errorf("consistency check: %w", cerr)
			}
			return nil
		}); err != nil {
			return err
		}
	}
	var st state
	err = db.Update(func(tx *bolt.Tx) error {
		m, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		if err := m.Put(keyFormat, binary.BigEndian.AppendUint32(nil, formatVersion)); err != nil {
			return err
		}
		// A tool opening the file without an identity keeps the stored one.
		if b.opts.GatewayID != "" {
			if err := m.Put(keyGateway, []byte(b.opts.GatewayID)); err != nil {
				return err
			}
		}
		if b.opts.Site != "" {
			if err := m.Put(keySite, []byte(b.opts.Site)); err != nil {
				return err
			}
		}
		b.gatewayID, b.site = string(m.Get(keyGateway)), string(m.Get(keySite))
		if err := m.Put(keyClean, []byte{0}); err != nil {
			return err
		}
		if b.rec != nil {
			if err := m.Put(keyRecovery, encodeRecovery(b.rec)); err != nil {
				return err
			}
		} else if v := m.Get(keyRecovery); v != nil {
			b.rec = decodeRecovery(v)
		}
		if _, err := tx.CreateBucketIfNotExists(bucketDead); err != nil {
			return err
		}
		sb, err := tx.CreateBucketIfNotExists(bucketStreams)
		if err != nil {
			return err
		}
		for i, c := range Classes {
			q, err := tx.CreateBucketIfNotExists(queueBucket(c))
			if err != nil {
				return err
			}
			cs := &st.classes[i]
			if v := sb.Get([]byte(c)); v != nil {
				if len(v) != streamValueLen && len(v) != streamValueLenV1 {
					return fmt.Errorf("stream record of class %s has %d bytes", c, len(v))
				}
				var hasHead bool
				if *cs, hasHead = decodeStream(v); !hasHead {
					// Format 1: the queue starts at its first record.
					cs.head = cs.nextSeq
					if k, _ := q.Cursor().First(); k != nil {
						cs.head = binary.BigEndian.Uint64(k)
					}
				}
				if cs.head > cs.nextSeq {
					return fmt.Errorf("stream of class %s: head %d is past the next sequence number %d", c, cs.head, cs.nextSeq)
				}
			} else {
				if _, err := rand.Read(cs.stream[:]); err != nil {
					return fmt.Errorf("make stream id: %w", err)
				}
				cs.stream[6] = cs.stream[6]&0x0f | 0x40 // UUID version 4
				cs.stream[8] = cs.stream[8]&0x3f | 0x80 // RFC 4122 variant
				cs.nextSeq, cs.head = 1, 1
			}
			if err := sb.Put([]byte(c), encodeStream(cs)); err != nil {
				return err
			}
			cs.oldest = headReceived(q, cs)
		}
		st.dropped = decodeCounters(m.Get(keyDropped))
		if v := m.Get(keyDeadCount); len(v) == 8 {
			st.deadLetters = int64(binary.BigEndian.Uint64(v))
		}
		st.keyBytes, err = b.loadKeys(tx)
		return err
	})
	if err != nil {
		return err
	}
	if err := db.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", b.path, err)
	}
	b.st = st
	return nil
}

// guard runs fn with memory faults turned into panics and any panic from
// bbolt turned into ErrDamaged. A damaged file is marked so that the next Open
// moves it aside instead of crashing again.
func (b *Buffer) guard(fn func() error) (err error) {
	b.mu.Lock()
	damaged := b.damaged
	b.mu.Unlock()
	if damaged != nil {
		return damaged
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = b.markDamaged(fmt.Errorf("%w: bbolt panicked: %v", ErrDamaged, r))
		}
	}()
	return fn()
}

func (b *Buffer) markDamaged(err error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.damaged == nil {
		b.damaged = err
		if f, ferr := os.Create(b.path + ".suspect"); ferr == nil {
			_, _ = f.WriteString(err.Error() + "\n")
			_ = f.Sync()
			_ = f.Close()
		}
		b.opts.Logger.Error("buffer file damaged; restart to move it aside", "err", err)
	}
	return b.damaged
}

// Close stops taking appends, commits those already submitted, and closes
// the file. It is idempotent; later calls return nil.
func (b *Buffer) Close() error {
	var err error
	b.close.Do(func() {
		b.closeMu.Lock()
		b.isShut = true
		b.closeMu.Unlock()
		close(b.closing)
		<-b.stopped
		err = b.guard(func() error {
			return b.db.Update(func(tx *bolt.Tx) error {
				return tx.Bucket(bucketMeta).Put(keyClean, []byte{1})
			})
		})
		if cerr := b.db.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close %s: %w", b.path, cerr))
		}
		b.opts.Logger.Info("buffer closed", "readings", b.Stats().Readings)
	})
	return err
}

// Recovered reports the last time a damaged file was moved aside, or nil.
func (b *Buffer) Recovered() *Recovery {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.rec == nil {
		return nil
	}
	r := *b.rec
	return &r
}

// Path is the buffer file.
func (b *Buffer) Path() string { return b.path }

// Changed returns a channel that is closed when readings are next appended.
func (b *Buffer) Changed() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.wake
}

func encodeRecovery(r *Recovery) []byte {
	v := binary.BigEndian.AppendUint64(nil, uint64(r.At.UnixMicro()))
	v = binary.BigEndian.AppendUint64(v, uint64(r.LostReadings))
	v = appendString(v, r.MovedTo)
	return append(v, r.Reason...)
}

func decodeRecovery(v []byte) *Recovery {
	if len(v) < 16 {
		return nil
	}
	r := &Recovery{
		At:           time.UnixMicro(int64(binary.BigEndian.Uint64(v))).UTC(),
		LostReadings: int64(binary.BigEndian.Uint64(v[8:])),
	}
	d := decoder{b: v[16:]}
	r.MovedTo = d.string()
	r.Reason = string(d.b)
	return r
}

// Identity is the gateway id and site stored in the file.
func (b *Buffer) Identity() (gatewayID, site string) { return b.gatewayID, b.site }

// Package uplink uploads buffered readings to the central Postgres exactly
// once, and reports the gateway's health there. It knows nothing of MQTT or CoAP.
package uplink

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"

	"github.com/sluice-gw/sluice/buffer"
)

// queryExecMode: unnamed statements only, so uploads work through PgBouncer's
// transaction pooling, which carries no named prepared statement between
// transactions before PgBouncer 1.21.
const queryExecMode = pgx.QueryExecModeExec

// Source is the buffer as the uplink sees it. *buffer.Buffer implements it.
// Implementations must be safe for concurrent use; Peek returns copies the
// uplink may keep.
type Source interface {
	// PeekAppend returns the oldest unsent readings of the highest class, at
	// most max, appended to dst[:0] (which it may reuse).
	PeekAppend(dst []buffer.Record, max int) (buffer.Batch, error)
	Ack(stream [16]byte, upTo uint64, dead []buffer.DeadLetter) error
	Changed() <-chan struct{}
	Stats() buffer.Stats
	Recovered() *buffer.Recovery
}

// State is the uplink's connection state.
type State string

// Uplink states.
const (
	StateConnecting State = "connecting" // not yet reached Postgres
	StateUp         State = "up"         // the last attempt succeeded
	StateRetrying   State = "retrying"   // the last attempt failed; waiting to retry
)

// Status is a snapshot for the admin page and status command.
type Status struct {
	State         State
	LastSuccess   time.Time // last committed batch or heartbeat
	LastUpload    time.Time // last committed batch
	LastHeartbeat time.Time // last heartbeat the server took
	LastError     string
	LastErrorAt   time.Time
	SchemaVersion int
	Uploaded      int64 // readings inserted or recognised as already there
}

// Uplink moves readings from the buffer to Postgres.
type Uplink struct {
	opts    Options
	src     Source
	pool    *pgxpool.Pool
	metrics *metrics
	limiter *rate.Limiter // nil: unlimited

	mu       sync.Mutex // guards status, pace
	status   Status
	pace     float64       // 1 normally; lowered after overload answers
	schemaOK chan struct{} // closed once the schema is known good
	once     sync.Once     // guards schemaOK

	conflictWay atomic.Int32 // batches left to send the ON CONFLICT way (see copyDirect)

	// spare is the last batch's records, lent to the next PeekAppend: a batch
	// of decoded readings is about a megabyte. Only the upload loop and, after
	// it, Flush use it.
	spare []buffer.Record
}

// New checks the options and prepares the connection pool; it does not
// connect, so a database that is down at boot is retried, not a failed start.
func New(opts Options, src Source) (*Uplink, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if opts.DSN == "" {
		return nil, errors.New("uplink: no dsn")
	}
	opts.setDefaults()
	cfg, err := pgxpool.ParseConfig(opts.DSN)
	if err != nil {
		return nil, errors.New("uplink: dsn is not a valid Postgres connection string")
	}
	cfg.ConnConfig.DefaultQueryExecMode = queryExecMode
	cfg.ConnConfig.StatementCacheCapacity = 0
	cfg.ConnConfig.DescriptionCacheCapacity = 0
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = 10 * time.Second
	}
	if cfg.ConnConfig.RuntimeParams == nil {
		cfg.ConnConfig.RuntimeParams = map[string]string{}
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "sluice " + opts.GatewayID
	cfg.MaxConns = 2 // one uploading, one for the heartbeat
	cfg.MinConns = 0
	cfg.MaxConnIdleTime = 5 * time.Minute
	if opts.ConnConfig != nil {
		if err := opts.ConnConfig(cfg.ConnConfig); err != nil {
			return nil, fmt.Errorf("uplink: connection config: %w", err)
		}
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, fmt.Errorf("uplink: create pool: %w", err)
	}
	u := &Uplink{
		opts:     opts,
		src:      src,
		pool:     pool,
		metrics:  newMetrics(opts.Registerer),
		pace:     1,
		schemaOK: make(chan struct{}),
		status:   Status{State: StateConnecting},
	}
	if opts.MaxRate > 0 {
		u.limiter = rate.NewLimiter(rate.Limit(opts.MaxRate), u.batchSize())
	}
	return u, nil
}

// batchSize is the readings per batch: when paced, at most a tenth of a
// second's worth, which is also the limiter's burst, so that no second
// uploads more than 1.1 x max_rate.
func (u *Uplink) batchSize() int {
	n := u.opts.BatchSize
	if u.opts.MaxRate > 0 {
		n = min(n, max(1, int(u.opts.MaxRate/pacedBatchesPerSecond)))
	}
	return n
}

// pacedBatchesPerSecond is how finely max_rate is sliced.
const pacedBatchesPerSecond = 10

// Close releases the pool. Call it after Run and Flush have returned.
func (u *Uplink) Close() { u.pool.Close() }

// Status returns a snapshot.
func (u *Uplink) Status() Status {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.status
}

// Run uploads until ctx is done, then returns nil. Failures are retried with
// capped, jittered exponential backoff; Run never gives up on its own. The
// heartbeat runs beside the uploads on its own interval.
func (u *Uplink) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() { u.heartbeatLoop(ctx) })
	defer wg.Wait()
	u.uploadLoop(ctx)
	return nil
}

// Flush uploads what is buffered until the buffer is empty or ctx is done,
// for the bounded upload at shutdown. It tries each batch once, without
// backoff: at shutdown there is no time to wait for a database to return.
func (u *Uplink) Flush(ctx context.Context) error {
	if err := u.ensureSchema(ctx); err != nil {
		return err
	}
	for ctx.Err() == nil {
		batch, err := u.src.PeekAppend(u.spare, u.batchSize())
		if err != nil {
			return err
		}
		if len(batch.Records) == 0 {
			return nil
		}
		err = u.upload(ctx, batch)
		u.spare = batch.Records
		if err != nil {
			return err
		}
	}
	return ctx.Err()
}

func (u *Uplink) newBackoff() *backoff.ExponentialBackOff {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 200 * time.Millisecond
	b.MaxInterval = u.opts.BackoffMax
	b.RandomizationFactor = 0.5
	b.Multiplier = 2
	return b
}

// wait sleeps for d or until ctx is done; it reports whether ctx is still live.
func wait(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (u *Uplink) uploadLoop(ctx context.Context) {
	bo := u.newBackoff()
	failing := false
	for ctx.Err() == nil {
		if err := u.ensureSchema(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			failing = true
			d := bo.NextBackOff()
			u.failed(err, d)
			if !wait(ctx, d) {
				return
			}
			continue
		}
		batch, err := u.nextBatch(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.NextBackOff()
			u.failed(err, d)
			if !wait(ctx, d) {
				return
			}
			continue
		}
		if failing {
			// Back after an outage: a random pause so that a fleet recovering
			// at once does not arrive at the database in the same second.
			failing = false
			if !wait(ctx, time.Duration(rand.Int64N(int64(u.opts.BatchWait)+1))) {
				return
			}
		}
		if u.limiter != nil {
			if err := u.limiter.WaitN(ctx, len(batch.Records)); err != nil {
				return
			}
		}
		start := time.Now()
		err = u.upload(ctx, batch)
		u.spare = batch.Records // done with it: the next batch reuses its records
		if err == nil {
			bo.Reset()
			u.recover(time.Since(start), ctx)
			continue
		}
		if ctx.Err() != nil {
			return
		}
		failing = true
		if classify(err) == classOverload {
			u.slowDown()
		}
		d := bo.NextBackOff()
		u.failed(err, d)
		if !wait(ctx, d) {
			return
		}
	}
}

// nextBatch waits until a full batch is buffered, or a partial one has
// waited BatchWait, and returns it.
func (u *Uplink) nextBatch(ctx context.Context) (buffer.Batch, error) {
	size := u.batchSize()
	var deadline <-chan time.Time
	for {
		changed := u.src.Changed()
		st := u.src.Stats()
		if st.Readings >= int64(size) || (st.Readings > 0 && deadline == nil && u.waitedEnough(st)) {
			return u.src.PeekAppend(u.spare, size)
		}
		if st.Readings > 0 && deadline == nil {
			t := time.NewTimer(u.opts.BatchWait)
			defer t.Stop()
			deadline = t.C
		}
		select {
		case <-ctx.Done():
			return buffer.Batch{}, ctx.Err()
		case <-changed:
		case <-deadline:
			return u.src.PeekAppend(u.spare, size)
		}
	}
}

// waitedEnough: readings that are older than BatchWait already (a backlog
// after restart or outage) need not wait again.
func (u *Uplink) waitedEnough(st buffer.Stats) bool {
	return !st.Oldest.IsZero() && time.Since(st.Oldest) >= u.opts.BatchWait
}

// slowDown halves the pace after the server reported overload.
func (u *Uplink) slowDown() {
	u.mu.Lock()
	u.pace = max(u.pace/2, 1.0/64)
	u.mu.Unlock()
}

// recover records success and, while slowed down, waits so that uploads
// take 1/pace of the time they would, then regains pace step by step.
func (u *Uplink) recover(took time.Duration, ctx context.Context) {
	u.mu.Lock()
	pace := u.pace
	u.pace = min(1, u.pace*1.25)
	u.mu.Unlock()
	if pace < 1 {
		wait(ctx, time.Duration(float64(took)*(1/pace-1)))
	}
}

func (u *Uplink) failed(err error, retryIn time.Duration) {
	now := time.Now()
	u.mu.Lock()
	first := u.status.State != StateRetrying
	u.status.State = StateRetrying
	u.status.LastError = errSummary(err)
	u.status.LastErrorAt = now
	u.mu.Unlock()
	u.metrics.up.Set(0)
	if first {
		u.opts.Logger.Warn("uplink failed, retrying", "err", err, "backoff", retryIn)
	} else {
		u.opts.Logger.Debug("uplink still failing", "err", err, "backoff", retryIn)
	}
}

func (u *Uplink) succeeded(uploaded int) {
	now := time.Now()
	u.mu.Lock()
	if u.status.State != StateUp {
		u.opts.Logger.Info("uplink connected")
	}
	u.status.State = StateUp
	u.status.LastSuccess = now
	if uploaded > 0 {
		u.status.LastUpload = now
		u.status.Uploaded += int64(uploaded)
	}
	u.mu.Unlock()
	u.metrics.up.Set(1)
}

// ensureSchema migrates once per process (and partitions ahead).
func (u *Uplink) ensureSchema(ctx context.Context) error {
	select {
	case <-u.schemaOK:
		return nil
	default:
	}
	v, err := ensureSchema(ctx, u.pool)
	if err != nil {
		return err
	}
	if _, err := u.pool.Exec(ctx, "SELECT sluice.ensure_partitions($1)", u.opts.PartitionDaysAhead); err != nil {
		// Partitions are an optimisation: the default partition takes every row.
		u.opts.Logger.Warn("uplink could not create partitions ahead", "err", err)
	}
	u.mu.Lock()
	u.status.SchemaVersion = v
	u.mu.Unlock()
	u.once.Do(func() { close(u.schemaOK) })
	return nil
}

// FlushTimeout is the configured bound of the shutdown upload.
func (u *Uplink) FlushTimeout() time.Duration { return u.opts.FlushTimeout }

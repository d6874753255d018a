package uplink

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/sluice-gw/sluice/buffer"
)

// Statements of the batch transaction. The temp table lives only inside the
// transaction (ON COMMIT DROP): no session state, so PgBouncer's transaction
// pooling may hand the next transaction to another server connection.
const (
	sqlStreamUpsert = `INSERT INTO sluice.streams (stream_id, gateway_id) VALUES ($1::uuid, $2)
ON CONFLICT (stream_id) DO NOTHING`
	sqlStreamLock    = `SELECT acked_seq FROM sluice.streams WHERE stream_id = $1::uuid FOR UPDATE`
	sqlTempTable     = `CREATE TEMP TABLE sluice_batch (LIKE sluice.readings) ON COMMIT DROP`
	sqlInsertBatch   = `INSERT INTO sluice.readings SELECT * FROM sluice_batch ON CONFLICT ON CONSTRAINT readings_natural_key DO NOTHING`
	sqlStreamAdvance = `UPDATE sluice.streams SET acked_seq = greatest(acked_seq, $2), updated_at = now() WHERE stream_id = $1::uuid`
)

// upload sends one batch and acknowledges it in the buffer. A batch Postgres
// refuses for its content is bisected until the refused readings are
// isolated; those become dead letters and the rest goes through.
func (u *Uplink) upload(ctx context.Context, batch buffer.Batch) error {
	if u.opts.Restamp != nil {
		for i := range batch.Records {
			u.opts.Restamp(&batch.Records[i].Reading)
		}
	}
	err := u.uploadRecords(ctx, batch.Stream, batch.Records)
	if err != nil && classify(err) == classContent {
		u.opts.Logger.Warn("uplink batch refused for its content, bisecting",
			"err", err, "stream_id", streamString(batch.Stream), "readings", len(batch.Records))
		return u.bisect(ctx, batch.Stream, batch.Records, err)
	}
	return err
}

// uploadRecords commits records in one transaction, then acknowledges them.
func (u *Uplink) uploadRecords(ctx context.Context, stream [16]byte, recs []buffer.Record) error {
	start := time.Now()
	inserted, skipped, err := u.commitBatch(ctx, stream, recs, true)
	u.metrics.batchDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		u.metrics.batches.WithLabelValues("error").Inc()
		return err
	}
	last := recs[len(recs)-1].Seq
	if err := u.src.Ack(stream, last, nil); err != nil {
		// Committed centrally but still in the buffer: the resend is
		// recognised by the watermark, so nothing is stored twice.
		return fmt.Errorf("acknowledge batch in buffer: %w", err)
	}
	u.metrics.batches.WithLabelValues("ok").Inc()
	u.metrics.readings.Add(float64(inserted))
	u.metrics.duplicates.Add(float64(skipped))
	u.succeeded(len(recs))
	return nil
}

// bisect splits records until the content error is pinned on single
// readings; first is the error the whole set got.
func (u *Uplink) bisect(ctx context.Context, stream [16]byte, recs []buffer.Record, first error) error {
	if len(recs) == 1 {
		dead := []buffer.DeadLetter{{Record: recs[0], Err: errSummary(first)}}
		if err := u.src.Ack(stream, recs[0].Seq, dead); err != nil {
			return fmt.Errorf("dead-letter reading %d: %w", recs[0].Seq, err)
		}
		u.metrics.batches.WithLabelValues("dead_letter").Inc()
		u.opts.Logger.Warn("uplink reading moved to dead letters",
			"err", first, "stream_id", streamString(stream), "seq", recs[0].Seq, "sensor", recs[0].Sensor)
		return nil
	}
	mid := len(recs) / 2
	for _, half := range [][]buffer.Record{recs[:mid], recs[mid:]} {
		err := u.uploadRecords(ctx, stream, half)
		if err == nil {
			continue
		}
		if classify(err) != classContent {
			return err
		}
		if err := u.bisect(ctx, stream, half, err); err != nil {
			return err
		}
	}
	return nil
}

// commitBatch is the exactly-once transaction: lock the stream's watermark,
// skip what it already covers, store the rest (copied straight in when none
// of it is there yet, else through a temp table and an insert of what the
// natural key does not already hold), advance the watermark, commit.
//
// useWatermark false (importing dead letters) skips the watermark entirely.
func (u *Uplink) commitBatch(ctx context.Context, stream [16]byte, recs []buffer.Record, useWatermark bool) (inserted, skipped int64, err error) {
	tx, err := u.pool.Begin(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("begin batch: %w", err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()

	var acked int64
	id := streamString(stream)
	if useWatermark {
		pre := &pgx.Batch{}
		pre.Queue(sqlStreamUpsert, id, u.opts.GatewayID)
		pre.Queue(sqlStreamLock, id).QueryRow(func(row pgx.Row) error { return row.Scan(&acked) })
		if err := tx.SendBatch(ctx, pre).Close(); err != nil {
			return 0, 0, fmt.Errorf("lock stream %s: %w", id, err)
		}
	}
	todo := recs
	for len(todo) > 0 && int64(todo[0].Seq) <= acked {
		todo = todo[1:]
	}
	skipped = int64(len(recs) - len(todo))
	if len(todo) == 0 {
		// A resend of a batch that committed before the gateway could
		// acknowledge it locally.
		return 0, skipped, nil
	}
	copied, direct, err := u.copyDirect(ctx, tx, todo)
	if err != nil {
		return 0, 0, err
	}
	post := &pgx.Batch{}
	if direct {
		inserted = copied
	} else {
		if _, err := tx.Exec(ctx, sqlTempTable); err != nil {
			return 0, 0, fmt.Errorf("create batch table: %w", err)
		}
		if _, err := copyReadings(ctx, tx.Conn().PgConn(), "sluice_batch", u.opts.GatewayID, u.opts.Site, todo); err != nil {
			return 0, 0, fmt.Errorf("copy batch: %w", err)
		}
		post.Queue(sqlInsertBatch).Exec(func(tag pgconn.CommandTag) error {
			inserted = tag.RowsAffected()
			return nil
		})
	}
	if useWatermark {
		post.Queue(sqlStreamAdvance, id, int64(todo[len(todo)-1].Seq))
	}
	if err := tx.SendBatch(ctx, post).Close(); err != nil {
		return 0, 0, fmt.Errorf("insert batch: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, 0, fmt.Errorf("commit batch: %w", err)
	}
	skipped += int64(len(todo)) - inserted
	return inserted, skipped, nil
}

// conflictBatches is how many batches go the ON CONFLICT way after a direct
// COPY met a reading Postgres already had: duplicates come in runs (a sensor
// resending its backlog, a broker redelivering), and a failed COPY is
// wasted work.
const conflictBatches = 16

// copyDirect copies recs straight into sluice.readings under a savepoint,
// which is about twice as fast as the temp table and INSERT ... ON CONFLICT,
// and gives the same rows when none of recs is already there. It returns
// the rows copied, or ok false when the caller must take the ON CONFLICT
// way: the COPY met a natural key already stored (and was rolled back to the
// savepoint), or a recent batch did.
func (u *Uplink) copyDirect(ctx context.Context, tx pgx.Tx, recs []buffer.Record) (copied int64, ok bool, err error) {
	if u.conflictWay.Load() > 0 {
		u.conflictWay.Add(-1)
		return 0, false, nil
	}
	sp, err := tx.Begin(ctx)
	if err != nil {
		return 0, false, fmt.Errorf("savepoint before copy: %w", err)
	}
	n, err := copyReadings(ctx, sp.Conn().PgConn(), "sluice.readings", u.opts.GatewayID, u.opts.Site, recs)
	if err == nil {
		if err := sp.Commit(ctx); err != nil {
			return 0, false, fmt.Errorf("release savepoint: %w", err)
		}
		return n, true, nil
	}
	if !isUniqueViolation(err) {
		return 0, false, fmt.Errorf("copy batch: %w", err)
	}
	if err := sp.Rollback(ctx); err != nil {
		return 0, false, fmt.Errorf("roll back to savepoint after a duplicate: %w", err)
	}
	u.conflictWay.Store(conflictBatches)
	return 0, false, nil
}

func streamString(s [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", s[0:4], s[4:6], s[6:8], s[8:10], s[10:16])
}

package uplink

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/sluice-gw/sluice/buffer"
)

// ImportRecord is one exported reading with the stream position and the
// gateway it came from.
type ImportRecord struct {
	Stream    [16]byte
	GatewayID string
	Site      string
	Dead      bool // a dead letter: its sequence number is below the watermark by design
	Record    buffer.Record
}

// ImportResult counts what an import did.
type ImportResult struct {
	Inserted, Skipped int64
}

// Import uploads exported readings under the same rules as the gateway:
// per stream in sequence order, skipping what the watermark covers, and the
// natural key for the rest. Dead letters skip the watermark check (they are
// below it by construction) and rely on the natural key alone. recs must be
// sorted by sequence number within each stream.
func Import(ctx context.Context, dsn string, recs []ImportRecord) (ImportResult, error) {
	var res ImportResult
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return res, fmt.Errorf("import: dsn is not a valid Postgres connection string")
	}
	cfg.ConnConfig.DefaultQueryExecMode = queryExecMode
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return res, fmt.Errorf("import: %w", err)
	}
	defer pool.Close()
	if _, err := ensureSchema(ctx, pool); err != nil {
		return res, fmt.Errorf("import: %w", err)
	}
	type key struct {
		stream        [16]byte
		gateway, site string
		dead          bool
	}
	groups := map[key][]buffer.Record{}
	var order []key
	for _, r := range recs {
		k := key{r.Stream, r.GatewayID, r.Site, r.Dead}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], r.Record)
	}
	for _, k := range order {
		w := &Uplink{opts: Options{GatewayID: k.gateway, Site: k.site}, pool: pool}
		all := groups[k]
		for start := 0; start < len(all); start += DefaultBatchSize {
			batch := all[start:min(start+DefaultBatchSize, len(all))]
			ins, skip, err := w.commitBatch(ctx, k.stream, batch, !k.dead)
			if err != nil {
				return res, fmt.Errorf("import stream %s: %w", streamString(k.stream), err)
			}
			res.Inserted += ins
			res.Skipped += skip
		}
	}
	return res, nil
}

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/uplink"
)

type fleetCmd struct {
	DSN     string `help:"Postgres connection string (a role that may read the sluice schema)." placeholder:"DSN"`
	DSNFile string `help:"File holding the DSN." placeholder:"FILE" name:"dsn-file"`
	JSON    bool   `help:"Print the rows as JSON." name:"json"`
}

func (f *fleetCmd) Run() error {
	dsn, err := dsnFrom(f.DSN, f.DSNFile)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := uplink.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("fleet: %w", err)
	}
	defer conn.Close(context.Background())
	rows, err := uplink.Fleet(ctx, conn)
	if err != nil {
		return err
	}
	if f.JSON {
		if rows == nil {
			rows = []uplink.FleetRow{}
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	return printFleet(os.Stdout, rows)
}

func printFleet(w io.Writer, rows []uplink.FleetRow) error {
	if len(rows) == 0 {
		_, err := fmt.Fprintln(w, "no gateway has sent a heartbeat yet")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GATEWAY\tSITE\tSTATUS\tLAST SEEN\tBACKLOG\tOLDEST UNSENT\tDROPS\tDEAD\tSTALE SENSORS\tGAPS\tLAST ERROR")
	counts := map[string]int{}
	for _, r := range rows {
		counts[r.Status]++
		oldest := "-"
		if r.BacklogReadings > 0 {
			oldest = gateway.FormatAge(r.LagSeconds)
		}
		lastErr := r.LastError
		if len(lastErr) > 60 {
			lastErr = lastErr[:57] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s ago\t%d (%s)\t%s\t%d\t%d\t%d\t%d\t%s\n", r.GatewayID, r.Site, r.Status,
			gateway.FormatAge(r.LastSeenAgo), r.BacklogReadings, sizeString(r.BacklogBytes), oldest, r.Dropped, r.DeadLetters,
			r.SensorsStale, r.SensorGaps, lastErr)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "%d gateways: %d ok, %d lagging, %d stale, %d offline\n", len(rows),
		counts["ok"], counts["lagging"], counts["stale"], counts["offline"])
	return err
}

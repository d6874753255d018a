package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/jackc/pgx/v5"

	firmwareprofiles "github.com/sluice-gw/sluice/firmware-profiles"
	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/uplink"
)

type migrateCmd struct {
	DSN     string `help:"Postgres connection string of the schema owner." placeholder:"DSN"`
	DSNFile string `help:"File holding the DSN." placeholder:"FILE" name:"dsn-file"`
}

func (m *migrateCmd) Run() error {
	dsn, err := dsnFrom(m.DSN, m.DSNFile)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("migrate: connect: %w", err)
	}
	defer conn.Close(context.Background())
	from, to, err := uplink.Migrate(ctx, conn)
	if err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, "SELECT sluice.ensure_partitions($1)", uplink.DefaultPartitionDaysAhead); err != nil {
		return fmt.Errorf("migrate: create partitions: %w", err)
	}
	if from == to {
		fmt.Printf("schema sluice is at version %d (already current)\n", to)
	} else {
		fmt.Printf("schema sluice migrated from version %d to %d\n", from, to)
	}
	return nil
}

// dsnFrom takes a DSN from a flag or a secret file.
func dsnFrom(dsn, file string) (string, error) {
	switch {
	case dsn != "" && file != "":
		return "", usageError{errors.New("give --dsn or --dsn-file, not both")}
	case file != "":
		s, err := readSecret(file)
		if err != nil {
			return "", usageError{fmt.Errorf("--dsn-file: %w", err)}
		}
		return strings.TrimSpace(s), nil
	case dsn != "":
		return dsn, nil
	}
	return "", usageError{errors.New("give --dsn or --dsn-file")}
}

type profileCmd struct {
	List profileListCmd `cmd:"" help:"List the profiles."`
	Show profileShowCmd `cmd:"" help:"Print a profile's TOML."`
}

type profileListCmd struct{}

func (profileListCmd) Run() error {
	for _, name := range firmwareprofiles.Names() {
		text, _ := firmwareprofiles.Read(name)
		var p struct {
			Build BuildSection `toml:"build"`
		}
		_, _ = toml.Decode(string(text), &p)
		target := p.Build.GOOS + "/" + p.Build.GOARCH
		if p.Build.GOARM != "" {
			target += "/v" + p.Build.GOARM
		}
		fmt.Printf("%-10s %-16s %s\n", name, target, firstComment(string(text)))
	}
	return nil
}

// firstComment is the first line of a profile's leading prose.
func firstComment(text string) string {
	for _, line := range strings.Split(text, "\n") {
		if s, ok := strings.CutPrefix(line, "## "); ok {
			return s
		}
	}
	return ""
}

type profileShowCmd struct {
	Name string `arg:"" help:"Profile name."`
}

func (s *profileShowCmd) Run() error {
	text, ok := firmwareprofiles.Read(s.Name)
	if !ok {
		return usageError{fmt.Errorf("profile %q is not one of %s", s.Name, strings.Join(firmwareprofiles.Names(), ", "))}
	}
	_, err := os.Stdout.Write(text)
	return err
}

type configCmd struct {
	Show configShowCmd `cmd:"" help:"Print the effective, layered config with secrets redacted."`
}

type configShowCmd struct {
	configFlags
}

func (c *configShowCmd) Run() error {
	cfg, err := c.load("config show")
	if err != nil {
		return err
	}
	cfg.Uplink.DSN = redactDSN(cfg.Uplink.DSN)
	enc := toml.NewEncoder(os.Stdout)
	enc.Indent = ""
	return enc.Encode(cfg)
}

// redactDSN hides a password in a URL or key=value DSN.
func redactDSN(dsn string) string {
	if dsn == "" {
		return ""
	}
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "REDACTED")
		}
		q := u.Query()
		if q.Has("password") {
			q.Set("password", "REDACTED")
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	fields := strings.Fields(dsn)
	for i, f := range fields {
		if strings.HasPrefix(f, "password=") {
			fields[i] = "password=REDACTED"
		}
	}
	return strings.Join(fields, " ")
}

type statusCmd struct {
	Config string `help:"Config file (to find the admin address)." type:"path" placeholder:"FILE"`
	Admin  string `help:"Admin URL of the running gateway." default:"http://127.0.0.1:9180" placeholder:"URL"`
	JSON   bool   `help:"Print the raw JSON status." name:"json"`
}

func (s *statusCmd) Run() error {
	base := s.Admin
	if s.Config != "" {
		cfg, err := LoadConfig(s.Config, "")
		if err != nil {
			return err
		}
		base = "http://" + cfg.Admin.Listen
	}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(strings.TrimRight(base, "/") + "/api/status")
	if err != nil {
		return fmt.Errorf("status: is the gateway running? %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status: %s answered %s", base, resp.Status)
	}
	var st gateway.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return fmt.Errorf("status: decode answer: %w", err)
	}
	if s.JSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(st)
	} else {
		printStatus(st)
	}
	if st.Health != "ok" {
		return fmt.Errorf("gateway %s is %s: %s", st.Gateway.ID, st.Health, strings.Join(st.Reasons, "; "))
	}
	return nil
}

func printStatus(st gateway.Status) {
	fmt.Printf("gateway  %s  site %s  profile %s  version %s  up %s\n", st.Gateway.ID, st.Gateway.Site,
		st.Gateway.Profile, st.Gateway.Version, (time.Duration(st.Gateway.UptimeSeconds) * time.Second).String())
	fmt.Printf("health   %s\n", strings.ToUpper(st.Health))
	for _, in := range st.Ingress {
		line := fmt.Sprintf("ingress  %-5s %s", in.Name, in.State)
		if in.LastError != "" {
			line += "  (" + in.LastError + ")"
		}
		fmt.Println(line)
	}
	fmt.Printf("buffer   %d readings, %d bytes of %d, oldest %.0fs, dead letters %d, dropped %v\n",
		st.Buffer.Readings, st.Buffer.Bytes, st.Buffer.MaxBytes, st.Buffer.OldestAgeSeconds, st.Buffer.DeadLetters, st.Buffer.Dropped)
	fmt.Printf("uplink   %s, lag %.0fs, uploaded %d", st.Uplink.State, st.Uplink.LagSeconds, st.Uplink.Uploaded)
	if st.Uplink.LastError != "" {
		fmt.Printf(", last error: %s", st.Uplink.LastError)
	}
	fmt.Println()
	fmt.Printf("clock    synced=%v (%s)\n", st.Clock.Synced, st.Clock.Source)
	fmt.Printf("sensors  %d\n", len(st.Sensors))
}

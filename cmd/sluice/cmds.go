package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"text/tabwriter"
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

// Run prints one line per profile with the values a technician compares
// boards by; `make dist` reads the TARGET column.
func (profileListCmd) Run() error {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "PROFILE\tTARGET\tBUFFER\tCOMMIT\tMEMORY\tBOARD")
	for _, name := range firmwareprofiles.Names() {
		cfg, err := LoadConfig("", name)
		if err != nil {
			return err
		}
		text, _ := firmwareprofiles.Read(name)
		memory := "-"
		if cfg.Runtime.MemoryLimit.Bytes > 0 {
			b, _ := cfg.Runtime.MemoryLimit.MarshalText()
			memory = string(b)
		}
		buf, _ := cfg.Buffer.MaxBytes.MarshalText()
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", name, cfg.Build.target(), buf, cfg.Buffer.CommitInterval, memory, firstComment(string(text)))
	}
	return w.Flush()
}

// target is the build target as GOOS/GOARCH[/vGOARM], e.g. linux/arm/v7.
func (b BuildSection) target() string {
	t := b.GOOS + "/" + b.GOARCH
	if b.GOARM != "" {
		t += "/v" + b.GOARM
	}
	return t
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
	Config    string `help:"Config file (to find the admin address and token)." type:"path" placeholder:"FILE"`
	Admin     string `help:"Admin URL of the running gateway." default:"http://127.0.0.1:9180" placeholder:"URL"`
	TokenFile string `help:"File holding the admin token (when the admin endpoint needs one)." name:"token-file" placeholder:"FILE"`
	JSON      bool   `help:"Print the raw JSON status." name:"json"`
}

func (s *statusCmd) Run() error {
	base, tokenFile := s.Admin, s.TokenFile
	if s.Config != "" {
		cfg, err := LoadConfig(s.Config, "")
		if err != nil {
			return err
		}
		base = "http://" + dialableAdmin(cfg.Admin.Listen)
		if tokenFile == "" {
			tokenFile = cfg.Admin.TokenFile
		}
	}
	req, err := http.NewRequest(http.MethodGet, strings.TrimRight(base, "/")+"/api/status", nil)
	if err != nil {
		return usageError{fmt.Errorf("status: admin URL %q: %w", base, err)}
	}
	if tokenFile != "" {
		tok, err := readSecret(tokenFile)
		if err != nil {
			return fmt.Errorf("status: admin token: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(tok))
	}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("status: cannot reach the gateway at %s (is sluice running?): %w", base, err)
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
		printStatus(os.Stdout, st)
	}
	if st.Health != gateway.HealthOK {
		return fmt.Errorf("gateway %s is %s", st.Gateway.ID, st.Health)
	}
	return nil
}

// dialableAdmin turns a listen address into one a client can dial: a
// wildcard host is reached on loopback.
func dialableAdmin(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

var healthWords = map[string]string{
	gateway.HealthOK:       "HEALTHY",
	gateway.HealthDegraded: "NEEDS ATTENTION",
	gateway.HealthFailing:  "NOT WORKING",
}

func printStatus(w io.Writer, st gateway.Status) {
	g := st.Gateway
	profile := g.Profile
	if profile == "" {
		profile = "-"
	}
	fmt.Fprintf(w, "%s  site %s  profile %s  version %s  up %s\n", g.ID, g.Site, profile, g.Version,
		time.Duration(g.UptimeSeconds*float64(time.Second)).Round(time.Second))
	verdict := healthWords[st.Health]
	if verdict == "" {
		verdict = strings.ToUpper(st.Health)
	}
	fmt.Fprintf(w, "health   %s\n", verdict)
	for _, c := range st.Checks {
		fmt.Fprintf(w, "  %-4s  %-8s %s\n", c.Level, c.Part, c.Text)
	}
	b := st.Buffer
	var dropped int64
	for _, n := range b.Dropped {
		dropped += n
	}
	fmt.Fprintf(w, "buffer   %d readings, %s of %s, oldest %.0fs, dropped %d, dead letters %d\n",
		b.Readings, sizeString(b.Bytes), sizeString(b.MaxBytes), b.OldestAgeSeconds, dropped, b.DeadLetters)
	u := st.Uplink
	last := "never"
	if !u.LastSuccess.IsZero() {
		last = time.Since(u.LastSuccess).Round(time.Second).String() + " ago"
	}
	fmt.Fprintf(w, "uplink   %s, last success %s, lag %.0fs, uploaded %d, schema v%d\n", u.State, last, u.LagSeconds, u.Uploaded, u.SchemaVersion)
	var stale, gaps int64
	for _, se := range st.Sensors {
		gaps += se.Gaps
		if se.Stale {
			stale++
		}
	}
	fmt.Fprintf(w, "sensors  %d tracked, %d stale, %d gaps\n", len(st.Sensors), stale, gaps)
}

// sizeString prints bytes with a binary unit.
func sizeString(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 3; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGT"[exp])
}

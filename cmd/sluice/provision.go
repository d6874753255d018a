package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"

	"github.com/jackc/pgx/v5/pgconn"

	firmwareprofiles "github.com/sluice-gw/sluice/firmware-profiles"
	"github.com/sluice-gw/sluice/systemd"
)

type provisionCmd struct {
	Profile   string `help:"The board's firmware profile (see sluice profile list)." required:"" placeholder:"NAME"`
	GatewayID string `help:"The gateway's id, unique in the fleet: letters, digits, '.', '_', '-'." name:"gateway-id" required:"" placeholder:"ID"`
	Site      string `help:"The site it serves; part of every reading's identity." required:"" placeholder:"SITE"`
	Broker    string `help:"MQTT broker the gateway subscribes to (default: the profile's, the board's own Mosquitto)." placeholder:"URL"`
	DSNFile   string `help:"File holding the central Postgres DSN. It goes to the credentials, never into the config." name:"dsn-file" required:"" placeholder:"FILE"`
	Out       string `help:"Write a bundle to copy onto the gateway's root filesystem (config, credentials, systemd files) instead of printing the config." placeholder:"DIR"`
}

// credentialName is the systemd credential the unit loads the DSN into
// (LoadCredential=dsn:/etc/sluice/credentials/dsn): the config names it
// relative, so it is found in $CREDENTIALS_DIRECTORY.
const credentialName = "dsn"

// bundleFile is one file of a provisioning bundle, by its path on the gateway.
type bundleFile struct {
	path string // absolute on the gateway
	mode os.FileMode
	data []byte
	what string
}

func (p *provisionCmd) Run() error {
	if err := p.checkFlags(); err != nil {
		return &ConfigError{unjoin(err)} // one line per bad flag
	}
	dsn, err := os.ReadFile(p.DSNFile)
	if err != nil {
		return usageError{fmt.Errorf("--dsn-file: %w", err)}
	}
	dsnNote, err := checkDSN(strings.TrimSpace(string(dsn)))
	if err != nil {
		return usageError{fmt.Errorf("--dsn-file %s: %w", p.DSNFile, err)}
	}
	config := p.config()
	if err := validateOffline(config); err != nil {
		return err
	}
	if p.Out == "" {
		if _, err := os.Stdout.Write(config); err != nil {
			return err
		}
		p.nextSteps(os.Stderr, nil, dsnNote)
		return nil
	}
	files := []bundleFile{
		{"/etc/sluice/sluice.toml", 0o644, config, "the config (the profile supplies the rest)"},
		{"/etc/sluice/credentials/" + credentialName, 0o600, []byte(strings.TrimSpace(string(dsn)) + "\n"), "the central database DSN, mode 0600"},
		{"/etc/systemd/system/sluice.service", 0o644, systemd.Unit, "the service unit (the package installs it too)"},
		{"/etc/sysusers.d/sluice.conf", 0o644, systemd.Sysusers, "the gateway's system user"},
		{"/etc/tmpfiles.d/sluice.conf", 0o644, systemd.Tmpfiles, "modes of /etc/sluice and its credentials"},
	}
	if err := writeBundle(p.Out, files); err != nil {
		return err
	}
	p.nextSteps(os.Stdout, files, dsnNote)
	return nil
}

// checkFlags reports every bad flag at once.
func (p *provisionCmd) checkFlags() error {
	var errs []error
	if _, ok := firmwareprofiles.Read(p.Profile); !ok {
		errs = append(errs, fmt.Errorf("--profile: %q is not one of %s", p.Profile, strings.Join(firmwareprofiles.Names(), ", ")))
	}
	if err := checkGatewayID(p.GatewayID); err != nil {
		errs = append(errs, fmt.Errorf("--gateway-id: %w", err))
	}
	if err := checkSite(p.Site); err != nil {
		errs = append(errs, fmt.Errorf("--site: %w", err))
	}
	if strings.ContainsFunc(p.Broker, unicode.IsControl) {
		errs = append(errs, errors.New("--broker: contains control characters"))
	}
	return errors.Join(errs...)
}

// checkGatewayID: the id names the MQTT session and the central row, and a
// technician types it, so it is kept to what a hostname may hold.
func checkGatewayID(id string) error {
	switch {
	case id == "":
		return errors.New("empty")
	case len(id) > 64:
		return fmt.Errorf("%d characters, at most 64", len(id))
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("%q has %q: use letters, digits, '.', '_' and '-'", id, r)
		}
	}
	return nil
}

func checkSite(site string) error {
	switch {
	case strings.TrimSpace(site) == "":
		return errors.New("empty")
	case strings.TrimSpace(site) != site:
		return fmt.Errorf("%q starts or ends with a space", site)
	case len(site) > 128:
		return fmt.Errorf("%d bytes, at most 128", len(site))
	case strings.ContainsFunc(site, unicode.IsControl):
		return fmt.Errorf("%q contains control characters", site)
	}
	return nil
}

// checkDSN parses the DSN offline. It returns a note for the technician
// when the connection would not be encrypted. Errors never echo the DSN.
func checkDSN(dsn string) (note string, err error) {
	if dsn == "" {
		return "", errors.New("empty")
	}
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return "", errors.New("not a Postgres connection string (postgres://USER:PASSWORD@HOST:5432/DB?sslmode=verify-full, or key=value pairs)")
	}
	switch tc := cfg.TLSConfig; {
	case isLoopback(cfg.Host):
	case tc == nil:
		return fmt.Sprintf("the DSN does not use TLS to %s: readings and the password cross the network in clear (set sslmode=verify-full)", cfg.Host), nil
	case tc.InsecureSkipVerify && tc.VerifyPeerCertificate == nil:
		return fmt.Sprintf("the DSN does not verify %s's certificate, or may fall back to no TLS (set sslmode=verify-full)", cfg.Host), nil
	}
	return "", nil
}

func isLoopback(host string) bool {
	if host == "localhost" || strings.HasPrefix(host, "/") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// config is the gateway's config file: the profile and what makes this
// gateway itself. Everything else comes from the profile.
func (p *provisionCmd) config() []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "## Gateway %s at site %s, written by `sluice provision` (sluice %s).\n", p.GatewayID, p.Site, version)
	fmt.Fprintf(&b, "## The profile supplies every key not set here (`sluice profile show %s`);\n", p.Profile)
	b.WriteString("## a key set here overrides it. `sluice config show` prints the result.\n")
	fmt.Fprintf(&b, "profile = %s\n\n", tomlString(p.Profile))
	b.WriteString("[gateway]\n")
	fmt.Fprintf(&b, "id = %s\n", tomlString(p.GatewayID))
	fmt.Fprintf(&b, "site = %s\n", tomlString(p.Site))
	if p.Broker != "" {
		b.WriteString("\n[mqtt]\n")
		fmt.Fprintf(&b, "broker = %s\n", tomlString(p.Broker))
	}
	b.WriteString("\n[uplink]\n")
	b.WriteString("## The central database: the unit loads /etc/sluice/credentials/dsn as the\n")
	b.WriteString("## systemd credential \"dsn\". The DSN itself is never written here.\n")
	fmt.Fprintf(&b, "dsn_file = %s\n", tomlString(credentialName))
	return []byte(b.String())
}

// tomlString quotes s as a TOML basic string. Control characters were
// refused before, so Go's quoting leaves only \" and \\ escapes, which
// TOML shares.
func tomlString(s string) string { return strconv.Quote(s) }

// validateOffline loads the config as the gateway will, without touching
// the network or the secret: every problem, with its key.
func validateOffline(config []byte) error {
	dir, err := os.MkdirTemp("", "sluice-provision-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "sluice.toml")
	if err := os.WriteFile(path, config, 0o600); err != nil {
		return err
	}
	_, err = LoadConfig(path, "")
	return err
}

// writeBundle writes files under root, mirroring their place on the gateway.
// It refuses to overwrite anything: a bundle holds a credential.
func writeBundle(root string, files []bundleFile) error {
	for _, f := range files {
		if _, err := os.Lstat(filepath.Join(root, f.path)); err == nil {
			return usageError{fmt.Errorf("--out: %s already exists; remove it or choose another directory", filepath.Join(root, f.path))}
		}
	}
	for _, f := range files {
		path := filepath.Join(root, f.path)
		dir := filepath.Dir(path)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("provision: %w", err)
		}
		if f.mode&0o077 == 0 { // a secret: its directory is private too
			if err := os.Chmod(dir, 0o700); err != nil {
				return fmt.Errorf("provision: %w", err)
			}
		}
		if err := writeFileMode(path, f.data, f.mode); err != nil {
			return fmt.Errorf("provision: %w", err)
		}
	}
	return nil
}

// writeFileMode creates path with exactly mode (no umask), new or failing.
func writeFileMode(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// nextSteps tells the technician what to do with what was written.
func (p *provisionCmd) nextSteps(w io.Writer, files []bundleFile, dsnNote string) {
	cfg, _ := LoadConfig("", p.Profile)
	target := cfg.Build.target()
	fmt.Fprintf(w, "Gateway %s (site %s, profile %s, %s): config valid.\n", p.GatewayID, p.Site, p.Profile, target)
	if dsnNote != "" {
		fmt.Fprintf(w, "Warning: %s.\n", dsnNote)
	}
	step := 0
	next := func(format string, args ...any) {
		step++
		fmt.Fprintf(w, "  %d. %s\n", step, fmt.Sprintf(format, args...))
	}
	if files == nil {
		fmt.Fprintln(w, "Next steps on the gateway, as root:")
		next("Install the sluice package for the board (or its %s binary as /usr/bin/sluice).", target)
		next("Save the config above as /etc/sluice/sluice.toml.")
		next("Install the DSN as the credential: install -D -m 600 %s /etc/sluice/credentials/dsn", p.DSNFile)
	} else {
		fmt.Fprintf(w, "Bundle in %s:\n", p.Out)
		for _, f := range files {
			fmt.Fprintf(w, "  %-36s %s\n", strings.TrimPrefix(f.path, "/"), f.what)
		}
		fmt.Fprintln(w, "Next steps on the gateway, as root:")
		next("Install the sluice package for the board (or its %s binary as /usr/bin/sluice).", target)
		next("Copy the bundle onto the root filesystem (for a card: its root partition), keeping modes:\n"+
			"     cp -a --no-preserve=ownership %s/. /", p.Out)
		next("Create the user and directories: systemd-sysusers; systemd-tmpfiles --create")
	}
	next("Give the broker the settings a gateway needs: mosquitto/gateway.conf (the package has it as\n" +
		"     /usr/share/sluice/mosquitto-gateway.conf) as /etc/mosquitto/conf.d/sluice.conf; systemctl restart mosquitto")
	next("Start it: systemctl daemon-reload; systemctl enable --now sluice")
	next("Check it live: CREDENTIALS_DIRECTORY=/etc/sluice/credentials sluice doctor --config /etc/sluice/sluice.toml")
	next("Watch readings arrive: sluice simulate --sensors 3 --duration 30s; then sluice status")
}

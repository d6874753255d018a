package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestProvisionedConfigLoadsForEveryBoard(t *testing.T) {
	for _, b := range boardProfiles {
		t.Run(b.name, func(t *testing.T) {
			p := provisionCmd{Profile: b.name, GatewayID: "gw-0042", Site: `Reservoir "North" \ 2`, Broker: "mqtts://broker.lan:8883"}
			text := p.config()
			if err := validateOffline(text); err != nil {
				t.Fatalf("%v\n%s", err, text)
			}
			cfg, err := LoadConfig(writeConfig(t, string(text)), "")
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Profile != b.name || cfg.Gateway.ID != "gw-0042" || cfg.Gateway.Site != p.Site ||
				cfg.MQTT.Broker != p.Broker || cfg.Uplink.DSNFile != credentialName || cfg.Uplink.DSN != "" {
				t.Fatalf("provisioned config reads back as %+v %+v %+v", cfg.Gateway, cfg.MQTT.Broker, cfg.Uplink)
			}
		})
	}
	// Without --broker the profile's broker stays.
	cfg, err := LoadConfig(writeConfig(t, string((&provisionCmd{Profile: "armv6", GatewayID: "g", Site: "s"}).config())), "")
	if err != nil || cfg.MQTT.Broker != "mqtt://127.0.0.1:1883" {
		t.Fatalf("broker %q, %v", cfg.MQTT.Broker, err)
	}
}

func TestProvisionFlagChecks(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    provisionCmd
		want []string // one problem line each; none for a good command
	}{
		{"good", provisionCmd{Profile: "arm64", GatewayID: "gw-0042.site_a", Site: "North reservoir"}, nil},
		{"everything wrong", provisionCmd{Profile: "pi", GatewayID: "gw/1", Site: " x", Broker: "mqtt://a\n"},
			[]string{`--profile: "pi" is not one of`, `--gateway-id: "gw/1" has '/'`, `--site: " x" starts or ends with a space`, "--broker: contains control characters"}},
		{"empty", provisionCmd{Profile: "dev"}, []string{"--gateway-id: empty", "--site: empty"}},
		{"too long", provisionCmd{Profile: "dev", GatewayID: strings.Repeat("g", 65), Site: "s\x00"},
			[]string{"--gateway-id: 65 characters", "--site: \"s\\x00\" contains control characters"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.checkFlags()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || len(unjoin(err)) != len(tc.want) {
				t.Fatalf("problems %v, want %d", err, len(tc.want))
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("problems lack %q:\n%v", w, err)
				}
			}
		})
	}
}

func TestCheckDSN(t *testing.T) {
	for _, tc := range []struct {
		dsn, note, err string
	}{
		{"postgres://gw:s3cret@db.example.net:5432/sluice?sslmode=verify-full", "", ""},
		{"postgres://gw:s3cret@127.0.0.1/sluice?sslmode=disable", "", ""},
		{"host=/run/postgresql dbname=sluice", "", ""},
		{"postgres://gw:s3cret@db.example.net/sluice?sslmode=disable", "does not use TLS", ""},
		{"postgres://gw:s3cret@db.example.net/sluice", "does not verify", ""},
		{"postgres://gw:s3cret@db.example.net/sluice?sslmode=require", "does not verify", ""},
		{"postgres://gw:s3cret@db.example.net:port/sluice", "", "not a Postgres connection string"},
		{"", "", "empty"},
	} {
		note, err := checkDSN(tc.dsn)
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: error %v, want %q", tc.dsn, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.dsn, err)
		case tc.note == "" && note != "", tc.note != "" && !strings.Contains(note, tc.note):
			t.Errorf("%q: note %q, want %q", tc.dsn, note, tc.note)
		}
		if strings.Contains(note, "s3cret") || (err != nil && strings.Contains(err.Error(), "s3cret")) {
			t.Errorf("%q: the password shows in %q / %v", tc.dsn, note, err)
		}
	}
}

func TestProvisionWithoutOutPrintsConfigOnly(t *testing.T) {
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte("postgres://gw:s3cret@db.example.net/sluice?sslmode=verify-full\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code := runCommand(t, nil, sluiceBin, "provision", "--profile", "armv7", "--gateway-id", "gw-9", "--site", "s", "--dsn-file", dsnFile)
	if code != exitOK || strings.Contains(out, "s3cret") || !strings.Contains(out, `profile = "armv7"`) ||
		!strings.Contains(out, "install -D -m 600 "+dsnFile+" /etc/sluice/credentials/dsn") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("provision without --out wrote files: %v", entries)
	}
	// Bad flags: exit 2, one line per problem.
	out, code = runCommand(t, nil, sluiceBin, "provision", "--profile", "nope", "--gateway-id", "a b", "--site", "s", "--dsn-file", dsnFile)
	if code != exitUsage || len(strings.Split(strings.TrimSpace(out), "\n")) != 2 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
}

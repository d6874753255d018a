package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluice-gw/sluice/gateway"
	"github.com/sluice-gw/sluice/uplink"
)

type doctorCmd struct {
	configFlags
	MosquittoConf string        `help:"The local broker's config, read for its queue settings when the broker is on this board." default:"/etc/mosquitto/mosquitto.conf" name:"mosquitto-conf" placeholder:"FILE"`
	Timeout       time.Duration `help:"Time allowed for each network check." default:"10s"`
}

// checkResult is one line of the checklist.
type checkResult struct {
	level gateway.Level
	name  string
	text  string
	fix   string // what to do, when the check is not ok
}

// checklist collects results and prints them as they come.
type checklist struct {
	w       io.Writer
	results []checkResult
}

func (c *checklist) add(level gateway.Level, name, text, fix string) {
	r := checkResult{level: level, name: name, text: text, fix: fix}
	c.results = append(c.results, r)
	tag := map[gateway.Level]string{gateway.LevelOK: "ok", gateway.LevelWarn: "warn", gateway.LevelFail: "FAIL"}[level]
	line := fmt.Sprintf("%-4s  %-9s %s", tag, name, text)
	if level != gateway.LevelOK && fix != "" {
		line += " -- fix: " + fix
	}
	fmt.Fprintln(c.w, line)
}

func (c *checklist) count(l gateway.Level) int {
	n := 0
	for _, r := range c.results {
		if r.level == l {
			n++
		}
	}
	return n
}

func (d *doctorCmd) Run() error {
	if d.Config == "" && d.Profile == "" {
		return usageError{errors.New("doctor: give --config FILE (or --profile NAME)")}
	}
	cl := &checklist{w: os.Stdout}
	d.check(cl)
	fails, warns := cl.count(gateway.LevelFail), cl.count(gateway.LevelWarn)
	fmt.Printf("%d checks: %d failed, %d warnings\n", len(cl.results), fails, warns)
	if fails > 0 {
		return fmt.Errorf("doctor: %d checks failed", fails)
	}
	return nil
}

func (d *doctorCmd) check(cl *checklist) {
	cfg, err := LoadConfig(d.Config, d.Profile)
	if err != nil {
		var ce *ConfigError
		if errors.As(err, &ce) {
			for _, p := range ce.Problems {
				cl.add(gateway.LevelFail, "config", p.Error(), "correct the key in "+d.Config)
			}
		} else {
			cl.add(gateway.LevelFail, "config", err.Error(), "correct "+d.Config)
		}
		return
	}
	cl.add(gateway.LevelOK, "config", fmt.Sprintf("valid (gateway %s, site %s, profile %s)", cfg.Gateway.ID, cfg.Gateway.Site, orDash(cfg.Profile)), "")
	checkDataDir(cl, cfg)
	checkDisk(cl, cfg)

	ctx := context.Background()
	pg := d.checkPostgres(ctx, cl, cfg)
	checkClock(cl, cfg, pg)
	d.checkBroker(ctx, cl, cfg)
	checkPorts(cl, cfg)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func checkDataDir(cl *checklist, cfg *Config) {
	dir := cfg.Gateway.DataDir
	fi, err := os.Stat(dir)
	if errors.Is(err, os.ErrNotExist) {
		parent := filepath.Dir(dir)
		if unix.Access(parent, unix.W_OK) == nil {
			cl.add(gateway.LevelOK, "data dir", dir+" does not exist yet; the gateway creates it at start", "")
		} else {
			cl.add(gateway.LevelFail, "data dir", dir+" does not exist and "+parent+" is not writable",
				"create it for the gateway's user (systemd: StateDirectory=sluice makes /var/lib/sluice)")
		}
		return
	}
	if err != nil || !fi.IsDir() {
		cl.add(gateway.LevelFail, "data dir", fmt.Sprintf("%s is not a usable directory: %v", dir, err), "point [gateway] data_dir at a directory on flash")
		return
	}
	fsName := filesystemName(dir)
	probe, err := os.CreateTemp(dir, ".doctor-*")
	if err == nil {
		_, err = probe.WriteString("sluice doctor write test\n")
		err = errors.Join(err, probe.Sync(), probe.Close(), os.Remove(probe.Name()))
	}
	if err != nil {
		cl.add(gateway.LevelFail, "data dir", fmt.Sprintf("%s is not writable (on %s): %v", dir, fsName, err),
			"give the gateway's user write access (chown sluice: "+dir+") or fix the filesystem")
		return
	}
	switch fsName {
	case "tmpfs", "ramfs":
		cl.add(gateway.LevelFail, "data dir", dir+" is on "+fsName+": buffered readings would be lost at a power cut",
			"put [gateway] data_dir on flash, e.g. /var/lib/sluice")
	default:
		cl.add(gateway.LevelOK, "data dir", dir+" is writable and fsyncs, on "+fsName, "")
	}
}

// filesystemName names the filesystem dir is on, from statfs's magic number.
func filesystemName(dir string) string {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return "an unknown filesystem"
	}
	names := map[int64]string{
		unix.EXT4_SUPER_MAGIC: "ext4", unix.TMPFS_MAGIC: "tmpfs", unix.RAMFS_MAGIC: "ramfs",
		unix.BTRFS_SUPER_MAGIC: "btrfs", unix.XFS_SUPER_MAGIC: "xfs", unix.F2FS_SUPER_MAGIC: "f2fs",
		0x24051905: "ubifs", unix.JFFS2_SUPER_MAGIC: "jffs2", unix.MSDOS_SUPER_MAGIC: "vfat",
		unix.NFS_SUPER_MAGIC: "nfs", unix.OVERLAYFS_SUPER_MAGIC: "overlayfs", unix.SQUASHFS_MAGIC: "squashfs",
		unix.EXFAT_SUPER_MAGIC: "exfat", 0x5346544e: "ntfs",
	}
	if n, ok := names[int64(fs.Type)]; ok {
		return n
	}
	return fmt.Sprintf("filesystem %#x", fs.Type)
}

func checkDisk(cl *checklist, cfg *Config) {
	var fs unix.Statfs_t
	dir := cfg.Gateway.DataDir
	for ; dir != "/" && dir != "."; dir = filepath.Dir(dir) {
		if _, err := os.Stat(dir); err == nil {
			break
		}
	}
	if err := unix.Statfs(dir, &fs); err != nil {
		cl.add(gateway.LevelWarn, "disk", "free space unknown: "+err.Error(), "check that "+dir+" is mounted")
		return
	}
	free := int64(fs.Bavail) * int64(fs.Bsize)
	var file int64
	if fi, err := os.Stat(filepath.Join(cfg.Gateway.DataDir, "buffer.db")); err == nil {
		file = fi.Size()
	}
	maxBytes, reserve := cfg.Buffer.MaxBytes.Bytes, cfg.Buffer.MinFreeDisk.Bytes
	room := free - reserve // what the buffer may still take
	need := max(0, maxBytes-file)
	text := fmt.Sprintf("%s free; the buffer (now %s) may grow to max_bytes %s, keeping min_free_disk %s",
		sizeString(free), sizeString(file), sizeString(maxBytes), sizeString(reserve))
	if room < need {
		cl.add(gateway.LevelWarn, "disk", fmt.Sprintf("only %s free: the buffer stops at about %s, not max_bytes %s",
			sizeString(free), sizeString(file+max(0, room)), sizeString(maxBytes)),
			"free space on the data filesystem or lower [buffer] max_bytes")
		return
	}
	cl.add(gateway.LevelOK, "disk", text, "")
}

// pgResult is what the Postgres check learned, for the clock check.
type pgResult struct {
	reached          bool
	local, server    time.Time
	rtt              time.Duration
	schema, required int
}

func (d *doctorCmd) checkPostgres(ctx context.Context, cl *checklist, cfg *Config) pgResult {
	var res pgResult
	if cfg.Uplink.DSN != "" {
		cl.add(gateway.LevelWarn, "dsn", "the DSN is inline in the config (readable wherever the config is)",
			"move it to a file with mode 600 and set [uplink] dsn_file (or LoadCredential=dsn:... under systemd)")
	}
	dsn, err := cfg.resolveDSN()
	if err != nil {
		cl.add(gateway.LevelFail, "postgres", err.Error(), "create the dsn_file, readable only by the gateway's user (chmod 600)")
		return res
	}
	ctx, cancel := context.WithTimeout(ctx, d.Timeout)
	defer cancel()
	conn, err := uplink.Connect(ctx, dsn)
	if err != nil {
		cl.add(gateway.LevelFail, "postgres", "unreachable: "+err.Error(),
			"check the DSN's host, port and credentials, the network, and that Postgres (or PgBouncer) runs")
		return res
	}
	defer conn.Close(context.Background())
	res.reached = true
	start := time.Now()
	if err := conn.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&res.server); err == nil {
		res.rtt = time.Since(start)
		res.local = start.Add(res.rtt / 2)
	}
	tlsState, encrypted := "not encrypted", false
	if tc, ok := conn.PgConn().Conn().(*tls.Conn); ok {
		encrypted = true
		tlsState = "TLS " + strings.TrimPrefix(tls.VersionName(tc.ConnectionState().Version), "TLS ")
	}
	res.schema, err = uplink.CurrentVersion(ctx, conn)
	res.required = uplink.SchemaVersion()
	host := conn.Config().Host
	where := fmt.Sprintf("%s as %s, %s", net.JoinHostPort(host, fmt.Sprint(conn.Config().Port)), conn.Config().User, tlsState)
	switch {
	case err != nil:
		cl.add(gateway.LevelFail, "postgres", where+"; schema version unreadable: "+err.Error(), "grant the gateway's role SELECT on sluice.schema_migrations")
	case res.schema > res.required:
		cl.add(gateway.LevelFail, "postgres", fmt.Sprintf("%s; schema v%d is newer than this build's v%d", where, res.schema, res.required), "upgrade sluice on this gateway")
	case res.schema < res.required:
		cl.add(gateway.LevelWarn, "postgres", fmt.Sprintf("%s; schema v%d, this build needs v%d", where, res.schema, res.required),
			"run `sluice migrate --dsn-file FILE` with the schema owner (the gateway migrates itself if its role may)")
	case !encrypted && !isLocalHost(host):
		cl.add(gateway.LevelWarn, "postgres", fmt.Sprintf("%s; schema v%d; the link to a remote database is not encrypted", where, res.schema),
			"add sslmode=verify-full (and sslrootcert) to the DSN")
	default:
		cl.add(gateway.LevelOK, "postgres", fmt.Sprintf("%s; schema v%d", where, res.schema), "")
	}
	return res
}

func isLocalHost(host string) bool {
	if strings.HasPrefix(host, "/") || host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func checkClock(cl *checklist, cfg *Config, pg pgResult) {
	mode := gateway.ClockMode(cfg.Gateway.Clock)
	switch mode {
	case gateway.ClockTrusted:
		cl.add(gateway.LevelOK, "clock", `trusted by configuration ([gateway] clock = "trusted": an RTC or GPS keeps it)`, "")
		return
	case gateway.ClockUntrusted:
		cl.add(gateway.LevelWarn, "clock", `never trusted ([gateway] clock = "untrusted"): every reading is uploaded with clock_synced = false`,
			`set [gateway] clock = "auto" once the board has a time source`)
		return
	}
	c := gateway.NewClock(mode)
	kernel := "the kernel says not synchronised (adjtimex)"
	if c.Synced() { // before any server sample: the kernel's word alone
		kernel = "the kernel says synchronised (adjtimex: NTP)"
	}
	server := "the central database was not reached"
	if !pg.server.IsZero() {
		c.ServerSample(pg.local, pg.server, pg.rtt)
		server = fmt.Sprintf("the central database's clock differs by %+.3fs", c.ServerOffset().Seconds())
	}
	text := kernel + "; " + server
	if c.Synced() {
		cl.add(gateway.LevelOK, "clock", "synchronised: "+text, "")
		return
	}
	cl.add(gateway.LevelWarn, "clock", "not synchronised: "+text,
		"enable NTP (timedatectl set-ntp true) or let the uplink reach Postgres; readings meanwhile are marked and restamped")
}

func (d *doctorCmd) checkBroker(ctx context.Context, cl *checklist, cfg *Config) {
	if cfg.MQTT.Broker == "" {
		cl.add(gateway.LevelOK, "broker", "MQTT ingress is off ([mqtt] broker is empty)", "")
		return
	}
	opts, errs := cfg.mqttOptions(true)
	if len(errs) > 0 {
		cl.add(gateway.LevelFail, "broker", errors.Join(errs...).Error(), "fix the [mqtt] keys named")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, d.Timeout)
	defer cancel()
	probe, err := gateway.ProbeBroker(ctx, opts)
	if err != nil {
		cl.add(gateway.LevelFail, "broker", cfg.MQTT.Broker+" unreachable: "+err.Error(),
			"start the broker (systemctl start mosquitto) or correct [mqtt] broker, username and password_file")
		return
	}
	var refused, downgraded []string
	for _, s := range probe.Subscriptions {
		switch {
		case !s.Granted():
			refused = append(refused, fmt.Sprintf("%s (reason code %#x)", s.Topic, s.Code))
		case s.Code < s.QoS:
			downgraded = append(downgraded, fmt.Sprintf("%s (QoS %d granted, %d asked)", s.Topic, s.Code, s.QoS))
		}
	}
	switch {
	case len(refused) > 0:
		cl.add(gateway.LevelFail, "broker", "subscriptions refused: "+strings.Join(refused, ", "),
			"allow the gateway's user to read these topics in the broker's ACL, or correct [[mqtt.subscribe]] topic")
	case len(downgraded) > 0:
		cl.add(gateway.LevelFail, "broker", "subscriptions downgraded: "+strings.Join(downgraded, ", ")+
			": at QoS 0 nothing is queued or redelivered for the gateway", "remove max_qos from the broker's config")
	case probe.SessionExpiry < cfg.MQTT.SessionExpiry.Duration:
		cl.add(gateway.LevelWarn, "broker", fmt.Sprintf("reachable, but it caps the session expiry at %s (asked %s): readings queued during a longer gateway outage are lost",
			probe.SessionExpiry, cfg.MQTT.SessionExpiry.Duration), "raise the broker's session expiry limit (Mosquitto: persistent_client_expiration)")
	default:
		cl.add(gateway.LevelOK, "broker", fmt.Sprintf("%s reachable, %d subscriptions granted, session expiry %s", cfg.MQTT.Broker, len(probe.Subscriptions), probe.SessionExpiry), "")
	}
	d.checkBrokerQueue(cl, cfg)
}

func checkPorts(cl *checklist, cfg *Config) {
	admin := cfg.Admin.Listen
	running := false
	ln, err := net.Listen("tcp", admin)
	switch {
	case err == nil:
		_ = ln.Close()
		cl.add(gateway.LevelOK, "ports", "admin "+admin+" (tcp) is free", "")
	case errors.Is(err, syscall.EADDRINUSE) && sluiceAnswers(admin):
		running = true
		cl.add(gateway.LevelOK, "ports", "admin "+admin+" (tcp) is served by the running gateway", "")
	default:
		cl.add(gateway.LevelFail, "ports", "admin "+admin+" (tcp) cannot be bound: "+err.Error(),
			"stop what holds it (ss -ltnp) or change [admin] listen")
	}
	for _, addr := range []string{cfg.CoAP.Listen, cfg.CoAP.DTLSListen} {
		if addr == "" {
			continue
		}
		pc, err := net.ListenPacket("udp", addr)
		switch {
		case err == nil:
			_ = pc.Close()
			cl.add(gateway.LevelOK, "ports", "coap "+addr+" (udp) is free", "")
		case running && errors.Is(err, syscall.EADDRINUSE):
			cl.add(gateway.LevelOK, "ports", "coap "+addr+" (udp) is in use, by the running gateway it seems", "")
		default:
			cl.add(gateway.LevelFail, "ports", "coap "+addr+" (udp) cannot be bound: "+err.Error(),
				"stop what holds it (ss -lunp) or change [coap] listen/dtls_listen")
		}
	}
}

// sluiceAnswers reports whether a sluice admin endpoint answers on listen.
func sluiceAnswers(listen string) bool {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + dialableAdmin(listen) + "/healthz")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64))
	return resp.StatusCode == http.StatusOK && strings.TrimSpace(string(body)) == "ok"
}

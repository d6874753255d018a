package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/sluice-gw/sluice/buffer"
	"github.com/sluice-gw/sluice/internal/testenv"
)

// needRoot fails (under SLUICE_REQUIRE_SERVICES=1) or skips a test that
// mounts filesystems, as testenv does for a missing server.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if testenv.Require() {
		t.Fatalf("mounting a test filesystem needs root, and %s=1 demands every test", testenv.RequireEnv)
	}
	t.Skip("SKIP: mounting a test filesystem needs root; run the README's test command (./test.sh) as root")
}

// mustRun runs a system command and fails the test when it fails.
func mustRun(t *testing.T, argv ...string) string {
	t.Helper()
	out, code := runCommand(t, nil, argv...)
	if code != 0 {
		t.Fatalf("%s: exit %d\n%s", strings.Join(argv, " "), code, out)
	}
	return out
}

// mountImage loop-mounts an ext4 image at dir and returns the loop device.
// The cleanup thaws, unmounts and detaches, also after a failure.
func mountImage(t *testing.T, img, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimSpace(mustRun(t, "losetup", "--find", "--show", img))
	t.Cleanup(func() {
		_, _ = runCommand(t, nil, "fsfreeze", "-u", dir)
		if out, code := runCommand(t, nil, "umount", dir); code != 0 && !strings.Contains(out, "not mounted") {
			_, _ = runCommand(t, nil, "umount", "-l", dir)
		}
		_, _ = runCommand(t, nil, "losetup", "-d", dev)
	})
	mustRun(t, "mount", dev, dir)
}

// newExt4 makes an ext4 image of the given size and mounts it at dir.
func newExt4(t *testing.T, img, dir string, mib int) {
	t.Helper()
	mustRun(t, "truncate", "-s", fmt.Sprintf("%dM", mib), img)
	mustRun(t, "mkfs.ext4", "-q", img)
	mountImage(t, img, dir)
}

// freeze stops all writes to the filesystem at dir (fsfreeze): what is on
// the device now is what a power cut at this moment would leave. The thaw
// is registered as a cleanup, so a failed test does not leave a process
// stuck on the frozen filesystem.
func freeze(t *testing.T, dir string) (thaw func()) {
	t.Helper()
	mustRun(t, "fsfreeze", "-f", dir)
	thaw = sync.OnceFunc(func() { _, _ = runCommand(t, nil, "fsfreeze", "-u", dir) })
	t.Cleanup(thaw)
	return thaw
}

// setDataDir points a started gateway's config at another data directory,
// for its next start.
func (g *gatewayProc) setDataDir(from, to string) {
	g.t.Helper()
	b, err := os.ReadFile(g.config)
	if err != nil {
		g.t.Fatal(err)
	}
	cfg := strings.Replace(string(b), fmt.Sprintf("data_dir = %q", from), fmt.Sprintf("data_dir = %q", to), 1)
	if err := os.WriteFile(g.config, []byte(cfg), 0o600); err != nil {
		g.t.Fatal(err)
	}
}

// signalKill SIGKILLs the gateway without waiting for it to go: a process
// blocked on a frozen filesystem exits only once it is thawed.
func (g *gatewayProc) signalKill() { _ = g.cmd.Process.Signal(syscall.SIGKILL) }

// waitExit waits for the process to be gone.
func (g *gatewayProc) waitExit(d time.Duration) {
	g.t.Helper()
	select {
	case <-g.exited:
	case <-time.After(d):
		g.t.Fatalf("the gateway did not exit within %s", d)
	}
}

// waitBufferAtLeast waits until the gateway's buffer holds n readings or more.
func (g *gatewayProc) waitBufferAtLeast(n int64, d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		st := g.adminStatus()
		if st.Buffer.Readings >= n {
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("buffer holds %d readings after %s, want %d or more (full %v)", st.Buffer.Readings, d, n, st.Buffer.Full)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitBacklog waits until the gateway's buffer holds want readings.
func (g *gatewayProc) waitBacklog(want int64, d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		n := g.adminStatus().Buffer.Readings
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("buffer holds %d readings after %s, want %d", n, d, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// backlog lists the acknowledged readings not in Postgres beyond those
// already known to be missing: with the uplink cut, what the buffer holds.
func (l *ledger) backlog(t *testing.T, dsn string, known map[string][]int64) (n int64, values map[string][]int64) {
	t.Helper()
	values = map[string][]int64{}
	for name, vs := range l.count(t, dsn).missing {
		for _, v := range vs {
			if !slices.Contains(known[name], v) {
				values[name] = append(values[name], v)
				n++
			}
		}
	}
	return n, values
}

// pagesInUse is how many bytes of a closed bbolt file its pages reach.
func pagesInUse(t *testing.T, path string) int64 {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var size int64
	if err := db.View(func(tx *bolt.Tx) error { size = tx.Size(); return nil }); err != nil {
		t.Fatal(err)
	}
	return size
}

// damageQueuePage overwrites one leaf page of the telemetry queue of a
// closed buffer file with garbage, leaving the meta pages and the stream
// records readable: bbolt can still count what was lost, but not read it.
func damageQueuePage(t *testing.T, path string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var root uint64
	var pageSize int
	err = db.View(func(tx *bolt.Tx) error {
		q := tx.Bucket([]byte("q:" + string(buffer.ClassTelemetry)))
		if q == nil {
			return fmt.Errorf("no telemetry queue in %s", path)
		}
		root, pageSize = uint64(q.Root()), db.Info().PageSize
		return nil
	})
	db.Close()
	if err != nil || root == 0 {
		t.Fatalf("find the queue's pages (root %d, inline when 0): %v", root, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	page := make([]byte, pageSize)
	if _, err := f.ReadAt(page, int64(root)*int64(pageSize)); err != nil {
		t.Fatal(err)
	}
	// A page starts with id (8 bytes), flags (2), count (2), overflow (4);
	// a branch page's elements are pos (4), ksize (4), pgid (8).
	target := root
	const branchPage, headerSize, branchElement = 0x01, 16, 16
	if binary.LittleEndian.Uint16(page[8:]) == branchPage {
		count := int(binary.LittleEndian.Uint16(page[10:]))
		mid := headerSize + branchElement*(count/2)
		target = binary.LittleEndian.Uint64(page[mid+8:])
	}
	for i := range page {
		page[i] = byte(i*7 + 3)
	}
	if _, err := f.WriteAt(page, int64(target)*int64(pageSize)); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// waitRecovered waits until the gateway reports a buffer file moved aside.
func (g *gatewayProc) waitRecovered(d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for g.adminStatus().Buffer.Recovered == nil {
		if time.Now().After(deadline) {
			g.t.Fatalf("no buffer recovery reported within %s", d)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// staysUp requires the process to stay alive and ready for d: a gateway
// that crash-loops would exit.
func (g *gatewayProc) staysUp(d time.Duration) {
	g.t.Helper()
	g.waitIngress("mqtt", 20*time.Second)
	select {
	case <-g.exited:
		g.t.Fatalf("the gateway exited:\n%s", g.out.String())
	case <-time.After(d):
	}
	if code, _ := httpStatus(g.t, "http://"+g.admin+"/readyz"); code != 200 {
		g.t.Fatalf("/readyz = %d after %s", code, d)
	}
}

// TestFaultPowerCut puts the data directory on a loop-mounted ext4 image
// and cuts the power the way the flash sees it: the filesystem is frozen
// mid-stream (a commit in progress blocks and never reaches the device),
// the gateway is SIGKILLed, and the image as it was at the freeze is what
// the next start finds. Everything the broker acknowledged lands exactly
// once. Then the file is damaged twice, as torn flash would be (a queue page
// overwritten, the file cut short): each time it is moved aside, a new
// stream starts, the loss is reported in /api/status and in the heartbeat,
// and the gateway starts three times in a row without crash-looping.
func TestFaultPowerCut(t *testing.T) {
	needRoot(t)
	broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
	pg := testenv.SharedPostgres(t)
	dsn := pg.NewDatabase(t)
	proxy := testenv.StartProxy(t, pg.Addr())
	work := t.TempDir()
	flash, mnt := filepath.Join(work, "flash.img"), filepath.Join(work, "flash")
	newExt4(t, flash, mnt, 64)
	data := filepath.Join(mnt, "data")
	// min_free_disk below the image's size, or the buffer would not grow at all.
	g := startGateway(t, gatewayConfig(t, data, broker.URL(), replaceHostPort(t, dsn, proxy.Addr()), testenv.FreePort(t),
		"[buffer]\nmin_free_disk = \"1MiB\"\n"))
	g.waitIngress("mqtt", 20*time.Second)

	l := newLedger()
	base := time.Now().Add(-time.Hour).UnixMilli()
	sensors := []*mqttSensor{
		{p: newPublisher(t, broker.Addr(), "pc-0"), sensor: sensor{l: l, name: "pc0", metric: "level", base: base}},
		{p: newPublisher(t, broker.Addr(), "pc-1"), sensor: sensor{l: l, name: "pc1", metric: "level", timed: true, base: base}},
	}
	next := make([]int64, len(sensors))
	stream := func(stop <-chan struct{}) *sync.WaitGroup {
		var wg sync.WaitGroup
		for i, s := range sensors {
			wg.Go(func() { next[i] = s.streamValues(t, stop, 5*time.Millisecond, next[i], s.send) })
		}
		return &wg
	}

	// Power cut: uploads cut off so the buffer holds a backlog, the
	// filesystem frozen mid-stream, the process killed.
	stop := make(chan struct{})
	wg := stream(stop)
	time.Sleep(time.Second)
	proxy.Cut()
	g.waitBufferAtLeast(300, 30*time.Second)
	thaw := freeze(t, mnt)
	time.Sleep(300 * time.Millisecond) // the next group commit blocks on the frozen filesystem
	g.signalKill()
	snapshot := filepath.Join(work, "flash-at-power-cut.img")
	mustRun(t, "cp", "--sparse=always", flash, snapshot)
	thaw()
	g.waitExit(30 * time.Second)
	close(stop)
	wg.Wait()
	mustRun(t, "umount", mnt)

	after := filepath.Join(work, "after")
	mountImage(t, snapshot, after)
	data2 := filepath.Join(after, "data")
	g.setDataDir(data, data2)
	proxy.Heal()
	g.start()
	if rec := g.adminStatus().Buffer.Recovered; rec != nil {
		t.Fatalf("an intact file after a power cut was treated as damaged: %+v", rec)
	}
	l.verify(t, g, dsn, "power cut: fsfreeze + SIGKILL, restart on the frozen image", time.Minute)

	// Damage: the file holds a known backlog, which is lost; the gateway
	// says how much, in status and in the next heartbeat, and goes on with
	// a new stream.
	lost := map[string][]int64{}
	damage := func(what string, harm func(path string)) (reported, held int64) {
		t.Helper()
		proxy.Cut()
		stop := make(chan struct{})
		wg := stream(stop)
		g.waitBufferAtLeast(500, 30*time.Second)
		close(stop)
		wg.Wait()
		held, values := l.backlog(t, dsn, lost)
		g.waitBacklog(held, 30*time.Second)
		streams := queryInt(t, dsn, "SELECT count(*) FROM sluice.streams")
		g.kill()
		harm(filepath.Join(data2, buffer.FileName))
		proxy.Heal()
		g.start()
		g.waitRecovered(20 * time.Second)
		rec := g.adminStatus().Buffer.Recovered
		if _, err := os.Stat(rec.MovedTo); err != nil {
			t.Fatalf("%s: the damaged file is not kept at %s: %v", what, rec.MovedTo, err)
		}
		t.Logf("%s: moved to %s, %d readings lost: %s", what, rec.MovedTo, rec.LostReadings, rec.Reason)
		lostCol := fmt.Sprintf("= %d", rec.LostReadings)
		if rec.LostReadings < 0 {
			lostCol = "IS NULL" // beyond counting: the heartbeat says unknown
		}
		waitRows(t, dsn, 1, 20*time.Second, `SELECT count(*) FROM sluice.gateways WHERE gateway_id = 'gw-e2e'
AND buffer_recovered_at IS NOT NULL AND buffer_lost_readings `+lostCol)
		// New readings go to a new stream and land.
		stop = make(chan struct{})
		wg = stream(stop)
		time.Sleep(time.Second)
		close(stop)
		wg.Wait()
		waitRows(t, dsn, streams+1, 20*time.Second, "SELECT count(*) FROM sluice.streams")
		for name, vs := range values {
			lost[name] = append(lost[name], vs...)
		}
		ty := l.waitLandedExcept(t, dsn, lost, time.Minute)
		// The idempotency keys were in the lost file too: a message the
		// broker redelivers after the loss cannot be recognised, so an
		// untimed reading (pc0) redelivered then may be stored a second
		// time, under a new gateway time (seen once in about ten runs, one
		// reading). A timed reading (pc1) is caught by its natural key and
		// never doubles; nothing may come from nowhere.
		if len(ty.doubled["pc1"]) != 0 || len(ty.doubled["pc0"]) > 16 || ty.stray != 0 {
			t.Fatalf("%s: %s, stray %d; doubled %s", what, ty, ty.stray, ranges(ty.doubled))
		}
		if ty.duplicated != 0 {
			t.Logf("%s: %d untimed readings redelivered after the loss stored twice: %s", what, ty.duplicated, ranges(ty.doubled))
		}
		t.Logf("RELIABILITY damaged buffer file (%s): %s; the file held %d, the gateway reported %d lost", what, ty, held, rec.LostReadings)
		return rec.LostReadings, held
	}
	// A page of the queue overwritten: the stream records are intact, so
	// the gateway counts exactly what it lost.
	if reported, held := damage("queue page overwritten", func(path string) { damageQueuePage(t, path) }); reported != held {
		t.Fatalf("the damaged file held %d readings, the gateway reported %d lost", held, reported)
	}
	// The file cut short, as a torn write leaves it: what it held may be
	// beyond counting, which the gateway reports as -1 (status) and NULL
	// (heartbeat). It is cut inside the pages in use: bbolt grows its file
	// ahead of them, and a cut in the unused tail harms nothing.
	if reported, held := damage("file cut short", func(path string) {
		if err := os.Truncate(path, pagesInUse(t, path)/2); err != nil {
			t.Fatal(err)
		}
	}); reported != held && reported != -1 {
		t.Fatalf("the torn file held %d readings, the gateway reported %d lost", held, reported)
	}

	// No crash loop: three starts in a row, each one stays up and ready,
	// and the recovery is still reported.
	for i := range 3 {
		g.kill()
		g.start()
		g.staysUp(2 * time.Second)
		if g.adminStatus().Buffer.Recovered == nil {
			t.Fatalf("start %d no longer reports the recovery", i+1)
		}
	}
}

// waitLandedExcept waits until every acknowledged reading but the given
// ones (lost with a damaged file) is in Postgres, and requires those to be
// missing still; it returns the tally, whose lost are exactly those.
func (l *ledger) waitLandedExcept(t *testing.T, dsn string, except map[string][]int64, d time.Duration) tally {
	t.Helper()
	want := 0
	for _, vs := range except {
		want += len(vs)
	}
	deadline := time.Now().Add(d)
	for {
		ty := l.count(t, dsn)
		if ty.lost == want {
			for name, vs := range except {
				if !slices.Equal(ty.missing[name], sorted(vs)) {
					t.Fatalf("missing %s, want exactly the damaged files' %s", ranges(ty.missing), ranges(except))
				}
			}
			return ty
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s; missing %s, want only %s", d, ty, ranges(ty.missing), ranges(except))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func sorted(vs []int64) []int64 { return slices.Sorted(slices.Values(vs)) }

// mountTmpfs mounts a tmpfs of the given size at dir, unmounted in cleanup.
func mountTmpfs(t *testing.T, dir string, mib int) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%dm", mib), "tmpfs", dir)
	t.Cleanup(func() {
		if _, code := runCommand(t, nil, "umount", dir); code != 0 {
			_, _ = runCommand(t, nil, "umount", "-l", dir)
		}
	})
}

// packSensor publishes SenML packs of 100 timed readings, values
// 100*i .. 100*i+99, so that a small disk fills in a few hundred messages.
type packSensor struct {
	p    *publisher
	l    *ledger
	name string
	base int64 // Unix milliseconds of value 0
	next int64 // the next pack
}

func (s *packSensor) send(t *testing.T, packs int) {
	t.Helper()
	for range packs {
		vals := make([]int64, 100)
		var b strings.Builder
		b.WriteString("[")
		for j := range vals {
			v := s.next*100 + int64(j)
			vals[j] = v
			if j == 0 {
				fmt.Fprintf(&b, `{"bn":"%s:","n":"level","u":"m","v":%d,"t":%d.%03d}`, s.name, v, (s.base+v)/1000, (s.base+v)%1000)
			} else {
				fmt.Fprintf(&b, `,{"n":"level","u":"m","v":%d,"t":%d.%03d}`, v, (s.base+v)/1000, (s.base+v)%1000)
			}
		}
		b.WriteString("]")
		s.next++
		s.l.sent(s.name, vals...)
		if err := s.p.publish("packs/"+s.name, []byte(b.String())); err != nil {
			t.Fatalf("publish pack %d: %v", s.next-1, err)
		}
		s.l.acked(s.name, vals...)
	}
}

// TestFaultDiskFull runs the gateway on a 16 MiB tmpfs that a filler file
// has all but filled (2 MiB free, min_free_disk 512 KiB), with the uplink cut, and streams until the disk is
// full. drop-oldest keeps taking readings, evicts the oldest and counts
// exactly what it dropped (metrics and status); reject holds the MQTT
// messages at the broker. The file opens clean after a restart, and once
// space returns (the filler removed, the uplink back) everything not
// counted as dropped lands exactly once.
func TestFaultDiskFull(t *testing.T) {
	needRoot(t)
	for _, onFull := range []string{"drop-oldest", "reject"} {
		t.Run(onFull, func(t *testing.T) {
			broker := testenv.StartMosquitto(t, testenv.MosquittoOptions{})
			pg := testenv.SharedPostgres(t)
			dsn := pg.NewDatabase(t)
			proxy := testenv.StartProxy(t, pg.Addr())
			disk := filepath.Join(t.TempDir(), "disk")
			mountTmpfs(t, disk, 16)
			filler := filepath.Join(disk, "filler")
			if err := os.WriteFile(filler, make([]byte, 14<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			data := filepath.Join(disk, "data")
			g := startGateway(t, gatewayConfig(t, data, broker.URL(), replaceHostPort(t, dsn, proxy.Addr()), testenv.FreePort(t),
				fmt.Sprintf("[buffer]\nmax_bytes = \"64MiB\"\nmin_free_disk = \"512KiB\"\non_full = %q\n", onFull)))
			g.waitIngress("mqtt", 20*time.Second)
			waitRows(t, dsn, 1, 20*time.Second, "SELECT count(*) FROM sluice.gateways") // the schema is in place

			l := newLedger()
			s := &packSensor{p: newPublisher(t, broker.Addr(), "disk-full-"+onFull), l: l, name: "df", base: time.Now().Add(-time.Hour).UnixMilli()}
			s.send(t, 5)
			l.waitLanded(t, dsn, 30*time.Second)
			proxy.Cut()
			// About 2 MiB free for a file that may grow to 64 MiB: the disk
			// fills first. Stream until the policy acts, then some more.
			deadline := time.Now().Add(2 * time.Minute)
			for more := -1; more != 0; more-- {
				s.send(t, 10)
				st := g.adminStatus()
				if more < 0 && (st.Buffer.Full || st.Buffer.Dropped["buffer_full"] > 0) {
					more = 5
				}
				if time.Now().After(deadline) {
					t.Fatalf("disk never full: %+v", st.Buffer)
				}
			}
			if onFull == "drop-oldest" {
				// Every message is taken in: what is not buffered was dropped.
				for {
					st := g.adminStatus()
					if st.Buffer.Readings+st.Buffer.Dropped["buffer_full"]+5*100 == s.next*100 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("%d readings sent, buffer %+v", s.next*100, st.Buffer)
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
			st := g.adminStatus()
			dropped := st.Buffer.Dropped["buffer_full"]
			metrics := g.metrics()
			if got := int64(metricValue(metrics, `sluice_readings_dropped_total{reason="buffer_full"}`)); got != dropped {
				t.Fatalf("sluice_readings_dropped_total{reason=\"buffer_full\"} = %d, status says %d", got, dropped)
			}
			var fs syscall.Statfs_t
			if err := syscall.Statfs(disk, &fs); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: disk full with %d readings buffered (%d bytes, file %d bytes), %d dropped, %d KiB free",
				onFull, st.Buffer.Readings, st.Buffer.Bytes, st.Buffer.FileBytes, dropped, int64(fs.Bavail)*fs.Bsize>>10)
			switch onFull {
			case "drop-oldest":
				if dropped == 0 {
					t.Fatal("drop-oldest on a full disk dropped nothing")
				}
			case "reject":
				if dropped != 0 {
					t.Fatalf("reject dropped %d readings", dropped)
				}
				if metricValue(metrics, `sluice_messages_rejected_total{ingress="mqtt",reason="buffer_full"}`) == 0 {
					t.Fatal("the held messages are not counted as buffer_full")
				}
			}

			// No corruption: a restart opens the file as it is.
			g.stop()
			expectCLI(t, 0, []string{"unsent"}, "buffer", "inspect", "--data-dir", data)
			g.start()
			if rec := g.adminStatus().Buffer.Recovered; rec != nil {
				t.Fatalf("the file of a full disk was found damaged: %+v", rec)
			}

			// Space returns: the filler goes, the uplink comes back.
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
			waitOutput(t, g, `msg="buffer disk space" component=buffer low=false`) // seen within one housekeeping round
			proxy.Heal()
			s.send(t, 20)
			ty := l.waitLandedExcept(t, dsn, droppedValues(l.count(t, dsn).missing, dropped), 2*time.Minute)
			g.waitBufferEmpty(time.Minute)
			ty = l.count(t, dsn)
			if int64(ty.lost) != dropped || ty.duplicated != 0 || ty.stray != 0 {
				t.Fatalf("%s: %s, stray %d, %d dropped as counted; missing %s", onFull, ty, ty.stray, dropped, ranges(ty.missing))
			}
			if vs := ty.missing["df"]; len(vs) > 0 && vs[len(vs)-1]-vs[0]+1 != int64(len(vs)) {
				t.Fatalf("the dropped readings are not the oldest of the backlog, one run: %s", ranges(ty.missing))
			}
			if after := g.adminStatus().Buffer.Dropped["buffer_full"]; after != dropped {
				t.Fatalf("%d more readings dropped after space returned", after-dropped)
			}
			t.Logf("RELIABILITY disk full, on_full=%s: %s (the %d lost are the ones counted as dropped)", onFull, ty, dropped)
		})
	}
}

// droppedValues is what a drop-oldest run may miss: as many readings as
// were counted dropped.
func droppedValues(missing map[string][]int64, dropped int64) map[string][]int64 {
	out := map[string][]int64{}
	for name, vs := range missing {
		if int64(len(vs)) > dropped {
			vs = vs[:dropped]
		}
		out[name] = vs
	}
	return out
}

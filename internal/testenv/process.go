package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// process is one server binary that can be started, stopped and started again.
// Each run is a child in its own process group (so a Ctrl-C at the terminal reaches
// only the test binary), with a parent-death signal (so it dies with the test
// binary), and its stdout and stderr appended to logPath.
type process struct {
	name     string              // for messages: "postgres", "mosquitto", "pgbouncer"
	path     string              // the binary
	args     []string            // its arguments
	cred     *syscall.Credential // run as this user; nil: as ourselves
	deathSig syscall.Signal      // sent to the child when the test binary dies
	logPath  string

	mu  sync.Mutex // guards cur
	cur *run       // the latest run, or nil before the first start
}

// run is one execution of a process.
type run struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been reaped
	err  error         // what Wait returned; read only after done is closed
}

func (r *run) exited() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// start starts a new run. It fails if the previous run is still alive.
func (p *process) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur != nil && !p.cur.exited() {
		return fmt.Errorf("%s is already running (pid %d)", p.name, p.cur.cmd.Process.Pid)
	}
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open %s log: %w", p.name, err)
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "=== testenv: %s %s %s\n", time.Now().Format(time.RFC3339Nano), p.path, strings.Join(p.args, " "))

	cmd := exec.Command(p.path, p.args...)
	cmd.Env = serverEnv()
	cmd.Dir = filepath.Dir(p.logPath)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:    true,
		Pdeathsig:  p.deathSig,
		Credential: p.cred,
	}
	if err := startCmd(cmd); err != nil {
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	r := &run{cmd: cmd, done: make(chan struct{})}
	go func() {
		r.err = cmd.Wait()
		close(r.done)
	}()
	p.cur = r
	return nil
}

// spawner starts every child process from one goroutine locked to its OS thread,
// which never exits. The kernel sends the parent-death signal when the thread that
// forked the child ends, not the process (golang.org/issue/27505); a Go thread ends
// when a goroutine that locked it exits, so a child forked from an arbitrary thread
// could be killed in the middle of a test by an unrelated LockOSThread user.
var spawner struct {
	once sync.Once
	reqs chan spawnRequest
}

type spawnRequest struct {
	cmd *exec.Cmd
	err chan<- error
}

// startCmd starts cmd on the spawner thread; the caller waits for it as usual.
func startCmd(cmd *exec.Cmd) error {
	spawner.once.Do(func() {
		spawner.reqs = make(chan spawnRequest)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread lives as long as the process
			for req := range spawner.reqs {
				req.err <- req.cmd.Start()
			}
		}()
	})
	errc := make(chan error, 1)
	spawner.reqs <- spawnRequest{cmd: cmd, err: errc}
	return <-errc
}

// current returns the latest run, or nil.
func (p *process) current() *run {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur
}

// running reports whether the latest run is alive.
func (p *process) running() bool {
	r := p.current()
	return r != nil && !r.exited()
}

// stop sends sig to the process and waits until it has exited. After grace it kills
// it and its descendants (see kill) and reports that the stop was not clean. A
// process that is not running is not an error.
func (p *process) stop(sig syscall.Signal, grace time.Duration) error {
	r := p.current()
	if r == nil || r.exited() {
		return nil
	}
	pid := r.cmd.Process.Pid
	if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal %s: %w", p.name, err)
	}
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-r.done:
		return nil
	case <-timer.C:
		p.killGroup(r)
		return fmt.Errorf("%s (pid %d) did not exit within %v of %v; killed", p.name, pid, grace, sig)
	}
}

// kill SIGKILLs the process and all its descendants at once (a postmaster's
// backends, which put themselves into sessions of their own, too), and waits until
// the process has been reaped and none of them is alive any more.
func (p *process) kill() {
	if r := p.current(); r != nil {
		p.killGroup(r)
	}
}

func (p *process) killGroup(r *run) {
	if r.exited() {
		return
	}
	pid := r.cmd.Process.Pid
	// Freeze the process so that it forks no new child while we collect them.
	_ = syscall.Kill(pid, syscall.SIGSTOP)
	victims := append(descendants(pid), pid)
	for _, v := range victims {
		_ = syscall.Kill(v, syscall.SIGKILL)
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL) // its process group (Setpgid), for good measure
	<-r.done
	deadline := time.Now().Add(StartTimeout)
	for _, v := range victims {
		for procAlive(v) && time.Now().Before(deadline) {
			time.Sleep(2 * time.Millisecond)
		}
	}
}

// procStat returns the state, parent pid and process group of a process from
// /proc/PID/stat, or ok false if there is no such process.
func procStat(pid string) (state string, ppid, pgrp int, ok bool) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return "", 0, 0, false
	}
	// pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", 0, 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 3 {
		return "", 0, 0, false
	}
	ppid, _ = strconv.Atoi(f[1])
	pgrp, _ = strconv.Atoi(f[2])
	return f[0], ppid, pgrp, true
}

// procAlive reports whether a process exists and is not a zombie. A zombie holds no
// sockets or shared memory any more: an orphan that nobody reaps counts as gone.
func procAlive(pid int) bool {
	state, _, _, ok := procStat(strconv.Itoa(pid))
	return ok && state != "Z" && state != "X"
}

// descendants returns the pids of the children of pid, their children, and so on.
func descendants(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if _, ppid, _, ok := procStat(e.Name()); ok {
			children[ppid] = append(children[ppid], child)
		}
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		next := queue[0]
		queue = queue[1:]
		out = append(out, children[next]...)
		queue = append(queue, children[next]...)
	}
	return out
}

// waitReady polls probe until it succeeds, the process exits, or StartTimeout passes.
func (p *process) waitReady(probe func(ctx context.Context) error) error {
	r := p.current()
	if r == nil {
		return fmt.Errorf("%s was not started", p.name)
	}
	deadline := time.Now().Add(StartTimeout)
	var last error
	for {
		if r.exited() {
			return fmt.Errorf("%s exited during start: %v", p.name, r.err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		last = probe(ctx)
		cancel()
		if last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v: %v", p.name, StartTimeout, last)
		}
		select {
		case <-r.done:
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// serverEnv is the environment of a server: ours without the libpq variables (PGPORT,
// PGDATA, ...), which would change what the Postgres tools do, and with a C locale.
func serverEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_") || strings.HasPrefix(kv, "LANG=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LANG=C", "LC_ALL=C")
}

// addrInUse reports whether a server's log says its port was taken.
func addrInUse(logPath string, since int64) bool {
	b, err := os.ReadFile(logPath)
	if err != nil || int64(len(b)) < since {
		return false
	}
	s := string(b[since:])
	return strings.Contains(s, "Address already in use") || strings.Contains(s, "address already in use")
}

// logSize returns the current size of a log file, to look only at what a new run adds.
func logSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

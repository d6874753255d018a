package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// harness is the testing.TB that internal/testenv's helpers take, for a
// program rather than a test. Fatal and Skip panic with a fatal value, which
// main recovers; main then runs the cleanups (stopping every server) and
// exits 1. The embedded TB stays nil: testenv calls only the methods below.
type harness struct {
	testing.TB
	name string
	root string // TempDir's directories go here

	mu       sync.Mutex // guards the fields below
	cleanups []func()
	failed   bool
	dirs     int
}

// fatal is the panic value of Fatal and Skip.
type fatal struct{ msg string }

func newHarness(name, root string) *harness { return &harness{name: name, root: root} }

func (h *harness) Name() string { return h.name }
func (h *harness) Helper()      {}

func (h *harness) Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "    "+format+"\n", args...)
}
func (h *harness) Log(args ...any) { fmt.Fprintln(os.Stderr, append([]any{"   "}, args...)...) }

func (h *harness) Errorf(format string, args ...any) {
	h.Logf(format, args...)
	h.Fail()
}
func (h *harness) Error(args ...any) { h.Errorf("%s", fmt.Sprint(args...)) }

func (h *harness) Fatalf(format string, args ...any) {
	h.Fail()
	panic(fatal{fmt.Sprintf(format, args...)})
}
func (h *harness) Fatal(args ...any) { h.Fatalf("%s", fmt.Sprint(args...)) }
func (h *harness) FailNow()          { h.Fatalf("failed") }

// A skip is a failure here: a benchmark without its servers measures nothing.
func (h *harness) Skipf(format string, args ...any) { h.Fatalf(format, args...) }
func (h *harness) Skip(args ...any)                 { h.Fatal(args...) }
func (h *harness) SkipNow()                         { h.Fatalf("skipped") }
func (h *harness) Skipped() bool                    { return false }

func (h *harness) Fail() {
	h.mu.Lock()
	h.failed = true
	h.mu.Unlock()
}

func (h *harness) Failed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.failed
}

func (h *harness) Cleanup(f func()) {
	h.mu.Lock()
	h.cleanups = append(h.cleanups, f)
	h.mu.Unlock()
}

// TempDir makes a new directory under the harness's root on each call.
func (h *harness) TempDir() string {
	h.mu.Lock()
	h.dirs++
	n := h.dirs
	h.mu.Unlock()
	dir := filepath.Join(h.root, fmt.Sprintf("tmp%03d", n))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		h.Fatalf("TempDir: %v", err)
	}
	return dir
}

// runCleanups runs the registered cleanups, last first, once each.
func (h *harness) runCleanups() {
	for {
		h.mu.Lock()
		n := len(h.cleanups)
		if n == 0 {
			h.mu.Unlock()
			return
		}
		f := h.cleanups[n-1]
		h.cleanups = h.cleanups[:n-1]
		h.mu.Unlock()
		f()
	}
}

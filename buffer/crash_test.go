package buffer

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// crashWriterEnv makes the test binary a writer process that appends until
// it is killed, printing the number of every reading Append acknowledged.
const crashWriterEnv = "SLUICE_BUFFER_CRASH_WRITER_DIR"

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashWriterEnv); dir != "" {
		runCrashWriter(dir)
		return
	}
	os.Exit(m.Run())
}

func runCrashWriter(dir string) {
	start, _ := strconv.Atoi(os.Getenv("SLUICE_BUFFER_CRASH_START"))
	b, err := Open(Options{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		os.Exit(3)
	}
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := start + w; ; i += 8 {
				r := reading("crash", i)
				r.Number = float64(i)
				if _, err := b.Append(context.Background(), msg(ClassTelemetry, r)); err != nil {
					fmt.Fprintln(os.Stderr, "append:", err)
					os.Exit(4)
				}
				mu.Lock()
				fmt.Fprintln(out, i)
				_ = out.Flush()
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

// TestSurvivesSIGKILL kills a writer process at random moments and checks
// that every reading Append acknowledged is in the file after reopening.
func TestSurvivesSIGKILL(t *testing.T) {
	dir := t.TempDir()
	acked := map[int]bool{}
	rounds := 5
	if testing.Short() {
		rounds = 2
	}
	for round := range rounds {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashWriterEnv+"="+dir, fmt.Sprintf("SLUICE_BUFFER_CRASH_START=%d", round*1_000_000))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				n, err := strconv.Atoi(sc.Text())
				if err == nil {
					acked[n] = true
				}
			}
		}()
		time.Sleep(time.Duration(50+rand.IntN(400)) * time.Millisecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-done
		_ = cmd.Wait()
		if strings.TrimSpace(stderr.String()) != "" {
			t.Fatalf("writer failed: %s", stderr.String())
		}
	}
	if len(acked) == 0 {
		t.Fatal("the writer acknowledged nothing before it was killed")
	}
	b := openTest(t, dir, Options{})
	if rec := b.Recovered(); rec != nil {
		t.Fatalf("SIGKILL damaged the file: %+v", rec)
	}
	stored := map[int]bool{}
	if err := b.Unsent(func(_ Class, _ [16]byte, r Record) error {
		stored[int(r.Number)] = true
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	lost := 0
	for n := range acked {
		if !stored[n] {
			lost++
		}
	}
	if lost > 0 {
		t.Fatalf("%d of %d acknowledged readings lost after SIGKILL", lost, len(acked))
	}
	t.Logf("%d acknowledged readings survived %d kills (%d stored)", len(acked), rounds, len(stored))
}

package buffer

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BenchmarkAppend is the CoAP benchmark's write path without the network: 64
// concurrent senders, each a message of 10 readings and a checked key per
// request (as CoAP stores them: random 16 bytes, a window of 131,072), onto
// a buffer that already holds a full key window. It reports readings/s and
// the commit times' p50 and p99.
func BenchmarkAppend(b *testing.B) {
	for _, c := range []struct {
		name     string
		readings int
		keys     bool
	}{
		{"10-readings/keys", 10, true},
		{"10-readings/no-keys", 10, false},
		{"1-reading/keys", 1, true},
	} {
		b.Run(c.name, func(b *testing.B) { benchAppend(b, c.readings, c.keys) })
	}
}

func benchAppend(b *testing.B, perMessage int, keys bool) {
	const senders, window = 64, 131072
	var mu sync.Mutex
	var commits []time.Duration
	buf, err := Open(Options{Dir: b.TempDir(), MaxBytes: 4 << 30, MinFreeDisk: 1,
		OnCommit: func(d time.Duration, _ int) {
			mu.Lock()
			commits = append(commits, d)
			mu.Unlock()
		}})
	if err != nil {
		b.Fatal(err)
	}
	defer buf.Close()
	key := func(i int) *Key {
		if !keys {
			return nil
		}
		h := sha256.Sum256(binary.BigEndian.AppendUint64(nil, uint64(i)))
		return &Key{Space: "coap", ID: h[:16], Check: true, TTL: time.Hour, Keep: window}
	}
	message := func(i int) Message {
		rs := make([]Reading, perMessage)
		for j := range rs {
			rs[j] = reading(fmt.Sprintf("bench-%d", i%senders), i*perMessage+j)
			rs[j].Name = fmt.Sprintf("%s:m%d", rs[j].Sensor, j)
			rs[j].Metric = fmt.Sprintf("m%d", j)
		}
		return Message{Class: ClassTelemetry, Readings: rs, Key: key(i)}
	}
	// A full key window first, as a gateway that has served CoAP for a while.
	if keys {
		var ps []*Pending
		for i := range window {
			ps = append(ps, buf.AppendAsync(Message{Class: ClassTelemetry, Readings: []Reading{reading("warm", i)}, Key: key(-1 - i)}))
		}
		for _, p := range ps {
			if _, err := p.Result(); err != nil {
				b.Fatal(err)
			}
		}
	}
	mu.Lock()
	commits = commits[:0]
	mu.Unlock()
	msgs := make([]Message, b.N)
	for i := range msgs {
		msgs[i] = message(i)
	}
	b.ResetTimer()
	cpu0 := processCPU(b)
	var wg sync.WaitGroup
	next := make(chan int)
	for range senders {
		wg.Go(func() {
			for i := range next {
				if _, err := buf.AppendAsync(msgs[i]).Result(); err != nil {
					b.Error(err)
				}
			}
		})
	}
	for i := range b.N {
		next <- i
	}
	close(next)
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N*perMessage)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64((processCPU(b)-cpu0).Nanoseconds())/float64(b.N*perMessage), "cpu-ns/reading")
	mu.Lock()
	defer mu.Unlock()
	if len(commits) > 0 {
		slices.Sort(commits)
		b.ReportMetric(float64(commits[len(commits)/2].Microseconds()), "commit-p50-µs")
		b.ReportMetric(float64(commits[len(commits)*99/100].Microseconds()), "commit-p99-µs")
		b.ReportMetric(float64(b.N)/float64(len(commits)), "msgs/commit")
	}
}

// BenchmarkPeekAck is the buffer's side of a backlog drain: batches of 5,000
// (the uplink's default) peeked and acknowledged until b.N readings are gone.
func BenchmarkPeekAck(b *testing.B) {
	buf, err := Open(Options{Dir: b.TempDir(), MaxBytes: 4 << 30, MinFreeDisk: 1})
	if err != nil {
		b.Fatal(err)
	}
	defer buf.Close()
	var ps []*Pending
	for i := 0; i < b.N; i += 1000 {
		rs := make([]Reading, min(1000, b.N-i))
		for j := range rs {
			rs[j] = reading("drain", i+j)
		}
		ps = append(ps, buf.AppendAsync(Message{Class: ClassTelemetry, Readings: rs}))
	}
	for _, p := range ps {
		if _, err := p.Result(); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	cpu0 := processCPU(b)
	for {
		batch, err := buf.Peek(5000)
		if err != nil {
			b.Fatal(err)
		}
		if len(batch.Records) == 0 {
			break
		}
		if err := buf.Ack(batch.Stream, batch.Last(), nil); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "readings/s")
	b.ReportMetric(float64((processCPU(b)-cpu0).Nanoseconds())/float64(b.N), "cpu-ns/reading")
}

// processCPU is the CPU time the process has used so far, user and system:
// the commits wait for fsync, so wall time measures the disk, not the work.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

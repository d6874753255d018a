package main

import (
	"context"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// memoryTuner applies [runtime]: GOGC, and a memory limit that is
// memory_limit while the live heap is small and follows it when it is not.
//
// A gateway's live heap is a few MiB and nearly all it allocates is garbage
// at once, so a high GOGC under a small memory limit saves a quarter of the
// CPU at full ingest and keeps the resident set near the limit. But live
// data may outgrow a small limit (go-coap keeps every peer's responses for
// 247 s, so a CoAP load of thousands of requests a second holds tens of
// MiB), and a collector held under a limit close to the live heap runs
// without pause: the limit then rises with the live heap.
type memoryTuner struct {
	base int64 // memory_limit; 0 when GOMEMLIMIT is set and wins
	set  func(int64) int64
	live func() uint64
}

// Once the live heap outgrows memory_limit, the limit becomes
// memoryLiveFactor times the live heap plus memoryHeadroom: at least what
// GOGC=200 would give, so that collections stay seconds apart even at CoAP's
// full rate (each marks the whole live heap, and requests wait meanwhile).
const (
	memoryLiveFactor = 3
	memoryHeadroom   = 8 << 20
)

// newMemoryTuner sets GOGC and the memory limit from rs unless the
// environment sets them.
func newMemoryTuner(rs RuntimeSection) *memoryTuner {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(rs.GCPercent)
	}
	t := &memoryTuner{set: debug.SetMemoryLimit, live: liveHeap}
	if os.Getenv("GOMEMLIMIT") == "" {
		t.base = rs.MemoryLimit.Bytes
		t.set(t.base)
	}
	return t
}

// memoryLimitFor is the limit for a live heap of live bytes.
func memoryLimitFor(base int64, live uint64) int64 {
	return max(base, memoryLiveFactor*int64(live)+memoryHeadroom)
}

// Run follows the live heap every second until ctx is done.
func (t *memoryTuner) Run(ctx context.Context) error {
	if t.base == 0 {
		return nil
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	current := t.base
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if want := memoryLimitFor(t.base, t.live()); want>>20 != current>>20 {
				t.set(want)
				current = want
			}
		}
	}
}

// liveHeap is the heap the last collection found live.
func liveHeap() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

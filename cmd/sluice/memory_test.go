package main

import (
	"context"
	"sync"
	"testing"
	"time"
)

func TestMemoryLimitFollowsTheLiveHeap(t *testing.T) {
	const base = 20 << 20
	for _, c := range []struct {
		live uint64
		want int64
	}{
		{0, base},
		{4 << 20, base},      // a busy MQTT gateway: the configured limit
		{5 << 20, 23 << 20},  // 3*5+8: a little above it
		{30 << 20, 98 << 20}, // CoAP peers' response caches: three times the live heap and headroom
	} {
		if got := memoryLimitFor(base, c.live); got != c.want {
			t.Errorf("live %d MiB: limit %d MiB, want %d MiB", c.live>>20, got>>20, c.want>>20)
		}
	}
}

func TestMemoryTunerRaisesAndLowersTheLimit(t *testing.T) {
	var mu sync.Mutex
	live := uint64(1 << 20)
	var limits []int64
	tu := &memoryTuner{base: 20 << 20,
		set:  func(v int64) int64 { mu.Lock(); defer mu.Unlock(); limits = append(limits, v); return 0 },
		live: func() uint64 { mu.Lock(); defer mu.Unlock(); return live }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = tu.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitLimit := func(want int64) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			mu.Lock()
			n := len(limits)
			last := int64(0)
			if n > 0 {
				last = limits[n-1]
			}
			mu.Unlock()
			if last == want {
				return
			}
		}
		t.Fatalf("limit never became %d MiB: %v", want>>20, limits)
	}
	mu.Lock()
	live = 40 << 20
	mu.Unlock()
	waitLimit(128 << 20)
	mu.Lock()
	live = 2 << 20
	mu.Unlock()
	waitLimit(20 << 20)
}

package bench

import (
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/procfs"
)

// ProcSample is one look at a process in /proc.
type ProcSample struct {
	At      time.Time
	CPU     time.Duration // utime + stime, whole process (all threads)
	VmHWM   int64         // peak resident set, bytes
	VmRSS   int64         // resident set now, bytes
	RssAnon int64         // anonymous resident memory now (heap, stacks), bytes
	RssFile int64         // file-backed resident memory now (binary, bbolt's mmap), bytes

	DiskWrites int64 // bytes the process caused to be written to storage (/proc/PID/io write_bytes)
	Syscalls   int64 // read and write syscalls so far (syscr + syscw), sockets and files alike
}

// ReadProc reads /proc/PID/stat and /proc/PID/status.
func ReadProc(pid int) (ProcSample, error) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return ProcSample{}, fmt.Errorf("read /proc/%d: %w", pid, err)
	}
	at := time.Now()
	st, err := p.Stat()
	if err != nil {
		return ProcSample{}, fmt.Errorf("read /proc/%d/stat: %w", pid, err)
	}
	ss, err := p.NewStatus()
	if err != nil {
		return ProcSample{}, fmt.Errorf("read /proc/%d/status: %w", pid, err)
	}
	io, err := p.IO()
	if err != nil {
		return ProcSample{}, fmt.Errorf("read /proc/%d/io: %w", pid, err)
	}
	return ProcSample{
		At:         at,
		DiskWrites: int64(io.WriteBytes),
		Syscalls:   int64(io.SyscR + io.SyscW),
		CPU:        time.Duration(st.CPUTime() * float64(time.Second)),
		VmHWM:      int64(ss.VmHWM),
		VmRSS:      int64(ss.VmRSS),
		RssAnon:    int64(ss.RssAnon),
		RssFile:    int64(ss.RssFile),
	}, nil
}

// Sampler reads a process's /proc entries on an interval and keeps the peaks,
// until Stop.
type Sampler struct {
	pid  int
	stop chan struct{}
	done chan struct{}

	mu          sync.Mutex // guards the fields below
	first, last ProcSample
	peakAnon    int64
	samples     int
	err         error
}

// StartSampler samples pid every interval (at least once, at once).
func StartSampler(pid int, every time.Duration) *Sampler {
	s := &Sampler{pid: pid, stop: make(chan struct{}), done: make(chan struct{})}
	s.take()
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				s.take()
			}
		}
	}()
	return s
}

func (s *Sampler) take() {
	ps, err := ReadProc(s.pid)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		if s.err == nil {
			s.err = err
		}
		return
	}
	if s.samples == 0 {
		s.first = ps
	}
	s.last = ps
	s.peakAnon = max(s.peakAnon, ps.RssAnon)
	s.samples++
}

// Usage is what a Sampler saw.
type Usage struct {
	Samples     int
	CPU         time.Duration // CPU time used between the first and last sample
	Wall        time.Duration // time between the first and last sample
	PeakRssAnon int64         // the highest RssAnon sampled
	VmHWM       int64         // the process's peak RSS at the last sample (since it started)
	Last        ProcSample
}

// Stop takes a last sample and returns the usage seen.
func (s *Sampler) Stop() (Usage, error) {
	close(s.stop)
	<-s.done
	s.take()
	s.mu.Lock()
	defer s.mu.Unlock()
	u := Usage{
		Samples:     s.samples,
		CPU:         s.last.CPU - s.first.CPU,
		Wall:        s.last.At.Sub(s.first.At),
		PeakRssAnon: s.peakAnon,
		VmHWM:       s.last.VmHWM,
		Last:        s.last,
	}
	return u, s.err
}

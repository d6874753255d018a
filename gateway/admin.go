package gateway

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// AdminOptions are the [admin] section.
type AdminOptions struct {
	// Listen is the TCP address (default "127.0.0.1:9180").
	Listen string
	// Token, when set, is required on every endpoint but /healthz, as
	// "Authorization: Bearer <token>" (or HTTP Basic with the token as the
	// password, so a browser can open the status page). It is required when
	// Listen is not a loopback address (checked by the config).
	Token string
	// Backlog reads the buffered readings for the status page's sparkline
	// (nil: no history).
	Backlog func() int64
	// SampleEvery is the sparkline's sampling interval (default 30s; an hour
	// of samples is kept).
	SampleEvery time.Duration
}

// DefaultAdminListen is loopback: the status page is for a technician on
// the board or through an SSH tunnel unless a token guards it.
const DefaultAdminListen = "127.0.0.1:9180"

// IsLoopback reports whether a listen address binds only to loopback. An
// empty host, 0.0.0.0 and [::] bind every interface and are not loopback.
func IsLoopback(listen string) bool {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Admin serves /metrics, /healthz, /readyz, /api/status and the status page.
type Admin struct {
	opts    AdminOptions
	gather  prometheus.Gatherer
	status  func() Status
	ready   func() error
	log     *slog.Logger
	ln      net.Listener
	history *backlogHistory
	token   [sha256.Size]byte // hash of opts.Token, compared in constant time
}

// NewAdmin binds the listener at once, so a port in use is a start-up
// error. status and ready are called on every request, concurrently.
func NewAdmin(opts AdminOptions, gather prometheus.Gatherer, status func() Status, ready func() error, log *slog.Logger) (*Admin, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.Listen == "" {
		opts.Listen = DefaultAdminListen
	}
	if opts.Token == "" && !IsLoopback(opts.Listen) {
		return nil, fmt.Errorf("admin: listen %s is not loopback: a token is required", opts.Listen)
	}
	if opts.SampleEvery <= 0 {
		opts.SampleEvery = 30 * time.Second
	}
	ln, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", opts.Listen, err)
	}
	a := &Admin{opts: opts, gather: gather, status: status, ready: ready, log: log, ln: ln,
		history: newBacklogHistory(int(time.Hour / opts.SampleEvery))}
	if opts.Token != "" {
		a.token = sha256.Sum256([]byte(opts.Token))
	}
	return a, nil
}

// Addr is the bound address.
func (a *Admin) Addr() string { return a.ln.Addr().String() }

// Handler is the admin mux, with the token check in front.
func (a *Admin) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.gather, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := a.ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, _ *http.Request) {
		st := a.status()
		if a.opts.Backlog != nil {
			st.BacklogHistory = a.history.samples(BacklogSample{At: time.Now().UTC(), Readings: st.Buffer.Readings})
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(st)
	})
	mux.HandleFunc("GET /{$}", servePage)
	return a.authenticate(mux)
}

// authenticate lets /healthz through and asks for the token elsewhere.
func (a *Admin) authenticate(next http.Handler) http.Handler {
	if a.opts.Token == "" {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" || a.authorized(r) {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Add("WWW-Authenticate", `Bearer realm="sluice"`)
		w.Header().Add("WWW-Authenticate", `Basic realm="sluice", charset="UTF-8"`)
		http.Error(w, "unauthorized: send Authorization: Bearer <admin token>", http.StatusUnauthorized)
	})
}

// authorized compares the presented token with ours in constant time (both
// hashed first, so not even the length shows).
func (a *Admin) authorized(r *http.Request) bool {
	h := r.Header.Get("Authorization")
	var presented string
	if tok, ok := cutPrefixFold(h, "Bearer "); ok {
		presented = strings.TrimSpace(tok)
	} else if b64, ok := cutPrefixFold(h, "Basic "); ok {
		raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
		if err != nil {
			return false
		}
		_, presented, _ = strings.Cut(string(raw), ":")
	} else {
		return false
	}
	sum := sha256.Sum256([]byte(presented))
	return subtle.ConstantTimeCompare(sum[:], a.token[:]) == 1
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return "", false
}

// Run serves until ctx is done, and samples the backlog for the sparkline.
func (a *Admin) Run(ctx context.Context) error {
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 5 * time.Second, IdleTimeout: time.Minute}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(a.ln) }()
	var wg sync.WaitGroup
	defer wg.Wait()
	sampleCtx, stopSampling := context.WithCancel(ctx)
	defer stopSampling()
	if a.opts.Backlog != nil {
		wg.Go(func() { a.sample(sampleCtx) })
	}
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("admin: %w", err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		<-errc
		return nil
	}
}

// sample records the backlog now and every SampleEvery until ctx is done.
func (a *Admin) sample(ctx context.Context) {
	t := time.NewTicker(a.opts.SampleEvery)
	defer t.Stop()
	for {
		a.history.add(BacklogSample{At: time.Now().UTC(), Readings: a.opts.Backlog()})
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// backlogHistory is a bounded ring of backlog samples.
type backlogHistory struct {
	mu   sync.Mutex // guards ring, next, full
	ring []BacklogSample
	next int
	full bool
}

func newBacklogHistory(n int) *backlogHistory {
	return &backlogHistory{ring: make([]BacklogSample, max(n, 2))}
}

func (h *backlogHistory) add(s BacklogSample) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ring[h.next] = s
	h.next = (h.next + 1) % len(h.ring)
	h.full = h.full || h.next == 0
}

// samples returns the ring oldest first, then now.
func (h *backlogHistory) samples(now BacklogSample) []BacklogSample {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]BacklogSample, 0, len(h.ring)+1)
	if h.full {
		out = append(out, h.ring[h.next:]...)
	}
	out = append(out, h.ring[:h.next]...)
	return append(out, now)
}

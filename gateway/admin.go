package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Status is the JSON of /api/status: everything a technician or the status
// command needs to judge the gateway at a glance.
type Status struct {
	Gateway GatewayStatus   `json:"gateway"`
	Ingress []IngressStatus `json:"ingress"`
	Buffer  BufferStatus    `json:"buffer"`
	Uplink  UplinkStatus    `json:"uplink"`
	Clock   ClockStatus     `json:"clock"`
	Sensors []SensorStatus  `json:"sensors"`
	Health  string          `json:"health"` // ok | degraded | failing
	Reasons []string        `json:"reasons,omitempty"`
}

// GatewayStatus identifies the gateway.
type GatewayStatus struct {
	ID            string  `json:"id"`
	Site          string  `json:"site"`
	Profile       string  `json:"profile"`
	Version       string  `json:"version"`
	UptimeSeconds float64 `json:"uptime_seconds"`
}

// IngressStatus is one way in.
type IngressStatus struct {
	Name      string `json:"name"`
	State     string `json:"state"`
	LastError string `json:"last_error,omitempty"`
}

// BufferStatus is the local backlog.
type BufferStatus struct {
	Readings         int64            `json:"readings"`
	Bytes            int64            `json:"bytes"`
	MaxBytes         int64            `json:"max_bytes"`
	FileBytes        int64            `json:"file_bytes"`
	OldestAgeSeconds float64          `json:"oldest_age_seconds"`
	Dropped          map[string]int64 `json:"dropped"`
	DeadLetters      int64            `json:"dead_letters"`
	Full             bool             `json:"full"`
	Recovered        *RecoveryStatus  `json:"recovered,omitempty"`
}

// RecoveryStatus reports a damaged buffer file that was moved aside.
type RecoveryStatus struct {
	At           time.Time `json:"at"`
	MovedTo      string    `json:"moved_to"`
	Reason       string    `json:"reason"`
	LostReadings int64     `json:"lost_readings"`
}

// UplinkStatus is the central side as the gateway sees it.
type UplinkStatus struct {
	State         string    `json:"state"`
	LastSuccess   time.Time `json:"last_success,omitzero"`
	LastUpload    time.Time `json:"last_upload,omitzero"`
	LastHeartbeat time.Time `json:"last_heartbeat,omitzero"`
	LastError     string    `json:"last_error,omitempty"`
	LagSeconds    float64   `json:"lag_seconds"`
	SchemaVersion int       `json:"schema_version"`
	Uploaded      int64     `json:"uploaded"`
}

// ClockStatus is the clock trust.
type ClockStatus struct {
	Synced        bool    `json:"synced"`
	Source        string  `json:"source"`
	Mode          string  `json:"mode"`
	OffsetSeconds float64 `json:"server_offset_seconds"`
}

// AdminOptions are the [admin] section.
type AdminOptions struct {
	Listen string // (default "127.0.0.1:9180")
	Token  string // required when Listen is not loopback
}

// Admin serves /metrics, /healthz, /readyz and /api/status.
type Admin struct {
	opts   AdminOptions
	gather prometheus.Gatherer
	status func() Status
	ready  func() error
	log    *slog.Logger
	ln     net.Listener
}

// NewAdmin binds the listener at once, so a port in use is a start-up error.
func NewAdmin(opts AdminOptions, gather prometheus.Gatherer, status func() Status, ready func() error, log *slog.Logger) (*Admin, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ln, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("admin: listen on %s: %w", opts.Listen, err)
	}
	return &Admin{opts: opts, gather: gather, status: status, ready: ready, log: log, ln: ln}, nil
}

// Addr is the bound address.
func (a *Admin) Addr() string { return a.ln.Addr().String() }

// Handler is the admin mux.
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
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(a.status())
	})
	return mux
}

// Run serves until ctx is done.
func (a *Admin) Run(ctx context.Context) error {
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(a.ln) }()
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

package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	dtlsServer "github.com/plgd-dev/go-coap/v3/dtls/server"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapNet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/net/responsewriter"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpClient "github.com/plgd-dev/go-coap/v3/udp/client"
	udpServer "github.com/plgd-dev/go-coap/v3/udp/server"
	"golang.org/x/time/rate"

	"github.com/sluice-gw/sluice/buffer"
)

// CoAP is the CoAP ingress: a go-coap server on UDP and DTLS that answers a
// confirmable POST or PUT 2.04 Changed only once its readings are durable.
//
// go-coap runs one peer's requests one at a time and peers in parallel, so
// each handler simply waits for its group commit.
type CoAP struct {
	opts   CoAPOptions
	in     *Ingest
	buf    Appender
	log    *slog.Logger
	router *mux.Router
	auth   *dtlsAuth // nil without dtls_listen

	status   ingressState
	mu       sync.Mutex // guards stopping, inflight
	stopping bool       // no new request is taken in
	inflight int        // requests taken in and not yet answered
	idle     chan struct{}
	idleOnce sync.Once

	handshakeLog rate.Sometimes // failed handshakes: one log line a second
	recycled     atomic.Int64   // plain-UDP peer conns closed for recycling
}

// StateListening: the CoAP listeners are bound and serving.
const StateListening = "listening"

// CoAP timing, each with the reason for its number.
const (
	// coapKeyTTL is EXCHANGE_LIFETIME (RFC 7252 §4.8.2): the longest a client
	// may retransmit a confirmable request, and the shortest before it may
	// reuse its message id.
	coapKeyTTL = 247 * time.Second
	// coapKeysKept caps the keys kept whatever their age: at 131,072 keys
	// (about 11 MiB of the buffer) a gateway taking up to 530 requests/s keeps
	// each for the whole EXCHANGE_LIFETIME, and one taking 1,400/s still keeps
	// it beyond MAX_TRANSMIT_WAIT (93 s), the longest a client retransmits.
	coapKeysKept = 1 << 17
	// coapDrainTimeout bounds how long a stop waits for taken requests to be
	// answered: an append waits for one group commit, a few milliseconds.
	coapDrainTimeout = 5 * time.Second
	// coapFullRetry is the Max-Age of a 5.03 for a full buffer: room comes
	// back when the uplink drains, which after an outage takes a while.
	coapFullRetry = 30
	// coapStopRetry is the Max-Age of a 5.03 while the gateway stops: a restart takes seconds.
	coapStopRetry = 5
	// coapBlockTimeout: a sleepy sensor may pause between blocks; the
	// partial body is dropped after this.
	coapBlockTimeout = 10 * time.Second
	// coapBlockTransfers bounds the block-wise uploads one peer may have
	// open at once, and so the memory a peer can make the gateway hold
	// (each up to max_payload; go-coap allows 4096 by default).
	coapBlockTransfers = 4
)

// NewCoAP checks the options and builds the ingress; Run binds the listeners.
func NewCoAP(opts CoAPOptions, in *Ingest, buf Appender, log *slog.Logger) (*CoAP, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &CoAP{opts: opts, in: in, buf: buf, log: log, status: ingressState{state: StateStarting}, idle: make(chan struct{}),
		handshakeLog: rate.Sometimes{Interval: time.Second}}
	if opts.DTLSListen != "" {
		auth, err := newDTLSAuth(opts, log)
		if err != nil {
			return nil, fmt.Errorf("coap: %w", err)
		}
		c.auth = auth
	}
	c.router = c.newRouter(c.serveIngest)
	return c, nil
}

// State is the listener state and the last error, for status.
func (c *CoAP) State() (state, lastErr string) { return c.status.get() }

// setState records a state change; one with an error is returned by Run,
// which is where it is logged.
func (c *CoAP) setState(s string, err error) {
	c.status.set(s, err)
	if err == nil {
		c.log.Info("coap state", "state", s)
	}
}

// ReloadPSK replaces the pre-shared keys. Sessions of identities whose key
// is unchanged go on (a changed sensor list applies to their next request);
// sessions of identities removed or given a new key are closed. It returns
// how many sessions were kept and closed. Safe to call at any time.
func (c *CoAP) ReloadPSK(t *PSKTable) (kept, closed int) {
	if c.auth == nil {
		return 0, 0
	}
	return c.auth.reload(t)
}

// Run binds the listeners and serves until ctx is done. It then stops
// taking requests in (new ones get 5.03 with Max-Age), waits until those
// already taken in are durable and answered, closes the listeners and
// returns nil. A listener that cannot be bound is an error.
func (c *CoAP) Run(ctx context.Context) error {
	// Each server runs on its own goroutine until stopAll; the first to
	// end on its own (a socket error) ends Run.
	var (
		wg        sync.WaitGroup
		stops     []func()
		errMu     sync.Mutex
		serveErrs []error
		exited    = make(chan struct{})
		exitOnce  sync.Once
	)
	start := func(serve func() error, stop func()) {
		stops = append(stops, stop)
		wg.Go(func() {
			if err := serve(); err != nil && !errors.Is(err, net.ErrClosed) {
				errMu.Lock()
				serveErrs = append(serveErrs, err)
				errMu.Unlock()
			}
			exitOnce.Do(func() { close(exited) })
		})
	}
	stopAll := func() error {
		for _, stop := range stops {
			stop()
		}
		wg.Wait()
		errMu.Lock()
		defer errMu.Unlock()
		return errors.Join(serveErrs...)
	}

	if c.opts.Listen != "" {
		l, err := coapNet.NewListenUDP("udp", c.opts.Listen)
		if err != nil {
			err = fmt.Errorf("listen on %s: %w", c.opts.Listen, err)
			c.setState(StateStopped, err)
			return err
		}
		defer l.Close()
		srv := udp.NewServer(c.udpOptions()...)
		start(func() error { return srv.Serve(l) }, srv.Stop)
	}
	if c.opts.DTLSListen != "" {
		l, err := coapNet.NewDTLSListener("udp", c.opts.DTLSListen, coapNet.NewDTLSServerOptions(c.auth.serverOptions()...))
		if err != nil {
			err = fmt.Errorf("listen (dtls) on %s: %w", c.opts.DTLSListen, err)
			c.setState(StateStopped, errors.Join(err, stopAll()))
			return err
		}
		defer l.Close()
		srv := dtls.NewServer(c.dtlsOptions()...)
		start(func() error { return srv.Serve(l) }, srv.Stop)
	}
	c.setState(StateListening, nil)

	var early bool
	select {
	case <-ctx.Done():
	case <-exited:
		early = true
	}
	c.drain()
	runErr := stopAll()
	if early && runErr == nil {
		runErr = errors.New("a listener stopped serving")
	}
	if runErr != nil {
		runErr = fmt.Errorf("serve: %w", runErr)
		c.setState(StateStopped, runErr)
		return runErr
	}
	c.setState(StateStopped, nil)
	return nil
}

// drain stops taking requests in and waits, bounded, until those taken in
// have been answered.
func (c *CoAP) drain() {
	c.mu.Lock()
	c.stopping = true
	left := c.inflight
	if left == 0 {
		c.idleOnce.Do(func() { close(c.idle) })
	}
	c.mu.Unlock()
	t := time.NewTimer(coapDrainTimeout)
	defer t.Stop()
	select {
	case <-c.idle:
	case <-t.C:
		c.log.Warn("coap stopping with requests unanswered; their senders retransmit", "requests", left)
	}
}

// enter takes a request in, unless the server is stopping; leave must be
// called once it is answered.
func (c *CoAP) enter() (leave func(), ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		return nil, false
	}
	c.inflight++
	return sync.OnceFunc(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.inflight--
		if c.stopping && c.inflight == 0 {
			c.idleOnce.Do(func() { close(c.idle) })
		}
	}), true
}

// commonOptions apply to both servers. go-coap answers unknown critical
// options 4.02 and retransmitted requests from its per-peer cache itself.
func (c *CoAP) commonOptions() []interface {
	udpServer.Option
	dtlsServer.Option
} {
	return []interface {
		udpServer.Option
		dtlsServer.Option
	}{
		options.WithMux(c.router),
		options.WithErrors(c.libError),
		options.WithRequestMonitor(c.monitor),
		options.WithBlockwise(true, blockwise.SZX1024, coapBlockTimeout),
		options.WithBlockwiseReceivingMessagesCacheMaxEntries(coapBlockTransfers),
	}
}

func (c *CoAP) udpOptions() []udpServer.Option {
	var opts []udpServer.Option
	for _, o := range c.commonOptions() {
		opts = append(opts, o)
	}
	return append(opts, peerRecycling{recycled: &c.recycled})
}

func (c *CoAP) dtlsOptions() []dtlsServer.Option {
	var opts []dtlsServer.Option
	for _, o := range c.commonOptions() {
		opts = append(opts, o)
	}
	return append(opts, options.WithOnNewConn(c.auth.onNewConn))
}

// libError receives go-coap's errors: malformed datagrams, peers gone,
// failed handshakes. They are a device's problem, not the gateway's, so only
// a failed DTLS handshake (a device with a wrong key or certificate, which a
// technician looks for) is logged above debug, at most once a second.
func (c *CoAP) libError(err error) {
	var hs *piondtls.HandshakeError
	if errors.As(err, &hs) {
		c.handshakeLog.Do(func() { c.log.Warn("dtls handshake failed", "err", err) })
		return
	}
	c.log.Debug("coap peer error", "err", err)
}

// tooLargeKey marks, in a request's context, a block-wise upload whose
// announced or accumulated size is over max_payload.
type tooLargeKey struct{}

// monitor sees every datagram before go-coap reassembles block-wise
// uploads, which it would do without a cap. A Block1 request that would take
// the body over max_payload loses its Block1 option, so that it goes straight
// to the handler, marked to be answered 4.13 with Size1; the partial body is
// dropped when the transfer times out. It also tells a plain-UDP peer's
// recycling monitor of the message (coap_recycle.go).
func (c *CoAP) monitor(cc *udpClient.Conn, req *pool.Message) (drop bool, err error) {
	if m := peerMonitorOf(cc); m != nil {
		m.seen(req)
	}
	if req.Code() != codes.POST && req.Code() != codes.PUT {
		return false, nil
	}
	v, err := req.GetOptionUint32(message.Block1)
	if err != nil {
		return false, nil
	}
	szx, num, _, err := blockwise.DecodeBlockOption(v)
	if err != nil {
		return false, nil // go-coap answers a bad Block1 itself
	}
	size := num * szx.Size()
	if n, err := req.BodySize(); err == nil {
		size += n
	}
	if s1, err := req.GetOptionUint32(message.Size1); err == nil {
		size = max(size, int64(s1))
	}
	if size <= int64(c.in.opts.MaxPayload) {
		return false, nil
	}
	req.Remove(message.Block1)
	req.SetContext(context.WithValue(req.Context(), tooLargeKey{}, size))
	return false, nil
}

// serveIngest takes one request to /s/... or /a/...: decode, authorise,
// append, and answer once durable.
func (c *CoAP) serveIngest(w mux.ResponseWriter, r *mux.Message, t coapTarget) {
	leave, ok := c.enter()
	if !ok {
		c.reply(w, &coapReply{code: codes.ServiceUnavailable, msg: "gateway is stopping", maxAge: coapStopRetry})
		return
	}
	// In flight until the answer has left, so that a stop waits for it. A
	// request answered with nothing (a NON accepted) leaves at the end.
	if !responsewriter.AfterWrite(r.Context(), leave) {
		defer leave()
	}
	confirmable := r.Type() == message.Confirmable
	peer := peerOf(w.Conn())
	if peer != nil {
		if rej := c.authorise(peer, t.sensor); rej != nil {
			c.reply(w, rejectionReply(rej, c.in.opts.MaxPayload))
			return
		}
	}
	d, reply := c.decode(r.Message, t)
	if reply != nil {
		c.reply(w, reply)
		return
	}
	defer c.in.Release(d.readings) // answered from here on: stored, a duplicate, or refused
	if peer != nil {
		for i := range d.readings {
			if rej := c.authorise(peer, d.readings[i].Sensor); rej != nil {
				c.reply(w, rejectionReply(rej, c.in.opts.MaxPayload))
				return
			}
		}
	}
	msg := buffer.Message{Class: t.class, Readings: d.readings}
	if mid := r.MessageID(); message.ValidateMID(mid) {
		// A block-wise upload reassembled by go-coap has no message id of
		// its own, and needs no key: a retransmitted last block finds no
		// transfer open any more and is answered 4.08, never appended.
		msg.Key = &buffer.Key{
			Space: IngressCoAP,
			ID:    coapKey(w.Conn(), peer != nil, mid, d.hash),
			// Checked always: CoAP has no duplicate flag, and a client must
			// not reuse a message id towards the same endpoint within
			// EXCHANGE_LIFETIME (RFC 7252 §4.4), which is as long as the key
			// lives. So a key that matches is a retransmission; the payload
			// hash in it keeps a client that breaks the rule from losing
			// a different message (an identical one is acknowledged
			// without being stored twice). A peer behind a NAT that moves
			// it to another port makes a new key: then only the natural
			// key centrally drops the copy, which untimed readings lack.
			Check: true,
			TTL:   coapKeyTTL,
			Keep:  coapKeysKept,
		}
	}
	res, err := c.buf.AppendAsync(msg).Result()
	switch {
	case err == nil && res.Duplicate:
		c.in.Redelivered(IngressCoAP)
	case err == nil:
		c.in.Accepted(IngressCoAP, d.readings)
	case errors.Is(err, buffer.ErrFull):
		c.reply(w, rejectionReply(c.in.Reject(IngressCoAP, &Rejection{ReasonBufferFull, "buffer full, try again later"}), c.in.opts.MaxPayload))
		return
	case errors.Is(err, buffer.ErrTooLarge):
		c.in.Reject(IngressCoAP, &Rejection{ReasonTooLarge, err.Error()})
		c.reply(w, &coapReply{code: codes.RequestEntityTooLarge, msg: "message larger than the gateway's buffer"})
		return
	case errors.Is(err, buffer.ErrClosed):
		c.reply(w, &coapReply{code: codes.ServiceUnavailable, msg: "gateway is stopping", maxAge: coapStopRetry})
		return
	default:
		c.log.Error("buffer append failed", "ingress", IngressCoAP, "err", err)
		c.reply(w, &coapReply{code: codes.InternalServerError, msg: "buffer write failed"})
		return
	}
	if confirmable {
		c.reply(w, &coapReply{code: codes.Changed})
	} else {
		leave()
	}
	// A NON request that was accepted gets no answer (RFC 7252 §5.2.3
	// lets the server stay silent). A NON request that was refused is
	// answered like a CON one: a sensor that listens learns why, one that
	// does not loses nothing it would otherwise have had.
}

// coapReply is an answer other than a bare 2.04.
type coapReply struct {
	code   codes.Code
	msg    string // diagnostic payload, text/plain
	size1  int    // > 0: the Size1 option, the largest body accepted (4.13)
	maxAge uint32 // > 0: the Max-Age option, seconds before trying again (5.03)
}

// rejectionReply maps a counted rejection to its response code (DESIGN.md:
// 4.00, 4.13, 4.00, 4.00, 4.15, 4.03 and 5.03 with Max-Age).
func rejectionReply(r *Rejection, maxPayload int) *coapReply {
	rp := &coapReply{code: codes.BadRequest, msg: r.Msg}
	switch r.Reason {
	case ReasonTooLarge:
		rp.code, rp.size1 = codes.RequestEntityTooLarge, maxPayload
	case ReasonUnsupported:
		rp.code = codes.UnsupportedMediaType
	case ReasonForbidden:
		rp.code = codes.Forbidden
	case ReasonBufferFull:
		rp.code, rp.maxAge = codes.ServiceUnavailable, coapFullRetry
	}
	return rp
}

func (c *CoAP) reply(w mux.ResponseWriter, rp *coapReply) {
	var body *bytes.Reader
	if rp.msg != "" {
		body = bytes.NewReader([]byte(rp.msg))
	}
	var err error
	if body != nil {
		err = w.SetResponse(rp.code, message.TextPlain, body)
	} else {
		err = w.SetResponse(rp.code, message.TextPlain, nil)
	}
	if err != nil {
		// The request's No-Response option (RFC 7967) asked not to hear this class.
		c.log.Debug("coap response suppressed", "err", err)
		return
	}
	if rp.size1 > 0 {
		w.Message().SetOptionUint32(message.Size1, uint32(rp.size1))
	}
	if rp.maxAge > 0 {
		w.Message().SetOptionUint32(message.MaxAge, rp.maxAge)
	}
}

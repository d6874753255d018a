package gateway

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"

	"github.com/sluice-gw/sluice/buffer"
)

// MQTT is the MQTT ingress: a persistent-session subscriber of the local
// broker that acknowledges each message only once its readings are durable.
type MQTT struct {
	opts   MQTTOptions
	in     *Ingest
	buf    Appender
	log    *slog.Logger
	broker *url.URL

	queue chan paho.PublishReceived // from paho's handler goroutine to decode
	acks  chan *inflight            // decoded messages, in receive order, to acknowledge
	hash  hash.Hash                 // the idempotency keys' hash; decodeLoop only

	subs  atomic.Pointer[[]Subscription]             // the current [[mqtt.subscribe]] entries; SIGHUP swaps them
	cm    atomic.Pointer[autopaho.ConnectionManager] // set on the first connection
	subMu sync.Mutex                                 // one SUBSCRIBE exchange at a time: reconnect or reload

	stopping atomic.Bool  // set first when Run begins to stop
	holding  atomic.Bool  // a message is held because the buffer refused it
	sendMu   sync.RWMutex // held shared by onPublish while it sends on queue; Run takes it to close queue
	status   ingressState
}

// inflight is a received message on its way to acknowledgement.
type inflight struct {
	pr      paho.PublishReceived
	msg     buffer.Message // zero when rejected
	pending *buffer.Pending
}

// Ingress states for status.
const (
	StateStarting     = "starting"
	StateSubscribing  = "subscribing" // connected, waiting for the SUBACK
	StateConnected    = "connected"   // connected and every subscription granted
	StateDisconnected = "disconnected"
	StateDegraded     = "degraded" // connected, but a subscription was refused
	StateStopped      = "stopped"
)

// NewMQTT checks the options and builds the ingress; Run connects.
func NewMQTT(opts MQTTOptions, gatewayID string, in *Ingest, buf Appender, log *slog.Logger) (*MQTT, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts.setDefaults(gatewayID)
	u, err := url.Parse(opts.Broker)
	if err != nil || opts.Broker == "" {
		return nil, fmt.Errorf("mqtt: broker %q: not a URL", opts.Broker)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &MQTT{
		opts: opts, in: in, buf: buf, log: log, broker: u,
		queue:  make(chan paho.PublishReceived, opts.ReceiveMaximum),
		acks:   make(chan *inflight, opts.ReceiveMaximum),
		hash:   sha256.New(),
		status: ingressState{state: StateStarting},
	}
	m.subs.Store(&opts.Subscriptions)
	return m, nil
}

// State is the connection state and the last error, for status.
func (m *MQTT) State() (state, lastErr string) { return m.status.get() }

func (m *MQTT) setState(s string, err error) {
	if m.status.set(s, err) {
		if err != nil {
			m.log.Warn("mqtt state", "state", s, "err", err)
		} else {
			m.log.Info("mqtt state", "state", s)
		}
	}
}

// Run connects (retrying with jittered backoff for as long as ctx lives),
// subscribes on every connection and takes messages in until ctx is done.
// It then stops taking new messages, lets those already received become
// durable and be acknowledged, disconnects and returns nil.
func (m *MQTT) Run(ctx context.Context) error {
	cfg, err := m.clientConfig()
	if err != nil {
		return err
	}
	// The connection outlives ctx by the drain below, so it has its own.
	connCtx, cancelConn := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelConn()
	cm, err := autopaho.NewConnection(connCtx, cfg)
	if err != nil {
		return fmt.Errorf("mqtt: %w", err)
	}
	var wg sync.WaitGroup
	wg.Go(m.decodeLoop)
	wg.Go(m.ackLoop)

	<-ctx.Done()
	// Ordered stop: refuse what paho still hands over (left unacknowledged,
	// the broker keeps it for the session), finish what was received, give
	// the last acknowledgements time to leave, then disconnect.
	m.stopping.Store(true)
	m.sendMu.Lock()
	close(m.queue)
	m.sendMu.Unlock()
	wg.Wait()
	time.Sleep(5 * m.opts.AckInterval)
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if err := cm.Disconnect(dctx); err != nil {
		m.log.Debug("mqtt disconnect", "err", err)
	}
	m.setState(StateStopped, nil)
	return nil
}

func (m *MQTT) clientConfig() (autopaho.ClientConfig, error) {
	recvMax := uint16(m.opts.ReceiveMaximum)
	maxPacket := uint32(max(4*m.in.opts.MaxPayload, 256<<10))
	cfg := autopaho.ClientConfig{
		ServerUrls:                    []*url.URL{m.broker},
		KeepAlive:                     uint16(m.opts.KeepAlive / time.Second),
		CleanStartOnInitialConnection: false,
		SessionExpiryInterval:         uint32(m.opts.SessionExpiry / time.Second),
		ReconnectBackoff:              reconnectBackoff(),
		ConnectTimeout:                10 * time.Second,
		ConnectUsername:               m.opts.Username,
		ConnectPassword:               []byte(m.opts.Password),
		OnConnectionUp:                m.onConnectionUp,
		OnConnectError: func(err error) {
			var ce *autopaho.ConnackError
			if errors.As(err, &ce) {
				// Say what the broker said, not just its code.
				reason, _, _ := strings.Cut((&packets.Connack{ReasonCode: ce.ReasonCode}).Reason(), " - ")
				err = fmt.Errorf("broker refused the connection: %s (reason code %#x)", reason, ce.ReasonCode)
			}
			m.setState(StateDisconnected, err)
		},
		OnConnectionDown: func() bool {
			m.setState(StateDisconnected, errors.New("connection lost"))
			return true
		},
		ConnectPacketBuilder: func(c *paho.Connect, _ *url.URL) (*paho.Connect, error) {
			if c.Properties == nil {
				c.Properties = &paho.ConnectProperties{}
			}
			// paho buffers up to Receive Maximum messages; the default 65,535
			// would let the broker fill the gateway's memory.
			c.Properties.ReceiveMaximum = &recvMax
			// The broker-side limit is only a loose guard: max_payload is
			// counted by Sluice itself, as too_large.
			c.Properties.MaximumPacketSize = &maxPacket
			return c, nil
		},
		ClientConfig: paho.ClientConfig{
			ClientID:                   m.opts.ClientID,
			EnableManualAcknowledgment: true,
			SendAcksInterval:           m.opts.AckInterval,
			OnPublishReceived:          []func(paho.PublishReceived) (bool, error){m.onPublish},
		},
	}
	if m.broker.Scheme == "mqtts" {
		tc, err := tlsConfig(m.opts.CAFile, m.opts.CertFile, m.opts.KeyFile, m.broker.Hostname())
		if err != nil {
			return cfg, fmt.Errorf("mqtt: %w", err)
		}
		cfg.TlsCfg = tc
	}
	cfg.AttemptConnection = func(ctx context.Context, c autopaho.ClientConfig, u *url.URL) (net.Conn, error) {
		return dialBuffered(ctx, c.TlsCfg, u)
	}
	return cfg, nil
}

// reconnectBackoff: a short random pause before the first attempt after a
// loss, then jittered exponential backoff up to 30 s.
func reconnectBackoff() func(int) time.Duration {
	exp := autopaho.NewExponentialBackoff(250*time.Millisecond, 30*time.Second, time.Second, 2)
	return func(attempt int) time.Duration {
		if attempt == 0 {
			return time.Duration(rand.Int64N(int64(250 * time.Millisecond)))
		}
		return exp(attempt)
	}
}

func tlsConfig(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: serverName}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file %s: no PEM certificate in it", caFile)
		}
		tc.RootCAs = pool
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("load cert_file/key_file: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// onConnectionUp subscribes on every (re)connection and checks each SUBACK
// code: a refused subscription is a degraded gateway, not a silent one.
func (m *MQTT) onConnectionUp(cm *autopaho.ConnectionManager, ack *paho.Connack) {
	m.cm.Store(cm)
	m.setState(StateSubscribing, nil)
	m.log.Info("mqtt connected", "session_present", ack.SessionPresent)
	// Not on paho's goroutine: the SUBACK arrives through it.
	go m.subscribe(cm)
}

// subscribe sends the current subscriptions and sets the state from the
// SUBACK codes.
func (m *MQTT) subscribe(cm *autopaho.ConnectionManager) {
	m.subMu.Lock()
	defer m.subMu.Unlock()
	current := *m.subs.Load()
	subs := make([]paho.SubscribeOptions, len(current))
	for i, s := range current {
		subs[i] = paho.SubscribeOptions{Topic: s.Topic, QoS: s.QoS, RetainHandling: 1}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sa, err := cm.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs})
	if err != nil {
		m.setState(StateDegraded, fmt.Errorf("subscribe: %w", err))
		return
	}
	var refused []error
	for i, code := range sa.Reasons {
		if i < len(subs) && code >= 0x80 {
			refused = append(refused, fmt.Errorf("subscription %q refused by the broker (reason code %#x)", subs[i].Topic, code))
		}
	}
	if len(sa.Reasons) != len(subs) {
		refused = append(refused, fmt.Errorf("broker answered %d of %d subscriptions", len(sa.Reasons), len(subs)))
	}
	if len(refused) > 0 {
		m.setState(StateDegraded, errors.Join(refused...))
		return
	}
	m.setState(StateConnected, nil)
	m.log.Info("mqtt subscribed", "subscriptions", len(subs))
}

// ReloadSubscriptions replaces the [[mqtt.subscribe]] entries while running:
// patterns, formats and priorities apply to the next message decoded; on a
// live connection the new list is subscribed (SUBACK checked) and filters
// no longer listed are unsubscribed. A message still arriving through a
// removed filter is rejected as matching no subscription. Broker, session
// and connection settings are not touched. It returns the filters added and
// removed.
func (m *MQTT) ReloadSubscriptions(subs []Subscription) (added, removed []string, err error) {
	next := m.opts
	next.Subscriptions = slices.Clone(subs)
	if err := next.Validate(); err != nil {
		return nil, nil, err
	}
	next.setDefaults("")
	old := *m.subs.Load()
	has := func(list []Subscription, s Subscription) bool {
		return slices.ContainsFunc(list, func(o Subscription) bool { return o.Topic == s.Topic && o.QoS == s.QoS })
	}
	for _, s := range next.Subscriptions {
		if !has(old, s) {
			added = append(added, s.Topic)
		}
	}
	for _, s := range old {
		if !slices.ContainsFunc(next.Subscriptions, func(o Subscription) bool { return o.Topic == s.Topic }) {
			removed = append(removed, s.Topic)
		}
	}
	m.subs.Store(&next.Subscriptions)
	cm := m.cm.Load()
	if cm == nil || (len(added) == 0 && len(removed) == 0) {
		return added, removed, nil // not connected yet: the next connection subscribes the new list
	}
	if state, _ := m.State(); state == StateDisconnected {
		return added, removed, nil
	}
	m.subscribe(cm)
	if len(removed) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := cm.Unsubscribe(ctx, &paho.Unsubscribe{Topics: removed}); err != nil {
			return added, removed, fmt.Errorf("unsubscribe %q: %w", removed, err)
		}
	}
	return added, removed, nil
}

// onPublish runs on paho's single handler goroutine: it only queues.
func (m *MQTT) onPublish(pr paho.PublishReceived) (bool, error) {
	m.sendMu.RLock()
	defer m.sendMu.RUnlock()
	if m.stopping.Load() {
		return true, nil // not acknowledged: the broker keeps it for the session
	}
	m.queue <- pr
	return true, nil
}

// subscriptionFor finds the subscription a message arrived through.
func (m *MQTT) subscriptionFor(topic string) *Subscription {
	subs := *m.subs.Load()
	for i := range subs {
		if matchesFilter(subs[i].Topic, topic) {
			return &subs[i]
		}
	}
	return nil
}

// decodeLoop decodes messages in receive order and submits them to the
// buffer without waiting, so that many share a group commit.
func (m *MQTT) decodeLoop() {
	defer close(m.acks)
	for pr := range m.queue {
		p := pr.Packet
		f := &inflight{pr: pr}
		sub := m.subscriptionFor(p.Topic)
		if sub == nil {
			m.in.Reject(IngressMQTT, &Rejection{ReasonMalformed, fmt.Sprintf("topic %q matches no subscription", p.Topic)})
			m.acks <- f
			continue
		}
		sensor, metric := sub.match(p.Topic)
		rs, rej := m.in.Decode(IngressMQTT, sub.Format, p.Payload, sensor, metric)
		if rej != nil {
			m.acks <- f // rejected whole: acknowledged so the broker does not redeliver poison
			continue
		}
		f.msg = buffer.Message{Class: sub.Priority, Readings: rs}
		if p.QoS > 0 {
			f.msg.Key = &buffer.Key{
				Space: IngressMQTT,
				ID:    m.messageKey(p),
				Check: p.Duplicate(),
				Keep:  max(m.opts.ReceiveMaximum, mqttKeysKept),
			}
		}
		f.pending = m.buf.AppendAsync(f.msg)
		m.acks <- f
	}
}

// mqttKeysKept is how many idempotency keys the MQTT ingress keeps. A
// redelivery can come for any message still unacknowledged, and the broker
// decides how many that is: Mosquitto 2.0.11 was seen resending 399 messages
// as in flight to a session whose Receive Maximum was 256, so the window of
// the last Receive Maximum keys that DESIGN.md first named let duplicates in.
// After a restart that is killed in turn, a redelivered message may also sit
// behind another broker window of new ones. 4096 covers twice the 1,000 in
// flight that mosquitto/gateway.conf allows, and stays far below the 65,535
// packet ids a broker cycles through in order, so an old key cannot match a
// new message that repeats an old one's id and bytes.
const mqttKeysKept = 4096

// messageKey is the packet id and a 64-bit hash of topic and payload: within
// the key window, a match on both is the same message.
func (m *MQTT) messageKey(p *paho.Publish) []byte {
	m.hash.Reset()
	io.WriteString(m.hash, p.Topic)
	m.hash.Write([]byte{0})
	m.hash.Write(p.Payload)
	return m.hash.Sum(binary.BigEndian.AppendUint16(make([]byte, 0, 2+sha256.Size), p.PacketID))[:10]
}

// ackLoop waits for each message in receive order and acknowledges it once
// durable (or rejected). A message the buffer has no room for is held,
// unacknowledged, and retried: acknowledging it would lose it, and holding it
// stops the broker sending more once Receive Maximum is reached.
func (m *MQTT) ackLoop() {
	for f := range m.acks {
		stored := f.pending == nil || m.await(f)
		m.in.Release(f.msg.Readings)
		if !stored {
			continue // left for the broker to redeliver
		}
		if err := f.pr.Client.Ack(f.pr.Packet); err != nil && !errors.Is(err, paho.ErrPacketNotFound) {
			m.log.Debug("mqtt ack", "err", err)
		}
	}
}

// await waits until f is durable, retrying while the buffer is full; it
// reports whether f may be acknowledged.
func (m *MQTT) await(f *inflight) bool {
	delay := 10 * time.Millisecond
	held := false
	for {
		res, err := f.pending.Result()
		switch {
		case err == nil:
			if held && m.holding.CompareAndSwap(true, false) {
				m.log.Info("buffer has room again, mqtt ingest resumes")
			}
			if res.Duplicate {
				m.in.Redelivered(IngressMQTT)
			} else {
				m.in.Accepted(IngressMQTT, f.msg.Readings)
			}
			return true
		case errors.Is(err, buffer.ErrTooLarge):
			m.in.Reject(IngressMQTT, &Rejection{ReasonTooLarge, err.Error()})
			return true
		case errors.Is(err, buffer.ErrClosed):
			return false
		}
		// Full, or a write error: hold the message and retry. The stop
		// path leaves it unacknowledged for the next session.
		if !held {
			held = true
			if m.holding.CompareAndSwap(false, true) {
				m.log.Warn("buffer refuses messages, holding them unacknowledged at the broker", "err", err)
			}
			if errors.Is(err, buffer.ErrFull) {
				m.in.Reject(IngressMQTT, &Rejection{ReasonBufferFull, "buffer full, holding the message until there is room"})
			} else {
				m.log.Error("buffer append failed, holding the message", "err", err)
			}
		}
		if m.stopping.Load() {
			return false
		}
		time.Sleep(delay)
		delay = min(2*delay, time.Second)
		f.pending = m.buf.AppendAsync(f.msg)
	}
}

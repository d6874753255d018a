package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"golang.org/x/time/rate"

	"github.com/sluice-gw/sluice/gateway"
)

// connect opens an MQTT v5 session over the gateway's own connection
// (gateway.DialMQTT: buffered reads, coalesced writes), so that the ceiling
// and the load generator pay for the wire what the gateway pays.
func connect(ctx context.Context, addr string, cfg paho.ClientConfig, cp *paho.Connect) (*paho.Client, error) {
	conn, err := gateway.DialMQTT(ctx, nil, &url.URL{Scheme: "mqtt", Host: addr})
	if err != nil {
		return nil, fmt.Errorf("dial broker %s: %w", addr, err)
	}
	cfg.Conn = conn
	c := paho.NewClient(cfg)
	ca, err := c.Connect(ctx, cp)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("connect %s to %s: %w", cp.ClientID, addr, err)
	}
	if ca.ReasonCode != 0 {
		conn.Close()
		return nil, fmt.Errorf("connect %s to %s: reason code %#x", cp.ClientID, addr, ca.ReasonCode)
	}
	return c, nil
}

// PublishOptions tune the load generator.
type PublishOptions struct {
	Addr     string  // broker host:port
	Conns    int     // MQTT connections (default 4)
	InFlight int     // concurrent QoS 1 publishes per connection (default 64; the broker's Receive Maximum may lower it)
	Rate     float64 // messages/s over all connections (0: as fast as the broker acknowledges)
	ClientID string  // prefix of the client ids (default "bench-pub")
}

// Publisher publishes a workload at QoS 1 from several real MQTT clients and
// counts what the broker acknowledged. Its counters are safe to read while
// Run runs.
type Publisher struct {
	opts    PublishOptions
	w       Workload
	next    atomic.Int64 // the next message index to publish
	acked   atomic.Int64
	refused atomic.Int64
}

// NewPublisher prepares a publisher; Run connects.
func NewPublisher(opts PublishOptions, w Workload) *Publisher {
	if opts.Conns <= 0 {
		opts.Conns = 4
	}
	if opts.InFlight <= 0 {
		opts.InFlight = 64
	}
	if opts.ClientID == "" {
		opts.ClientID = "bench-pub"
	}
	return &Publisher{opts: opts, w: w}
}

// Acked is the number of messages the broker acknowledged with success
// (PUBACK below 0x80): from then on they are the broker's to deliver.
func (p *Publisher) Acked() int64 { return p.acked.Load() }

// Refused is the number of messages the broker answered with an error code.
func (p *Publisher) Refused() int64 { return p.refused.Load() }

// Run publishes messages n0 .. n0+n-1 of the workload and returns once each
// has an answer from the broker, or on the first connection error, or when
// ctx is done.
func (p *Publisher) Run(ctx context.Context, n0, n int) error {
	p.next.Store(int64(n0))
	end := int64(n0 + n)
	var lim *rate.Limiter
	if p.opts.Rate > 0 {
		lim = rate.NewLimiter(rate.Limit(p.opts.Rate), max(1, int(p.opts.Rate/100)))
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err })
		cancel()
	}
	for c := range p.opts.Conns {
		cl, err := connect(ctx, p.opts.Addr, paho.ClientConfig{ClientID: fmt.Sprintf("%s-%d", p.opts.ClientID, c)},
			&paho.Connect{ClientID: fmt.Sprintf("%s-%d", p.opts.ClientID, c), KeepAlive: 30, CleanStart: true})
		if err != nil {
			fail(err)
			break
		}
		defer func() {
			_ = cl.Disconnect(&paho.Disconnect{ReasonCode: 0})
		}()
		for range p.opts.InFlight {
			wg.Go(func() {
				var payload []byte
				for {
					i := p.next.Add(1) - 1
					if i >= end || ctx.Err() != nil {
						return
					}
					if lim != nil && lim.Wait(ctx) != nil {
						return
					}
					payload = p.w.AppendPayload(payload[:0], int(i))
					res, err := cl.Publish(ctx, &paho.Publish{QoS: 1, Topic: p.w.Topic(int(i)), Payload: payload})
					switch {
					case err == nil:
						p.acked.Add(1)
					case res != nil && res.ReasonCode >= 0x80:
						p.refused.Add(1)
					default:
						fail(fmt.Errorf("publish message %d: %w", i, err))
						return
					}
				}
			})
		}
	}
	wg.Wait()
	if firstErr == nil && p.next.Load() < end {
		firstErr = ctx.Err()
	}
	return firstErr
}

// SubscriberOptions configure the bare subscriber of the ceiling.
type SubscriberOptions struct {
	Addr           string
	ClientID       string
	Filters        []string // subscribed at QoS 1
	ReceiveMaximum uint16   // as the gateway's (default 256)
	SessionExpiry  time.Duration
}

// Subscriber is the bare MQTT subscriber whose pass-through rate is the
// ceiling of MQTT ingest: paho with the same buffered connection, Receive
// Maximum and persistent session as the gateway, acknowledging each message
// as soon as its handler returns, and doing nothing else.
type Subscriber struct {
	client   *paho.Client
	received atomic.Int64
}

// Subscribe connects and subscribes.
func Subscribe(ctx context.Context, opts SubscriberOptions) (*Subscriber, error) {
	if opts.ReceiveMaximum == 0 {
		opts.ReceiveMaximum = 256
	}
	if opts.SessionExpiry == 0 {
		opts.SessionExpiry = 24 * time.Hour
	}
	s := &Subscriber{}
	expiry := uint32(opts.SessionExpiry / time.Second)
	recvMax := opts.ReceiveMaximum
	cl, err := connect(ctx, opts.Addr, paho.ClientConfig{
		ClientID: opts.ClientID,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(paho.PublishReceived) (bool, error) {
			s.received.Add(1)
			return true, nil
		}},
	}, &paho.Connect{ClientID: opts.ClientID, KeepAlive: 30, CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry, ReceiveMaximum: &recvMax}})
	if err != nil {
		return nil, err
	}
	subs := make([]paho.SubscribeOptions, len(opts.Filters))
	for i, f := range opts.Filters {
		subs[i] = paho.SubscribeOptions{Topic: f, QoS: 1}
	}
	sa, err := cl.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs})
	if err == nil {
		for _, code := range sa.Reasons {
			if code >= 0x80 {
				err = fmt.Errorf("subscription refused: reason code %#x", code)
			}
		}
	}
	if err != nil {
		_ = cl.Disconnect(&paho.Disconnect{})
		return nil, fmt.Errorf("subscribe %v: %w", opts.Filters, err)
	}
	s.client = cl
	return s, nil
}

// Received is the number of messages taken in (and acknowledged) so far.
func (s *Subscriber) Received() int64 { return s.received.Load() }

// Close disconnects and ends the session, so that the broker does not go on
// queueing the next runs' messages for it.
func (s *Subscriber) Close() error {
	var zero uint32
	err := s.client.Disconnect(&paho.Disconnect{Properties: &paho.DisconnectProperties{SessionExpiryInterval: &zero}})
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// EndSession removes a client's persistent session from the broker (a clean
// start with no expiry, then a disconnect), such as a stopped gateway's,
// which would otherwise keep a copy of every later message queued.
func EndSession(ctx context.Context, addr, clientID string) error {
	c, err := connect(ctx, addr, paho.ClientConfig{ClientID: clientID}, &paho.Connect{ClientID: clientID, KeepAlive: 30, CleanStart: true})
	if err != nil {
		return fmt.Errorf("end session %s: %w", clientID, err)
	}
	if err := c.Disconnect(&paho.Disconnect{}); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("end session %s: %w", clientID, err)
	}
	return nil
}

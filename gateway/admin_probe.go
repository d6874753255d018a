package gateway

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"net/url"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

// BrokerProbe is what `sluice doctor` learned from the broker.
type BrokerProbe struct {
	// SessionExpiry is what the broker grants for a session that asks for
	// the configured expiry: less means the gateway's session is at risk.
	SessionExpiry time.Duration
	// Subscriptions are the SUBACK answers, one per configured subscription.
	Subscriptions []SubscriptionGrant
}

// SubscriptionGrant is the broker's answer to one subscription.
type SubscriptionGrant struct {
	Topic string
	QoS   byte // asked for
	Code  byte // SUBACK reason code: 0..2 granted QoS, 0x80 and above refused
}

// Granted reports whether the broker accepted the subscription.
func (g SubscriptionGrant) Granted() bool { return g.Code < 0x80 }

// ProbeBroker connects to the configured broker the way the gateway does
// (same URL, credentials and TLS) but with a throwaway client id and a clean
// start, so the gateway's own session is not touched. It asks for the
// configured session expiry, subscribes to every configured topic (without
// retained messages), checks the SUBACK codes and disconnects with a session
// expiry of zero, which removes the throwaway session from the broker.
func ProbeBroker(ctx context.Context, opts MQTTOptions) (*BrokerProbe, error) {
	opts.setDefaults("doctor")
	u, err := url.Parse(opts.Broker)
	if err != nil {
		return nil, fmt.Errorf("broker %q is not a URL", opts.Broker)
	}
	var tc *tls.Config
	if u.Scheme == "mqtts" {
		if tc, err = tlsConfig(opts.CAFile, opts.CertFile, opts.KeyFile, u.Hostname()); err != nil {
			return nil, err
		}
	}
	conn, err := dialBuffered(ctx, tc, u)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", u.Host, err)
	}
	var id [4]byte
	_, _ = rand.Read(id[:])
	cli := paho.NewClient(paho.ClientConfig{Conn: conn, ClientID: "sluice-doctor-" + hex.EncodeToString(id[:])})
	expiry := uint32(opts.SessionExpiry / time.Second)
	connect := &paho.Connect{
		ClientID: "sluice-doctor-" + hex.EncodeToString(id[:]), CleanStart: true, KeepAlive: 30,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry},
	}
	if opts.Username != "" {
		connect.Username, connect.UsernameFlag = opts.Username, true
	}
	if opts.Password != "" {
		connect.Password, connect.PasswordFlag = []byte(opts.Password), true
	}
	ack, err := cli.Connect(ctx, connect)
	if err != nil {
		_ = conn.Close()
		if ack != nil && ack.ReasonCode >= 0x80 {
			return nil, fmt.Errorf("broker refused the connection (reason code %#x)", ack.ReasonCode)
		}
		return nil, fmt.Errorf("mqtt connect: %w", err)
	}
	p := &BrokerProbe{SessionExpiry: opts.SessionExpiry}
	if ack.Properties != nil && ack.Properties.SessionExpiryInterval != nil {
		p.SessionExpiry = time.Duration(*ack.Properties.SessionExpiryInterval) * time.Second
	}
	zero := uint32(0)
	defer func() {
		_ = cli.Disconnect(&paho.Disconnect{Properties: &paho.DisconnectProperties{SessionExpiryInterval: &zero}})
	}()
	if len(opts.Subscriptions) == 0 {
		return p, nil
	}
	subs := make([]paho.SubscribeOptions, len(opts.Subscriptions))
	for i, s := range opts.Subscriptions {
		subs[i] = paho.SubscribeOptions{Topic: s.Topic, QoS: s.QoS, RetainHandling: 2}
	}
	sa, err := cli.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs})
	if err != nil && (sa == nil || len(sa.Reasons) == 0) {
		return p, fmt.Errorf("subscribe: %w", err)
	}
	for i, s := range subs {
		g := SubscriptionGrant{Topic: s.Topic, QoS: s.QoS, Code: 0x80}
		if i < len(sa.Reasons) {
			g.Code = sa.Reasons[i]
		}
		p.Subscriptions = append(p.Subscriptions, g)
	}
	return p, nil
}

package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
	"os"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"github.com/sluice-gw/sluice/internal/sim"
)

// mqttSender is one simulated sensor's MQTT connection, made on first use
// and made again after it broke.
type mqttSender struct {
	broker string
	topic  string
	qos    byte
	cli    *paho.Client
}

func (m *mqttSender) send(ctx context.Context, r sim.Report, v sim.Value, payload []byte) (bool, error) {
	if m.cli == nil {
		cli, err := dialMQTT(ctx, m.broker, fmt.Sprintf("sim-%s-%d", r.Sensor, os.Getpid()))
		if err != nil {
			return false, err
		}
		m.cli = cli
	}
	_, err := m.cli.Publish(ctx, &paho.Publish{Topic: sim.Topic(m.topic, r.Sensor, v.Metric), QoS: m.qos, Payload: payload})
	if err != nil {
		// A broken connection is made again for the next message; a refusal
		// (a PUBACK reason code) costs nothing to redo either.
		m.close()
		return false, fmt.Errorf("publish %s: %w", r.Sensor, err)
	}
	return m.qos > 0, nil
}

func (m *mqttSender) close() {
	if m.cli != nil {
		_ = m.cli.Disconnect(&paho.Disconnect{})
		m.cli = nil
	}
}

// dialMQTT connects a clean MQTT v5 session to broker (mqtt:// or mqtts://).
func dialMQTT(ctx context.Context, broker, clientID string) (*paho.Client, error) {
	u, err := url.Parse(broker)
	if err != nil {
		return nil, fmt.Errorf("broker %q: %w", broker, err)
	}
	var d net.Dialer
	var conn net.Conn
	switch u.Scheme {
	case "mqtt", "tcp":
		conn, err = d.DialContext(ctx, "tcp", hostPort(u.Host, "1883"))
	case "mqtts", "ssl", "tls":
		td := tls.Dialer{NetDialer: &d, Config: &tls.Config{ServerName: u.Hostname(), MinVersion: tls.VersionTLS12}}
		conn, err = td.DialContext(ctx, "tcp", hostPort(u.Host, "8883"))
	default:
		return nil, fmt.Errorf("broker %q: scheme %q is not mqtt or mqtts", broker, u.Scheme)
	}
	if err != nil {
		return nil, fmt.Errorf("connect to broker %s: %w", u.Host, err)
	}
	cli := paho.NewClient(paho.ClientConfig{Conn: packets.NewThreadSafeConn(conn)})
	ack, err := cli.Connect(ctx, &paho.Connect{ClientID: clientID, CleanStart: true, KeepAlive: 30})
	if err != nil {
		conn.Close()
		if ack != nil {
			return nil, fmt.Errorf("broker %s refused the connection: reason %d %s", u.Host, ack.ReasonCode, ack.Properties.ReasonString)
		}
		return nil, fmt.Errorf("mqtt connect to %s: %w", u.Host, err)
	}
	return cli, nil
}

func hostPort(host, defaultPort string) string {
	if _, _, err := net.SplitHostPort(host); err == nil {
		return host
	}
	return net.JoinHostPort(host, defaultPort)
}

// coapSender is one simulated sensor's CoAP endpoint: confirmable POSTs to
// /s/{sensor}, acknowledged by 2.04 Changed once the gateway stored them.
type coapSender struct {
	addr   string
	format sim.Format
	conn   *udpclient.Conn
}

func (c *coapSender) send(ctx context.Context, r sim.Report, v sim.Value, payload []byte) (bool, error) {
	if c.conn == nil {
		conn, err := udp.Dial(c.addr)
		if err != nil {
			return false, fmt.Errorf("coap dial %s: %w", c.addr, err)
		}
		c.conn = conn
	}
	resp, err := c.conn.Post(ctx, "/s/"+r.Sensor, message.MediaType(c.format.ContentFormat()), bytes.NewReader(payload))
	if err != nil {
		c.close()
		return false, fmt.Errorf("coap post %s: %w", r.Sensor, err)
	}
	defer c.conn.ReleaseMessage(resp)
	switch resp.Code() {
	case codes.Changed, codes.Created:
		return true, nil
	}
	body, _ := resp.ReadBody()
	return false, fmt.Errorf("coap post %s: %s %s", r.Sensor, resp.Code(), bytes.TrimSpace(body))
}

func (c *coapSender) close() {
	if c.conn != nil {
		_ = c.conn.Close()
		select {
		case <-c.conn.Done():
		case <-time.After(time.Second):
		}
		c.conn = nil
	}
}

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpClient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// poster is one load client: a confirmable POST of body to path, answered
// with a response code, or an error after requestTimeout.
type poster interface {
	post(path string, body []byte) (codes.Code, error)
	close()
}

const (
	requestTimeout = 5 * time.Second
	// retransmitAfter is ACK_TIMEOUT (RFC 7252 §4.8), without the random
	// factor: loopback loses a datagram only when a socket buffer overflows.
	retransmitAfter = 2 * time.Second
)

func dial(kind, addr string) (poster, error) {
	switch kind {
	case "raw":
		return dialRaw(addr)
	case "go-coap":
		cc, err := udp.Dial(addr, options.WithErrors(func(error) {}))
		if err != nil {
			return nil, err
		}
		return goCoapClient{cc}, nil
	}
	return nil, fmt.Errorf("-client %q: want raw or go-coap", kind)
}

// goCoapClient is go-coap's own client: goroutines, pools and caches per
// connection, which on two cores take CPU from the server under test.
type goCoapClient struct{ cc *udpClient.Conn }

func (c goCoapClient) post(path string, body []byte) (codes.Code, error) {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	resp, err := c.cc.Post(ctx, path, message.AppSenmlJSON, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	return resp.Code(), nil
}

func (c goCoapClient) close() { _ = c.cc.Close() }

// rawClient speaks just enough CoAP over one UDP socket for the load: a
// confirmable POST, retransmitted once, and its response, piggybacked or
// separate. It costs the machine a fraction of go-coap's client, so that
// more of the two cores is left to the servers being measured.
type rawClient struct {
	conn *net.UDPConn
	mid  uint16
	tok  uint32
	out  []byte
	in   []byte
	opts []byte
}

func dialRaw(addr string) (*rawClient, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	conn, err := net.DialUDP("udp", nil, ua)
	if err != nil {
		return nil, err
	}
	var seed [6]byte
	_, _ = rand.Read(seed[:]) // never fails (crypto/rand)
	return &rawClient{
		conn: conn,
		mid:  binary.BigEndian.Uint16(seed[:2]),
		tok:  binary.BigEndian.Uint32(seed[2:]),
		out:  make([]byte, 2048),
		in:   make([]byte, 2048),
		opts: make([]byte, 256),
	}, nil
}

func (c *rawClient) post(path string, body []byte) (codes.Code, error) {
	c.mid++
	c.tok++
	token := binary.BigEndian.AppendUint32(nil, c.tok)
	var opts message.Options
	opts, n, err := opts.SetPath(c.opts, path)
	if err != nil {
		return 0, err
	}
	opts, _, err = opts.SetContentFormat(c.opts[n:], message.AppSenmlJSON)
	if err != nil {
		return 0, err
	}
	req := message.Message{Token: token, Options: opts, Code: codes.POST, Payload: body, MessageID: int32(c.mid), Type: message.Confirmable}
	size, err := coder.DefaultCoder.Encode(req, c.out)
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(requestTimeout)
	resend := time.Now().Add(retransmitAfter)
	if _, err := c.conn.Write(c.out[:size]); err != nil {
		return 0, err
	}
	acked := false // an empty ACK came: the response follows on its own
	for {
		wake := deadline
		if !acked && resend.Before(wake) {
			wake = resend
		}
		if err := c.conn.SetReadDeadline(wake); err != nil {
			return 0, err
		}
		n, err := c.conn.Read(c.in)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if time.Now().Before(deadline) {
				if _, err := c.conn.Write(c.out[:size]); err != nil {
					return 0, err
				}
				resend = deadline
				continue
			}
			return 0, fmt.Errorf("no response to message %d within %s", c.mid, requestTimeout)
		}
		if err != nil {
			return 0, err
		}
		var resp message.Message
		if _, err := coder.DefaultCoder.Decode(c.in[:n], &resp); err != nil {
			continue // not CoAP: ignore, as a client must
		}
		switch {
		case resp.Type == message.Acknowledgement && resp.MessageID == int32(c.mid) && resp.Code == codes.Empty:
			acked = true
		case resp.Type == message.Acknowledgement && resp.MessageID == int32(c.mid):
			return resp.Code, nil
		case bytes.Equal(resp.Token, token) && resp.Code != codes.Empty:
			if resp.Type == message.Confirmable {
				ack := message.Message{Code: codes.Empty, MessageID: resp.MessageID, Type: message.Acknowledgement}
				if m, err := coder.DefaultCoder.Encode(ack, c.in); err == nil {
					_, _ = c.conn.Write(c.in[:m])
				}
			}
			return resp.Code, nil
		}
	}
}

func (c *rawClient) close() { _ = c.conn.Close() }

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"github.com/sluice-gw/sluice/bench"
)

// The raw subscriber answers one question: how fast can this broker hand
// QoS 1 messages to a client in a process of its own, when the client costs
// next to nothing? It is a minimal MQTT 5 subscriber on one goroutine:
// buffered reads, no allocation per message, PUBACKs written into a buffer
// that is flushed whenever no more input is waiting. If it reaches the
// in-process ceiling, the gap between that ceiling and the processes is the
// clients'; if it does not, it is the broker's and the machine's.
// It is a measuring instrument, not a client for the gateway.

// rawChildFlag makes this binary the raw subscriber (same output protocol as
// the ceiling child: "ready", then its count every 20 ms).
const rawChildFlag = "-raw-subscriber"

func runRawChild(addr, clientID string) {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	var received atomic.Int64
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "raw subscriber:", err)
		os.Exit(1)
	}
	errc := make(chan error, 1)
	subscribed := make(chan struct{})
	go func() { errc <- rawSubscribe(conn, clientID, subscribed, &received) }()
	if err := printCounts(ctx, subscribed, errc, received.Load); err != nil {
		fmt.Fprintln(os.Stderr, "raw subscriber:", err)
		os.Exit(1)
	}
	_, _ = conn.Write([]byte{0xe0, 0}) // DISCONNECT
	conn.Close()
}

// rawSubscribe connects as the gateway does (MQTT 5, no clean start, a
// session that outlives the connection, Receive Maximum 256), subscribes to
// the bench filters at QoS 1, and acknowledges every PUBLISH until the conn
// fails.
func rawSubscribe(conn net.Conn, clientID string, ready chan<- struct{}, received *atomic.Int64) error {
	r := bufio.NewReaderSize(conn, 64<<10)
	w := bufio.NewWriterSize(conn, 16<<10)
	// CONNECT: protocol "MQTT" level 5, flags: clean start off; keep alive
	// off; properties: session expiry 1 hour, Receive Maximum 256.
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 5, 0, 0, 0, 8, 0x11, 0, 0, 0x0e, 0x10, 0x21, 1, 0}
	body = appendString(body, clientID)
	writePacket(w, 0x10, body)
	// SUBSCRIBE, packet id 1, no properties.
	body = []byte{0, 1, 0}
	for _, f := range []string{bench.FlatFilter, bench.SenMLFilter} {
		body = append(appendString(body, f), 1)
	}
	writePacket(w, 0x82, body)
	if err := w.Flush(); err != nil {
		return fmt.Errorf("send CONNECT and SUBSCRIBE: %w", err)
	}
	buf := make([]byte, 0, 4096)
	puback := []byte{0x40, 2, 0, 0}
	for {
		kind, n, err := readHeader(r)
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		if _, err := io.ReadFull(r, buf); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		switch kind >> 4 {
		case 2: // CONNACK
			if n < 2 || buf[1] != 0 {
				return fmt.Errorf("CONNACK refused: % x", buf)
			}
		case 9: // SUBACK: packet id, properties, a reason code per filter
			if n < 3 {
				return fmt.Errorf("SUBACK of %d bytes", n)
			}
			codes, err := skipProperties(buf[2:])
			if err != nil {
				return fmt.Errorf("SUBACK: %w", err)
			}
			for _, code := range codes {
				if code != 1 {
					return fmt.Errorf("SUBACK code %#x", code)
				}
			}
			close(ready)
		case 3: // PUBLISH
			if kind&0x06 != 0x02 {
				return fmt.Errorf("PUBLISH at QoS %d", (kind>>1)&3)
			}
			if len(buf) < 2 {
				return fmt.Errorf("PUBLISH of %d bytes", len(buf))
			}
			tl := int(binary.BigEndian.Uint16(buf))
			if len(buf) < 4+tl {
				return fmt.Errorf("PUBLISH of %d bytes with a topic of %d", len(buf), tl)
			}
			copy(puback[2:], buf[2+tl:4+tl]) // the packet id
			received.Add(1)
			w.Write(puback)
		default:
			return fmt.Errorf("unexpected packet type %d", kind>>4)
		}
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return fmt.Errorf("send PUBACKs: %w", err)
			}
		}
	}
}

// skipProperties returns what follows an MQTT 5 property list at the start of b.
func skipProperties(b []byte) ([]byte, error) {
	r := bytes.NewReader(b)
	n, err := readVarint(r)
	if err != nil {
		return nil, fmt.Errorf("property length: %w", err)
	}
	if n > r.Len() {
		return nil, errors.New("property length past the packet")
	}
	return b[len(b)-r.Len()+n:], nil
}

func appendString(b []byte, s string) []byte {
	return append(binary.BigEndian.AppendUint16(b, uint16(len(s))), s...)
}

func writePacket(w *bufio.Writer, kind byte, body []byte) {
	w.WriteByte(kind)
	n := len(body)
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		w.WriteByte(d)
		if n == 0 {
			break
		}
	}
	w.Write(body)
}

func readHeader(r *bufio.Reader) (kind byte, n int, err error) {
	kind, err = r.ReadByte()
	if err != nil {
		return 0, 0, err
	}
	n, err = readVarint(r)
	if err != nil {
		return 0, 0, err
	}
	return kind, n, nil
}

// readVarint reads an MQTT variable byte integer (at most four bytes).
func readVarint(r io.ByteReader) (int, error) {
	n := 0
	for shift := 0; shift < 28; shift += 7 {
		d, err := r.ReadByte()
		if err != nil {
			return 0, err
		}
		n |= int(d&0x7f) << shift
		if d&0x80 == 0 {
			return n, nil
		}
	}
	return 0, errors.New("malformed variable byte integer")
}

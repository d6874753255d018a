package main

import (
	"bufio"
	"bytes"
	"testing"
)

func TestRawHeader(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		kind byte
		n    int
		ok   bool
	}{
		{"one length byte", []byte{0x32, 0x7f}, 0x32, 127, true},
		{"two length bytes", []byte{0x30, 0x80, 0x01}, 0x30, 128, true},
		{"four length bytes", []byte{0x30, 0xff, 0xff, 0xff, 0x7f}, 0x30, 268_435_455, true},
		{"five length bytes", []byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x01}, 0, 0, false},
		{"cut in the length", []byte{0x30, 0x80}, 0, 0, false},
		{"empty", nil, 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, n, err := readHeader(bufio.NewReader(bytes.NewReader(tc.in)))
			if (err == nil) != tc.ok || kind != tc.kind || n != tc.n {
				t.Fatalf("readHeader(% x) = %#x, %d, %v; want %#x, %d, ok %v", tc.in, kind, n, err, tc.kind, tc.n, tc.ok)
			}
		})
	}
}

func TestRawSkipProperties(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		rest []byte
		ok   bool
	}{
		{"none", []byte{0, 1, 1}, []byte{1, 1}, true},
		{"a reason string", []byte{4, 0x1f, 0, 1, 'x', 0x80}, []byte{0x80}, true},
		{"past the packet", []byte{5, 0x1f, 0, 1, 'x'}, nil, false},
		{"cut in the length", []byte{0x80}, nil, false},
		{"empty", nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rest, err := skipProperties(tc.in)
			if (err == nil) != tc.ok || !bytes.Equal(rest, tc.rest) {
				t.Fatalf("skipProperties(% x) = % x, %v; want % x, ok %v", tc.in, rest, err, tc.rest, tc.ok)
			}
		})
	}
}

// TestRawPacketRoundTrip checks writePacket's length encoding against readHeader.
func TestRawPacketRoundTrip(t *testing.T) {
	for _, size := range []int{0, 1, 127, 128, 16_383, 16_384, 70_000} {
		var b bytes.Buffer
		w := bufio.NewWriter(&b)
		writePacket(w, 0x82, make([]byte, size))
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		r := bufio.NewReader(&b)
		kind, n, err := readHeader(r)
		if left := r.Buffered() + b.Len(); err != nil || kind != 0x82 || n != size || left != size {
			t.Fatalf("size %d: read back %#x, %d, %v with %d bytes left", size, kind, n, err, left)
		}
	}
}

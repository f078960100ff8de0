package vsock

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
)

func FuzzDecodeHeader(f *testing.F) {
	h := Header{SrcCID: 3, DstCID: 2, SrcPort: 1024, DstPort: 5000, Len: 12, Type: TypeStream, Op: OpRW, BufAlloc: 1 << 18, FwdCnt: 77}
	b := make([]byte, HeaderLen)
	h.Encode(b)
	f.Add(b)
	f.Add(b[:10])
	f.Add(bytes.Repeat([]byte{0xff}, HeaderLen+3))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeHeader(b)
		if err != nil {
			return
		}
		if h.Len > MaxPayload {
			t.Fatalf("accepted payload length %d", h.Len)
		}
		out := make([]byte, HeaderLen)
		h.Encode(out)
		if !bytes.Equal(out, b[:HeaderLen]) {
			t.Fatalf("decode/encode round trip changed %x into %x", b[:HeaderLen], out)
		}
	})
}

func FuzzParseConnect(f *testing.F) {
	for _, s := range []string{"CONNECT 1234\n", "CONNECT 0\n", "CONNECT 4294967295\n", "CONNECT 4294967296\n",
		"CONNECT 12\r\n", "CONNECT +1\n", "CONNECT 01\n", "connect 1\n", "CONNECT  1\n", "CONNECT 1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		port, err := ParseConnect(line)
		if err != nil {
			return
		}
		canon := fmt.Sprintf("CONNECT %d\n", port)
		if line != canon && line != strings.TrimSuffix(canon, "\n")+"\r\n" {
			t.Fatalf("accepted %q as port %d (canonical %q)", line, port, canon)
		}
	})
}

func TestParseConnect(t *testing.T) {
	tests := []struct {
		line string
		port uint32
		ok   bool
	}{
		{"CONNECT 1234\n", 1234, true},
		{"CONNECT 0\n", 0, true},
		{"CONNECT 4294967295\n", 4294967295, true},
		{"CONNECT 52\r\n", 52, true},
		{"CONNECT 4294967296\n", 0, false},
		{"CONNECT 1234", 0, false},
		{"CONNECT +1\n", 0, false},
		{"CONNECT 01\n", 0, false},
		{"CONNECT \n", 0, false},
		{"connect 1\n", 0, false},
		{"CONNECT 1 2\n", 0, false},
	}
	for _, tt := range tests {
		port, err := ParseConnect(tt.line)
		if (err == nil) != tt.ok || port != tt.port {
			t.Errorf("ParseConnect(%q) = %d, %v; want %d, ok=%v", tt.line, port, err, tt.port, tt.ok)
		}
	}
}

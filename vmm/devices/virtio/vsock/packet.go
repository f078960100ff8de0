package vsock

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
)

// HeaderLen is the size of struct virtio_vsock_hdr.
const HeaderLen = 44

// Packet types and operations (virtio 1.x §5.10.6).
const (
	TypeStream = 1

	OpInvalid       = 0
	OpRequest       = 1
	OpResponse      = 2
	OpRst           = 3
	OpShutdown      = 4
	OpRW            = 5
	OpCreditUpdate  = 6
	OpCreditRequest = 7

	// Shutdown flags: the sender will receive / send no more data.
	ShutdownRcv  = 1
	ShutdownSend = 2
)

// Well-known CIDs.
const (
	HostCID         = 2
	DefaultGuestCID = 3
)

// MaxPayload bounds one packet's payload (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
const MaxPayload = 64 << 10

// Header is a decoded virtio_vsock_hdr.
type Header struct {
	SrcCID   uint64
	DstCID   uint64
	SrcPort  uint32
	DstPort  uint32
	Len      uint32
	Type     uint16
	Op       uint16
	Flags    uint32
	BufAlloc uint32
	FwdCnt   uint32
}

// DecodeHeader parses a packet header. It checks only what every packet
// must satisfy (size, payload bound); the protocol checks are the caller's.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, fmt.Errorf("vsock: packet header is %d bytes, want %d", len(b), HeaderLen)
	}
	le := binary.LittleEndian
	h := Header{
		SrcCID:   le.Uint64(b[0:]),
		DstCID:   le.Uint64(b[8:]),
		SrcPort:  le.Uint32(b[16:]),
		DstPort:  le.Uint32(b[20:]),
		Len:      le.Uint32(b[24:]),
		Type:     le.Uint16(b[28:]),
		Op:       le.Uint16(b[30:]),
		Flags:    le.Uint32(b[32:]),
		BufAlloc: le.Uint32(b[36:]),
		FwdCnt:   le.Uint32(b[40:]),
	}
	if h.Len > MaxPayload {
		return h, fmt.Errorf("vsock: packet payload length %d exceeds %d", h.Len, MaxPayload)
	}
	return h, nil
}

// Encode writes h into b, which must be at least HeaderLen bytes.
func (h *Header) Encode(b []byte) {
	le := binary.LittleEndian
	le.PutUint64(b[0:], h.SrcCID)
	le.PutUint64(b[8:], h.DstCID)
	le.PutUint32(b[16:], h.SrcPort)
	le.PutUint32(b[20:], h.DstPort)
	le.PutUint32(b[24:], h.Len)
	le.PutUint16(b[28:], h.Type)
	le.PutUint16(b[30:], h.Op)
	le.PutUint32(b[32:], h.Flags)
	le.PutUint32(b[36:], h.BufAlloc)
	le.PutUint32(b[40:], h.FwdCnt)
}

// MaxConnectLine bounds the hybrid handshake line, newline included.
const MaxConnectLine = len("CONNECT 4294967295\r\n")

// ParseConnect parses the hybrid-vsock handshake line "CONNECT <port>\n"
// that a host client sends on the device's Unix socket. The port is a
// decimal uint32 without sign or leading zeros; a trailing "\r" is
// tolerated for clients that send CRLF.
func ParseConnect(line string) (uint32, error) {
	rest, ok := strings.CutPrefix(line, "CONNECT ")
	if !ok {
		return 0, fmt.Errorf("handshake %q does not start with \"CONNECT \"", line)
	}
	rest, ok = strings.CutSuffix(rest, "\n")
	if !ok {
		return 0, fmt.Errorf("handshake %q is not terminated by a newline", line)
	}
	rest = strings.TrimSuffix(rest, "\r")
	if rest == "" || rest[0] < '0' || rest[0] > '9' || (len(rest) > 1 && rest[0] == '0') {
		return 0, fmt.Errorf("handshake %q: port is not a plain decimal number", line)
	}
	p, err := strconv.ParseUint(rest, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("handshake %q: bad port: %w", line, err)
	}
	return uint32(p), nil
}

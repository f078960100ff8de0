package dsm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// Wire format (docs/dsm.md): every frame is a 20-byte header followed by
// Length payload bytes. All integers are big-endian.
//
//	magic   uint32  "HVMD"
//	version uint8   3
//	type    uint8   MsgType
//	flags   uint16  reserved, must be 0
//	length  uint32  payload bytes (<= MaxPayload)
//	reqID   uint64  request id; replies carry the request's id
const (
	Magic      = 0x48564D44 // "HVMD"
	Version    = 3
	HeaderSize = 20
	PageSize   = 4096
	// MaxSlices bounds a VM's slices (a directory copyset is a 64-bit set).
	MaxSlices = 64
	// MaxPayload: the largest payload, a replica's content with its
	// source's update counts (FlagSeen).
	MaxPayload  = pagePayloadSize + PageSize + 1 + 8*MaxSlices
	NonceSize   = 32
	MACSize     = 32
	MaxVMIDLen  = 128
	MaxErrorLen = 1024

	pagePayloadSize = 9  // page number + flags
	ioReqSize       = 15 // address, vCPU, space, flags, size, count

	// MaxIOData bounds the data of one forwarded access: KVM hands a
	// string port access over in (at most) one page.
	MaxIOData = PageSize
)

// MsgType identifies a frame.
type MsgType uint8

// Message types. Handshake messages may only appear before Welcome; all
// others only after.
const (
	MsgHello       MsgType = 1  // dialer: slice ids, VM id, nonce
	MsgChallenge   MsgType = 2  // acceptor: nonce, HMAC proof
	MsgProof       MsgType = 3  // dialer: HMAC proof
	MsgWelcome     MsgType = 4  // acceptor: authenticated
	MsgError       MsgType = 5  // code + text; the sender closes the connection
	MsgHeartbeat   MsgType = 6  // liveness, sent periodically
	MsgReadReq     MsgType = 16 // requester -> home: want a shared copy
	MsgWriteReq    MsgType = 17 // requester -> home: want exclusive ownership
	MsgFetch       MsgType = 18 // home -> holder (forwarded request): downgrade to shared, send a copy
	MsgFetchReply  MsgType = 19 // holder -> home: page data
	MsgInvalidate  MsgType = 20 // home -> holder: drop your copy (send it if WantData)
	MsgInvAck      MsgType = 21 // holder -> home: dropped (with data if asked)
	MsgGrant       MsgType = 22 // home -> requester: access granted (with data if needed)
	MsgReplicaReq  MsgType = 23 // requester -> home: want a writable replica of a page-table page
	MsgUpdate      MsgType = 24 // replica holder -> the other slices: words it changed in a replica
	MsgDeps        MsgType = 25 // -> a slice: apply these counts of other slices' updates before reading on
	MsgShutdown    MsgType = 33 // slice 0 -> all: stop the VM
	MsgShutdownAck MsgType = 34 // slice -> slice 0: stopping, will not need pages
	MsgIOReq       MsgType = 40 // slice -> slice 0: a vCPU's port I/O or MMIO access, for the home's devices
	MsgIOReply     MsgType = 41 // slice 0 -> slice: access done (with the data read)
	MsgInterrupt   MsgType = 42 // -> the slice running a vCPU: an interrupt message for its local APIC
	MsgEOI         MsgType = 43 // -> slice 0: a level-triggered vector was EOIed (IOAPIC remote IRR)
	MsgAPICState   MsgType = 44 // -> every slice: a local APIC's ID/LDR/DFR changed
	MsgClockReq    MsgType = 45 // slice -> slice 0: what time is it (guest TSC reference)?
	MsgClockReply  MsgType = 46 // slice 0 -> slice: its monotonic clock and the guest TSC epoch
)

var typeNames = map[MsgType]string{
	MsgHello: "hello", MsgChallenge: "challenge", MsgProof: "proof", MsgWelcome: "welcome",
	MsgError: "error", MsgHeartbeat: "heartbeat", MsgReadReq: "read-req", MsgWriteReq: "write-req",
	MsgFetch: "fetch", MsgFetchReply: "fetch-reply", MsgInvalidate: "invalidate", MsgInvAck: "inv-ack",
	MsgGrant: "grant", MsgReplicaReq: "replica-req", MsgUpdate: "update", MsgDeps: "deps", MsgShutdown: "shutdown", MsgShutdownAck: "shutdown-ack",
	MsgIOReq: "io-req", MsgIOReply: "io-reply", MsgInterrupt: "interrupt", MsgEOI: "eoi", MsgAPICState: "apic-state",
	MsgClockReq: "clock-req", MsgClockReply: "clock-reply",
}

func (t MsgType) String() string {
	if s, ok := typeNames[t]; ok {
		return s
	}
	return fmt.Sprintf("type-%d", uint8(t))
}

// PageFlags qualify page messages.
type PageFlags uint8

const (
	FlagExclusive PageFlags = 1 << 0 // Grant: writable ownership (else shared)
	FlagData      PageFlags = 1 << 1 // PageSize bytes of page data follow
	FlagZero      PageFlags = 1 << 2 // the page's content is all zeros (no bytes follow)
	FlagWantData  PageFlags = 1 << 3 // Invalidate: reply with the content
	// FlagReplica on a Grant makes the copy a writable replica; on a
	// Fetch it asks the holder to turn its copy into one (docs/dsm.md,
	// "Replicated page tables").
	FlagReplica PageFlags = 1 << 4
	// FlagSeen on a replica's content (fetch-reply, grant): Seen follows,
	// how many update frames of each slice the content includes.
	FlagSeen PageFlags = 1 << 5

	knownPageFlags = FlagExclusive | FlagData | FlagZero | FlagWantData | FlagReplica | FlagSeen
)

// HasContent reports whether the message carries page content (bytes or
// the zero marker).
func (f PageFlags) HasContent() bool { return f&(FlagData|FlagZero) != 0 }

// IOSpace says which address space a forwarded access is in.
type IOSpace uint8

const (
	SpacePort IOSpace = 0 // port I/O: Addr is the port
	SpaceMMIO IOSpace = 1 // MMIO: Addr is a guest-physical address outside RAM
)

// Msg is a decoded frame. Which fields are meaningful depends on Type.
type Msg struct {
	Type  MsgType
	ReqID uint64

	// Page messages (ReadReq..Grant).
	Page  uint64 // guest page frame number (guest-physical address / PageSize)
	Flags PageFlags
	// Data: PageSize bytes of a page message with FlagData; the bytes
	// written by an IOReq write; the bytes read in an IOReply.
	Data []byte

	// IOReq: vCPU VCPU's access of Count elements of Size bytes at Addr.
	Addr    uint64
	VCPU    uint16 // also: Interrupt's target vCPU, APICState's vCPU
	Space   IOSpace
	IOWrite bool
	Size    uint8
	Count   uint16

	// Interrupt (to vCPU VCPU), EOI (Vector only).
	Vector uint8
	Mode   uint8 // delivery mode (irqchip.DeliveryMode)
	Level  bool  // level-triggered
	Assert bool

	// APICState of vCPU VCPU: APIC ID, logical ID (LDR[31:24]), DFR
	// model (DFR[31:28]).
	APICID, LDR, DFR uint8

	// ClockReply: slice 0's CLOCK_MONOTONIC (ns) when it answered, and
	// the instant on that clock at which the guest TSC is 0.
	Clock, Epoch uint64

	// Hello / Challenge / Proof.
	From, To uint16
	VMID     string
	Nonce    [NonceSize]byte
	MAC      [MACSize]byte

	// Error, Shutdown.
	Code uint16
	Text string

	// Update: the words of replica Page its sender changed.
	Words []WordUpdate

	// Seen, on Deps and on page messages with FlagSeen: a count of update
	// frames per slice (index: slice id), 1..MaxSlices entries.
	Seen []uint64
}

// WordUpdate is one changed 8-byte word of a replicated page: its index
// in the page, the value the change was based on, and the new value.
type WordUpdate struct {
	Index    uint16
	Old, New uint64
}

const (
	wordUpdateSize = 18 // index, old, new
	updateHeadSize = 10 // page, count
	// MaxUpdateWords is how many words one Update frame carries; a
	// larger diff is sent as several frames, in order.
	MaxUpdateWords = 227
	wordsPerPage   = PageSize / 8
)

func isPageMsg(t MsgType) bool { return t >= MsgReadReq && t <= MsgReplicaReq }

// AppendFrame appends m's encoding to b.
func AppendFrame(b []byte, m *Msg) ([]byte, error) {
	start := len(b)
	b = binary.BigEndian.AppendUint32(b, Magic)
	b = append(b, Version, byte(m.Type), 0, 0)
	b = binary.BigEndian.AppendUint32(b, 0) // length, patched below
	b = binary.BigEndian.AppendUint64(b, m.ReqID)
	switch {
	case isPageMsg(m.Type):
		if m.Flags&^knownPageFlags != 0 || m.Flags&FlagData != 0 && m.Flags&FlagZero != 0 {
			return nil, fmt.Errorf("dsm: %v with invalid flags %#x", m.Type, m.Flags)
		}
		b = binary.BigEndian.AppendUint64(b, m.Page)
		b = append(b, byte(m.Flags))
		if m.Flags&FlagData != 0 {
			if len(m.Data) != PageSize {
				return nil, fmt.Errorf("dsm: %v carries %d data bytes, want %d", m.Type, len(m.Data), PageSize)
			}
			b = append(b, m.Data...)
		}
		if m.Flags&FlagSeen != 0 {
			var err error
			if b, err = appendSeen(b, m); err != nil {
				return nil, err
			}
		}
	case m.Type == MsgDeps:
		var err error
		if b, err = appendSeen(b, m); err != nil {
			return nil, err
		}
	case m.Type == MsgHello:
		if len(m.VMID) == 0 || len(m.VMID) > MaxVMIDLen {
			return nil, fmt.Errorf("dsm: VM id of %d bytes (want 1..%d)", len(m.VMID), MaxVMIDLen)
		}
		b = binary.BigEndian.AppendUint16(b, m.From)
		b = binary.BigEndian.AppendUint16(b, m.To)
		b = append(b, m.Nonce[:]...)
		b = append(b, byte(len(m.VMID)))
		b = append(b, m.VMID...)
	case m.Type == MsgChallenge:
		b = append(b, m.Nonce[:]...)
		b = append(b, m.MAC[:]...)
	case m.Type == MsgProof:
		b = append(b, m.MAC[:]...)
	case m.Type == MsgError || m.Type == MsgShutdown:
		text := m.Text
		if len(text) > MaxErrorLen {
			text = text[:MaxErrorLen]
		}
		b = binary.BigEndian.AppendUint16(b, m.Code)
		b = binary.BigEndian.AppendUint16(b, uint16(len(text)))
		b = append(b, text...)
	case m.Type == MsgIOReq:
		if err := checkIOReq(m); err != nil {
			return nil, fmt.Errorf("dsm: encoding: %w", err)
		}
		b = binary.BigEndian.AppendUint64(b, m.Addr)
		b = binary.BigEndian.AppendUint16(b, m.VCPU)
		var fl byte
		if m.IOWrite {
			fl = 1
		}
		b = append(b, byte(m.Space), fl, m.Size)
		b = binary.BigEndian.AppendUint16(b, m.Count)
		b = append(b, m.Data...)
	case m.Type == MsgIOReply:
		if len(m.Data) > MaxIOData {
			return nil, fmt.Errorf("dsm: io-reply with %d data bytes (at most %d)", len(m.Data), MaxIOData)
		}
		b = append(b, m.Data...)
	case m.Type == MsgInterrupt:
		if m.Mode > 7 || m.Mode == 3 {
			return nil, fmt.Errorf("dsm: interrupt with delivery mode %d", m.Mode)
		}
		var fl byte
		if m.Level {
			fl |= 1
		}
		if m.Assert {
			fl |= 2
		}
		b = binary.BigEndian.AppendUint16(b, m.VCPU)
		b = append(b, m.Vector, m.Mode, fl)
	case m.Type == MsgEOI:
		b = append(b, m.Vector)
	case m.Type == MsgAPICState:
		if m.DFR > 0xF {
			return nil, fmt.Errorf("dsm: apic-state with DFR model %#x", m.DFR)
		}
		b = binary.BigEndian.AppendUint16(b, m.VCPU)
		b = append(b, m.APICID, m.LDR, m.DFR)
	case m.Type == MsgUpdate:
		if len(m.Words) == 0 || len(m.Words) > MaxUpdateWords {
			return nil, fmt.Errorf("dsm: update of %d words (1..%d)", len(m.Words), MaxUpdateWords)
		}
		b = binary.BigEndian.AppendUint64(b, m.Page)
		b = binary.BigEndian.AppendUint16(b, uint16(len(m.Words)))
		for _, w := range m.Words {
			if w.Index >= wordsPerPage {
				return nil, fmt.Errorf("dsm: update of word %d (a page has %d)", w.Index, wordsPerPage)
			}
			b = binary.BigEndian.AppendUint16(b, w.Index)
			b = binary.BigEndian.AppendUint64(b, w.Old)
			b = binary.BigEndian.AppendUint64(b, w.New)
		}
	case m.Type == MsgClockReply:
		b = binary.BigEndian.AppendUint64(b, m.Clock)
		b = binary.BigEndian.AppendUint64(b, m.Epoch)
	case m.Type == MsgWelcome || m.Type == MsgHeartbeat || m.Type == MsgShutdownAck || m.Type == MsgClockReq:
	default:
		return nil, fmt.Errorf("dsm: cannot encode message type %v", m.Type)
	}
	binary.BigEndian.PutUint32(b[start+8:], uint32(len(b)-start-HeaderSize))
	return b, nil
}

func appendSeen(b []byte, m *Msg) ([]byte, error) {
	if len(m.Seen) == 0 || len(m.Seen) > MaxSlices {
		return nil, fmt.Errorf("dsm: %v with %d update counts (1..%d)", m.Type, len(m.Seen), MaxSlices)
	}
	b = append(b, byte(len(m.Seen)))
	for _, c := range m.Seen {
		b = binary.BigEndian.AppendUint64(b, c)
	}
	return b, nil
}

// decodeSeen decodes a count byte and that many u64 update counts, which
// must fill p.
func decodeSeen(t MsgType, p []byte) ([]uint64, error) {
	if len(p) < 1 {
		return nil, protoErr("%v without update counts", t)
	}
	n := int(p[0])
	if n == 0 || n > MaxSlices || len(p) != 1+8*n {
		return nil, protoErr("%v with %d update counts in %d bytes", t, n, len(p))
	}
	seen := make([]uint64, n)
	for i := range seen {
		seen[i] = binary.BigEndian.Uint64(p[1+8*i:])
	}
	return seen, nil
}

// checkIOReq validates a forwarded access: a known space, an access width
// the space allows, one element for MMIO, at most MaxIOData bytes, a port
// number for port I/O, and data exactly for writes.
func checkIOReq(m *Msg) error {
	n := int(m.Size) * int(m.Count)
	switch m.Space {
	case SpacePort:
		if m.Size != 1 && m.Size != 2 && m.Size != 4 {
			return fmt.Errorf("io-req: port access of %d bytes", m.Size)
		}
		if m.Addr > 0xFFFF {
			return fmt.Errorf("io-req: port %#x out of range", m.Addr)
		}
	case SpaceMMIO:
		if m.Size != 1 && m.Size != 2 && m.Size != 4 && m.Size != 8 {
			return fmt.Errorf("io-req: MMIO access of %d bytes", m.Size)
		}
		if m.Count != 1 {
			return fmt.Errorf("io-req: MMIO access of %d elements", m.Count)
		}
	default:
		return fmt.Errorf("io-req: unknown address space %d", m.Space)
	}
	if m.Count == 0 || n > MaxIOData {
		return fmt.Errorf("io-req: %d elements of %d bytes (1..%d bytes in all)", m.Count, m.Size, MaxIOData)
	}
	want := 0
	if m.IOWrite {
		want = n
	}
	if len(m.Data) != want {
		return fmt.Errorf("io-req: %d data bytes for a %d-byte %s", len(m.Data), n, map[bool]string{true: "write", false: "read"}[m.IOWrite])
	}
	return nil
}

// ErrProtocol wraps every decoding failure.
var ErrProtocol = errors.New("dsm: protocol error")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}

// parseHeader validates a frame header and returns its type, payload
// length and request id.
func parseHeader(h []byte) (MsgType, int, uint64, error) {
	if len(h) < HeaderSize {
		return 0, 0, 0, protoErr("short header (%d bytes)", len(h))
	}
	if m := binary.BigEndian.Uint32(h); m != Magic {
		return 0, 0, 0, protoErr("bad magic %#x", m)
	}
	if h[4] != Version {
		return 0, 0, 0, protoErr("unsupported version %d (want %d)", h[4], Version)
	}
	if f := binary.BigEndian.Uint16(h[6:]); f != 0 {
		return 0, 0, 0, protoErr("reserved header flags %#x set", f)
	}
	n := binary.BigEndian.Uint32(h[8:])
	if n > MaxPayload {
		return 0, 0, 0, protoErr("payload of %d bytes exceeds %d", n, MaxPayload)
	}
	return MsgType(h[5]), int(n), binary.BigEndian.Uint64(h[12:]), nil
}

// DecodeFrame decodes exactly one frame occupying all of b.
func DecodeFrame(b []byte) (Msg, error) {
	t, n, id, err := parseHeader(b)
	if err != nil {
		return Msg{}, err
	}
	if len(b) != HeaderSize+n {
		return Msg{}, protoErr("frame is %d bytes, header says %d", len(b), HeaderSize+n)
	}
	return decodePayload(t, id, b[HeaderSize:])
}

func decodePayload(t MsgType, id uint64, p []byte) (Msg, error) {
	m := Msg{Type: t, ReqID: id}
	switch {
	case isPageMsg(t):
		if len(p) < pagePayloadSize {
			return Msg{}, protoErr("%v payload of %d bytes", t, len(p))
		}
		m.Page = binary.BigEndian.Uint64(p)
		m.Flags = PageFlags(p[8])
		if m.Flags&^knownPageFlags != 0 {
			return Msg{}, protoErr("%v with unknown flags %#x", t, m.Flags)
		}
		want := pagePayloadSize
		if m.Flags&FlagData != 0 {
			if m.Flags&FlagZero != 0 {
				return Msg{}, protoErr("%v with both data and zero flags", t)
			}
			want += PageSize
			if len(p) < want {
				return Msg{}, protoErr("%v payload of %d bytes, want %d", t, len(p), want)
			}
			m.Data = p[pagePayloadSize:want]
		}
		if m.Flags&FlagSeen != 0 {
			seen, err := decodeSeen(t, p[min(want, len(p)):])
			if err != nil {
				return Msg{}, err
			}
			m.Seen = seen
		} else if len(p) != want {
			return Msg{}, protoErr("%v payload of %d bytes, want %d", t, len(p), want)
		}
	case t == MsgHello:
		if len(p) < 4+NonceSize+1 {
			return Msg{}, protoErr("hello payload of %d bytes", len(p))
		}
		m.From = binary.BigEndian.Uint16(p)
		m.To = binary.BigEndian.Uint16(p[2:])
		copy(m.Nonce[:], p[4:])
		l := int(p[4+NonceSize])
		rest := p[5+NonceSize:]
		if l == 0 || l > MaxVMIDLen || len(rest) != l {
			return Msg{}, protoErr("hello with VM id length %d and %d bytes left", l, len(rest))
		}
		m.VMID = string(rest)
	case t == MsgChallenge:
		if len(p) != NonceSize+MACSize {
			return Msg{}, protoErr("challenge payload of %d bytes", len(p))
		}
		copy(m.Nonce[:], p)
		copy(m.MAC[:], p[NonceSize:])
	case t == MsgProof:
		if len(p) != MACSize {
			return Msg{}, protoErr("proof payload of %d bytes", len(p))
		}
		copy(m.MAC[:], p)
	case t == MsgError || t == MsgShutdown:
		if len(p) < 4 {
			return Msg{}, protoErr("%v payload of %d bytes", t, len(p))
		}
		m.Code = binary.BigEndian.Uint16(p)
		l := int(binary.BigEndian.Uint16(p[2:]))
		if l > MaxErrorLen || len(p) != 4+l {
			return Msg{}, protoErr("%v text length %d with %d bytes left", t, l, len(p)-4)
		}
		if !utf8.Valid(p[4:]) {
			return Msg{}, protoErr("%v text is not UTF-8", t)
		}
		m.Text = string(p[4:])
	case t == MsgIOReq:
		if len(p) < ioReqSize {
			return Msg{}, protoErr("io-req payload of %d bytes", len(p))
		}
		m.Addr = binary.BigEndian.Uint64(p)
		m.VCPU = binary.BigEndian.Uint16(p[8:])
		m.Space = IOSpace(p[10])
		if p[11]&^1 != 0 {
			return Msg{}, protoErr("io-req with unknown flags %#x", p[11])
		}
		m.IOWrite = p[11]&1 != 0
		m.Size = p[12]
		m.Count = binary.BigEndian.Uint16(p[13:])
		if len(p) > ioReqSize {
			m.Data = p[ioReqSize:]
		}
		if err := checkIOReq(&m); err != nil {
			return Msg{}, fmt.Errorf("%w: %v", ErrProtocol, err)
		}
	case t == MsgIOReply:
		if len(p) > MaxIOData {
			return Msg{}, protoErr("io-reply with %d data bytes", len(p))
		}
		if len(p) > 0 {
			m.Data = p
		}
	case t == MsgInterrupt:
		if len(p) != 5 {
			return Msg{}, protoErr("interrupt payload of %d bytes", len(p))
		}
		m.VCPU = binary.BigEndian.Uint16(p)
		m.Vector, m.Mode = p[2], p[3]
		if m.Mode > 7 || m.Mode == 3 {
			return Msg{}, protoErr("interrupt with delivery mode %d", m.Mode)
		}
		if p[4]&^3 != 0 {
			return Msg{}, protoErr("interrupt with unknown flags %#x", p[4])
		}
		m.Level, m.Assert = p[4]&1 != 0, p[4]&2 != 0
	case t == MsgEOI:
		if len(p) != 1 {
			return Msg{}, protoErr("eoi payload of %d bytes", len(p))
		}
		m.Vector = p[0]
	case t == MsgAPICState:
		if len(p) != 5 {
			return Msg{}, protoErr("apic-state payload of %d bytes", len(p))
		}
		m.VCPU = binary.BigEndian.Uint16(p)
		m.APICID, m.LDR, m.DFR = p[2], p[3], p[4]
		if m.DFR > 0xF {
			return Msg{}, protoErr("apic-state with DFR model %#x", m.DFR)
		}
	case t == MsgUpdate:
		if len(p) < updateHeadSize {
			return Msg{}, protoErr("update payload of %d bytes", len(p))
		}
		m.Page = binary.BigEndian.Uint64(p)
		n := int(binary.BigEndian.Uint16(p[8:]))
		if n == 0 || n > MaxUpdateWords || len(p) != updateHeadSize+n*wordUpdateSize {
			return Msg{}, protoErr("update of %d words in a %d-byte payload", n, len(p))
		}
		m.Words = make([]WordUpdate, n)
		for i := range m.Words {
			q := p[updateHeadSize+i*wordUpdateSize:]
			w := WordUpdate{Index: binary.BigEndian.Uint16(q), Old: binary.BigEndian.Uint64(q[2:]), New: binary.BigEndian.Uint64(q[10:])}
			if w.Index >= wordsPerPage {
				return Msg{}, protoErr("update of word %d (a page has %d)", w.Index, wordsPerPage)
			}
			m.Words[i] = w
		}
	case t == MsgDeps:
		seen, err := decodeSeen(t, p)
		if err != nil {
			return Msg{}, err
		}
		m.Seen = seen
	case t == MsgClockReply:
		if len(p) != 16 {
			return Msg{}, protoErr("clock-reply payload of %d bytes", len(p))
		}
		m.Clock, m.Epoch = binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])
	case t == MsgWelcome || t == MsgHeartbeat || t == MsgShutdownAck || t == MsgClockReq:
		if len(p) != 0 {
			return Msg{}, protoErr("%v with %d payload bytes", t, len(p))
		}
	default:
		return Msg{}, protoErr("unknown message type %d", uint8(t))
	}
	return m, nil
}

// FrameReader reads frames from a stream, reusing one buffer: a returned
// Msg's Data is valid only until the next Read.
type FrameReader struct {
	r   io.Reader
	buf []byte
}

// NewFrameReader reads frames from r.
func NewFrameReader(r io.Reader) *FrameReader {
	return &FrameReader{r: r, buf: make([]byte, HeaderSize+MaxPayload)}
}

// Read reads and decodes the next frame.
func (fr *FrameReader) Read() (Msg, error) {
	if _, err := io.ReadFull(fr.r, fr.buf[:HeaderSize]); err != nil {
		return Msg{}, err
	}
	t, n, id, err := parseHeader(fr.buf)
	if err != nil {
		return Msg{}, err
	}
	if _, err := io.ReadFull(fr.r, fr.buf[HeaderSize:HeaderSize+n]); err != nil {
		return Msg{}, fmt.Errorf("dsm: reading %d-byte %v payload: %w", n, t, err)
	}
	return decodePayload(t, id, fr.buf[HeaderSize:HeaderSize+n])
}

package dsm

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

func sampleMsgs() []Msg {
	page := bytes.Repeat([]byte{0x5A}, PageSize)
	var nonce [NonceSize]byte
	var mac [MACSize]byte
	for i := range nonce {
		nonce[i], mac[i] = byte(i), byte(255-i)
	}
	return []Msg{
		{Type: MsgHello, ReqID: 0, From: 2, To: 0, Nonce: nonce, VMID: "vm-1"},
		{Type: MsgChallenge, Nonce: nonce, MAC: mac},
		{Type: MsgProof, MAC: mac},
		{Type: MsgWelcome},
		{Type: MsgError, Code: 3, Text: "authentication failed"},
		{Type: MsgHeartbeat},
		{Type: MsgReadReq, ReqID: 7, Page: 0x100},
		{Type: MsgWriteReq, ReqID: 8, Page: 1 << 40},
		{Type: MsgFetch, ReqID: 9, Page: 5},
		{Type: MsgFetchReply, ReqID: 9, Page: 5, Flags: FlagData, Data: page},
		{Type: MsgInvalidate, ReqID: 10, Page: 5, Flags: FlagWantData},
		{Type: MsgInvAck, ReqID: 10, Page: 5, Flags: FlagZero},
		{Type: MsgGrant, ReqID: 8, Page: 5, Flags: FlagExclusive | FlagData, Data: page},
		{Type: MsgReplicaReq, ReqID: 15, Page: 1},
		{Type: MsgGrant, ReqID: 15, Page: 1, Flags: FlagReplica | FlagData, Data: page},
		{Type: MsgFetch, ReqID: 16, Page: 2, Flags: FlagReplica},
		{Type: MsgFetchReply, ReqID: 16, Page: 2, Flags: FlagData | FlagSeen, Data: page, Seen: []uint64{4, 0, 1 << 40}},
		{Type: MsgGrant, ReqID: 17, Page: 2, Flags: FlagReplica | FlagZero | FlagSeen, Seen: []uint64{0, 9}},
		{Type: MsgDeps, Seen: []uint64{12, 0, 3}},
		{Type: MsgDeps, Seen: make([]uint64, MaxSlices)},
		{Type: MsgUpdate, Page: 3, Words: []WordUpdate{{Index: 0, Old: 0x2007, New: 0x2027}, {Index: 511, Old: 1 << 63, New: 0}}},
		{Type: MsgIOReq, ReqID: 11, Addr: 0x3F8, VCPU: 3, Space: SpacePort, IOWrite: true, Size: 1, Count: 2, Data: []byte{'h', 'i'}},
		{Type: MsgIOReq, ReqID: 12, Addr: 0xD0000004, VCPU: 1, Space: SpaceMMIO, Size: 4, Count: 1},
		{Type: MsgIOReq, ReqID: 13, Addr: 0x10, Space: SpacePort, IOWrite: true, Size: 4, Count: 1024, Data: bytes.Repeat([]byte{7}, 4096)},
		{Type: MsgIOReply, ReqID: 12, Data: []byte{1, 2, 3, 4}},
		{Type: MsgIOReply, ReqID: 11},
		{Type: MsgInterrupt, VCPU: 5, Vector: 0x40, Mode: 0, Assert: true},
		{Type: MsgInterrupt, VCPU: 1, Vector: 0x9A, Mode: 6},
		{Type: MsgInterrupt, VCPU: 2, Vector: 0x31, Mode: 1, Level: true, Assert: true},
		{Type: MsgEOI, Vector: 0x31},
		{Type: MsgAPICState, VCPU: 3, APICID: 3, LDR: 0x08, DFR: 0xF},
		{Type: MsgClockReq, ReqID: 14},
		{Type: MsgClockReply, ReqID: 14, Clock: 123456789012, Epoch: 123000000000},
		{Type: MsgShutdown, Text: "all slices done"},
		{Type: MsgShutdownAck},
	}
}

func TestFrameRoundTrip(t *testing.T) {
	var stream []byte
	for _, m := range sampleMsgs() {
		b, err := AppendFrame(nil, &m)
		if err != nil {
			t.Fatalf("%v: %v", m.Type, err)
		}
		got, err := DecodeFrame(b)
		if err != nil {
			t.Fatalf("%v: decode: %v", m.Type, err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("%v: round trip\n got %+v\nwant %+v", m.Type, got, m)
		}
		stream = append(stream, b...)
	}
	fr := NewFrameReader(bytes.NewReader(stream))
	for _, m := range sampleMsgs() {
		got, err := fr.Read()
		if err != nil || got.Type != m.Type || got.ReqID != m.ReqID {
			t.Fatalf("stream read %v: got %v (%v)", m.Type, got.Type, err)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	good, _ := AppendFrame(nil, &Msg{Type: MsgGrant, Page: 1, Flags: FlagZero})
	mutate := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	tests := []struct {
		name string
		b    []byte
	}{
		{"short", good[:10]},
		{"bad magic", mutate(func(b []byte) []byte { b[0] = 'X'; return b })},
		{"bad version", mutate(func(b []byte) []byte { b[4] = 9; return b })},
		{"reserved flags", mutate(func(b []byte) []byte { b[7] = 1; return b })},
		{"unknown type", mutate(func(b []byte) []byte { b[5] = 99; return b })},
		{"length mismatch", mutate(func(b []byte) []byte { return b[:len(b)-1] })},
		{"oversized length", mutate(func(b []byte) []byte { b[8] = 0xFF; return b })},
		{"unknown page flag", mutate(func(b []byte) []byte { b[len(b)-1] |= 0x80; return b })},
		{"data flag without data", mutate(func(b []byte) []byte { b[len(b)-1] = byte(FlagData); return b })},
		{"data and zero", mutate(func(b []byte) []byte { b[len(b)-1] = byte(FlagData | FlagZero); return b })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := DecodeFrame(tt.b); !errors.Is(err, ErrProtocol) {
				t.Fatalf("DecodeFrame: %v, want ErrProtocol", err)
			}
		})
	}
}

func TestIOReqRejects(t *testing.T) {
	for _, m := range []Msg{
		{Type: MsgIOReq, Space: 2, Size: 1, Count: 1},
		{Type: MsgIOReq, Space: SpacePort, Size: 8, Count: 1},
		{Type: MsgIOReq, Space: SpacePort, Size: 3, Count: 1},
		{Type: MsgIOReq, Space: SpacePort, Addr: 0x10000, Size: 1, Count: 1},
		{Type: MsgIOReq, Space: SpaceMMIO, Size: 4, Count: 2},
		{Type: MsgIOReq, Space: SpaceMMIO, Size: 16, Count: 1},
		{Type: MsgIOReq, Space: SpacePort, Size: 1, Count: 0},
		{Type: MsgIOReq, Space: SpacePort, Size: 4, Count: 1025, IOWrite: true, Data: make([]byte, 4100)},
		{Type: MsgIOReq, Space: SpacePort, Size: 1, Count: 1, IOWrite: true},
		{Type: MsgIOReq, Space: SpacePort, Size: 1, Count: 1, Data: []byte{1}},
		{Type: MsgIOReply, Data: make([]byte, MaxIOData+1)},
		{Type: MsgInterrupt, Mode: 3},
		{Type: MsgInterrupt, Mode: 8},
		{Type: MsgAPICState, DFR: 0x10},
	} {
		if _, err := AppendFrame(nil, &m); err == nil {
			t.Errorf("encoded a bad %+v", m)
		}
	}
	// Unknown IO flags on the wire.
	good, _ := AppendFrame(nil, &Msg{Type: MsgIOReq, Space: SpacePort, Size: 1, Count: 1})
	good[HeaderSize+11] = 0x80
	if _, err := DecodeFrame(good); !errors.Is(err, ErrProtocol) {
		t.Fatalf("io-req with unknown flags: %v", err)
	}
}

func TestEncodeRejectsBadPageData(t *testing.T) {
	if _, err := AppendFrame(nil, &Msg{Type: MsgGrant, Flags: FlagData, Data: []byte{1}}); err == nil {
		t.Fatal("encoded a grant with a 1-byte page")
	}
}

// FuzzDecodeFrame feeds arbitrary bytes (outside input: any peer can send
// them) to the decoder: it must never panic, and whatever it accepts must
// re-encode to the same bytes.
func FuzzDecodeFrame(f *testing.F) {
	for _, m := range sampleMsgs() {
		b, _ := AppendFrame(nil, &m)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeFrame(b)
		if err != nil {
			return
		}
		out, err := AppendFrame(nil, &m)
		if err != nil {
			t.Fatalf("decoded %+v does not re-encode: %v", m, err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, out)
		}
		fr := NewFrameReader(bytes.NewReader(b))
		if _, err := fr.Read(); err != nil {
			t.Fatalf("stream reader rejects a frame DecodeFrame accepts: %v", err)
		}
	})
}

func TestUpdateRejects(t *testing.T) {
	for _, m := range []Msg{
		{Type: MsgUpdate, Page: 1},
		{Type: MsgUpdate, Page: 1, Words: []WordUpdate{{Index: wordsPerPage}}},
		{Type: MsgUpdate, Page: 1, Words: make([]WordUpdate, MaxUpdateWords+1)},
	} {
		if _, err := AppendFrame(nil, &m); err == nil {
			t.Errorf("encoded a bad update of %d words", len(m.Words))
		}
	}
	good, _ := AppendFrame(nil, &Msg{Type: MsgUpdate, Page: 1, Words: []WordUpdate{{Index: 3, Old: 1, New: 2}}})
	for name, mut := range map[string]func([]byte) []byte{
		"word index 512": func(b []byte) []byte { b[HeaderSize+10] = 2; b[HeaderSize+11] = 0; return b },
		"count says 2":   func(b []byte) []byte { b[HeaderSize+9] = 2; return b },
		"count says 0":   func(b []byte) []byte { b[HeaderSize+9] = 0; return b },
		"a byte missing": func(b []byte) []byte { b = b[:len(b)-1]; b[11]--; return b },
		"header only, 0 words": func(b []byte) []byte {
			b = b[:HeaderSize+updateHeadSize]
			b[11] = updateHeadSize
			b[HeaderSize+9] = 0
			return b
		},
	} {
		b := mut(append([]byte(nil), good...))
		if _, err := DecodeFrame(b); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: DecodeFrame: %v, want ErrProtocol", name, err)
		}
	}
}

func TestSeenRejects(t *testing.T) {
	for _, m := range []Msg{
		{Type: MsgDeps},
		{Type: MsgDeps, Seen: make([]uint64, MaxSlices+1)},
		{Type: MsgGrant, Page: 1, Flags: FlagReplica | FlagZero | FlagSeen},
	} {
		if _, err := AppendFrame(nil, &m); err == nil {
			t.Errorf("encoded %v with %d update counts", m.Type, len(m.Seen))
		}
	}
	deps, _ := AppendFrame(nil, &Msg{Type: MsgDeps, Seen: []uint64{1, 2}})
	grant, _ := AppendFrame(nil, &Msg{Type: MsgGrant, Page: 1, Flags: FlagReplica | FlagData | FlagSeen, Data: make([]byte, PageSize), Seen: []uint64{5}})
	for name, tc := range map[string]struct {
		good []byte
		mut  func([]byte) []byte
	}{
		"deps count says 3":    {deps, func(b []byte) []byte { b[HeaderSize] = 3; return b }},
		"deps count says 0":    {deps, func(b []byte) []byte { b[HeaderSize] = 0; return b }},
		"deps count says 65":   {deps, func(b []byte) []byte { b[HeaderSize] = MaxSlices + 1; return b }},
		"deps a byte missing":  {deps, func(b []byte) []byte { b = b[:len(b)-1]; b[11]--; return b }},
		"grant counts missing": {grant, func(b []byte) []byte { b = b[:len(b)-9]; b[11] -= 9; return b }},
		"grant data cut short": {grant, func(b []byte) []byte {
			b = b[:HeaderSize+pagePayloadSize+100]
			b[10], b[11] = 0, pagePayloadSize+100
			return b
		}},
		"grant count says 2":  {grant, func(b []byte) []byte { b[len(b)-9] = 2; return b }},
		"grant trailing byte": {grant, func(b []byte) []byte { b = append(b, 0); b[11]++; return b }},
	} {
		b := tc.mut(append([]byte(nil), tc.good...))
		if _, err := DecodeFrame(b); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: DecodeFrame: %v, want ErrProtocol", name, err)
		}
	}
}

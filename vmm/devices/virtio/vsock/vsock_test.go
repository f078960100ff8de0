package vsock

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/devices/internal/fakemem"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio"
	"github.com/hpcvm/hpcvm/vmm/devices/virtio/virtiotest"
)

const (
	rxBufSize  = 4096 + HeaderLen
	guestCID   = DefaultGuestCID
	testQueues = 64
)

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// guest plays the guest's virtio-vsock driver over the fake driver.
type guest struct {
	t   *testing.T
	dev *Device
	m   *virtio.MMIO
	d   *virtiotest.Driver
	log *syncBuffer
	// Every packet received that the test did not ask for by op.
	credits map[key]Header
}

func newGuest(t *testing.T, cfg Config) (*guest, string) {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = filepath.Join(t.TempDir(), "v.sock")
	}
	logs := &syncBuffer{}
	cfg.Log = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dev, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mem := fakemem.New(8 << 20)
	irq := virtiotest.NewInterrupt()
	m := virtio.NewMMIO(dev, mem, irq, cfg.Log)
	d := virtiotest.New(m, mem, irq)
	t.Cleanup(func() {
		d.Close()
		if err := m.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if t.Failed() {
			t.Logf("device log:\n%s", logs.String())
		}
	})
	g := &guest{t: t, dev: dev, m: m, d: d, log: logs, credits: map[key]Header{}}
	g.init()
	return g, cfg.Path
}

func (g *guest) init() {
	if _, err := g.d.Init(virtio.FeatureVersion1, []uint16{testQueues, testQueues, 8}, rxBufSize); err != nil {
		g.t.Fatal(err)
	}
	for range testQueues {
		if _, err := g.d.Queues[rxQueue].Add(virtiotest.Buf{Len: rxBufSize, Write: true}); err != nil {
			g.t.Fatal(err)
		}
	}
	for range 8 {
		g.d.Queues[eventQueue].Add(virtiotest.Buf{Len: 8, Write: true})
	}
	g.d.Kick(rxQueue)
	g.d.Kick(eventQueue)
}

func (g *guest) send(h Header, payload []byte) {
	g.t.Helper()
	h.SrcCID, h.DstCID, h.Type, h.Len = guestCID, HostCID, TypeStream, uint32(len(payload))
	b := make([]byte, HeaderLen+len(payload))
	h.Encode(b)
	copy(b[HeaderLen:], payload)
	q := g.d.Queues[txQueue]
	if _, err := q.Add(virtiotest.Buf{Data: b}); err != nil {
		g.t.Fatal(err)
	}
	g.d.Kick(txQueue)
	if _, err := q.Wait(0); err != nil {
		g.t.Fatal(err)
	}
}

// recv returns the next packet, giving the rx buffer back to the device.
func (g *guest) recv() (Header, []byte) {
	g.t.Helper()
	q := g.d.Queues[rxQueue]
	u, err := q.Wait(0)
	if err != nil {
		g.t.Fatal(err)
	}
	h, err := DecodeHeader(u.Written)
	if err != nil {
		g.t.Fatal(err)
	}
	if h.SrcCID != HostCID || h.DstCID != guestCID || h.Type != TypeStream {
		g.t.Fatalf("packet with bad addressing: %+v", h)
	}
	if int(h.Len) != len(u.Written)-HeaderLen {
		g.t.Fatalf("header length %d, used length says %d", h.Len, len(u.Written)-HeaderLen)
	}
	payload := u.Written[HeaderLen:]
	if _, err := q.Add(virtiotest.Buf{Len: rxBufSize, Write: true}); err != nil {
		g.t.Fatal(err)
	}
	g.d.Kick(rxQueue)
	return h, payload
}

// recvOp returns the next packet that is not a credit update.
func (g *guest) recvOp(op uint16) (Header, []byte) {
	g.t.Helper()
	for {
		h, p := g.recv()
		if h.Op == OpCreditUpdate && op != OpCreditUpdate {
			continue
		}
		if h.Op != op {
			g.t.Fatalf("got op %d (%+v), want op %d", h.Op, h, op)
		}
		return h, p
	}
}

func dialHybrid(t *testing.T, path string, port uint32) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(virtiotest.DefaultTimeout))
	fmt.Fprintf(c, "CONNECT %d\n", port)
	return c, bufio.NewReader(c)
}

// hostConnect runs the host-initiated handshake with the guest accepting
// (advertising bufAlloc) and returns the host connection and host port.
func (g *guest) hostConnect(path string, port, bufAlloc uint32) (net.Conn, *bufio.Reader, uint32) {
	g.t.Helper()
	c, br := dialHybrid(g.t, path, port)
	req, _ := g.recvOp(OpRequest)
	if req.DstPort != port {
		g.t.Fatalf("REQUEST to guest port %d, want %d", req.DstPort, port)
	}
	g.send(Header{SrcPort: port, DstPort: req.SrcPort, Op: OpResponse, BufAlloc: bufAlloc}, nil)
	line, err := br.ReadString('\n')
	if err != nil {
		g.t.Fatalf("no OK line: %v", err)
	}
	if want := fmt.Sprintf("OK %d\n", req.SrcPort); line != want {
		g.t.Fatalf("handshake answer %q, want %q", line, want)
	}
	return c, br, req.SrcPort
}

func TestConfigCID(t *testing.T) {
	for _, cid := range []uint64{0, 42} {
		g, _ := newGuest(t, Config{GuestCID: cid})
		want := cid
		if want == 0 {
			want = DefaultGuestCID
		}
		var b [8]byte
		g.m.Read(virtiotest.RegConfig, b[:])
		if got := binary.LittleEndian.Uint64(b[:]); got != want {
			t.Errorf("config guest_cid = %d, want %d", got, want)
		}
	}
}

func TestHostToGuest(t *testing.T) {
	g, path := newGuest(t, Config{})
	c, br, hostPort := g.hostConnect(path, 1234, 64<<10)
	k := key{local: hostPort, peer: 1234}

	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for len(got) < 4 {
		h, p := g.recvOp(OpRW)
		if h.SrcPort != k.local || h.DstPort != k.peer {
			t.Fatalf("RW on ports %d->%d, want %d->%d", h.SrcPort, h.DstPort, k.local, k.peer)
		}
		got = append(got, p...)
	}
	if string(got) != "ping" {
		t.Fatalf("guest got %q, want ping", got)
	}
	g.send(Header{SrcPort: k.peer, DstPort: k.local, Op: OpRW, BufAlloc: 64 << 10}, []byte("pong"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("host read %q, %v; want pong", buf, err)
	}
	// The guest closes: the device flushes, answers RST and closes the host side.
	g.send(Header{SrcPort: k.peer, DstPort: k.local, Op: OpShutdown, Flags: ShutdownRcv | ShutdownSend}, nil)
	if h, _ := g.recvOp(OpRst); h.DstPort != k.peer {
		t.Errorf("RST to guest port %d, want %d", h.DstPort, k.peer)
	}
	if n, err := br.Read(buf); err != io.EOF {
		t.Errorf("host read after guest close = %d, %v; want EOF", n, err)
	}
}

func TestGuestToHost(t *testing.T) {
	g, path := newGuest(t, Config{})
	ln, err := net.Listen("unix", path+"_5000")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	g.send(Header{SrcPort: 7777, DstPort: 5000, Op: OpRequest, BufAlloc: 64 << 10}, nil)
	h, _ := g.recvOp(OpResponse)
	if h.SrcPort != 5000 || h.DstPort != 7777 || h.BufAlloc == 0 {
		t.Fatalf("RESPONSE %+v", h)
	}
	hc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	hc.SetDeadline(time.Now().Add(virtiotest.DefaultTimeout))
	g.send(Header{SrcPort: 7777, DstPort: 5000, Op: OpRW, BufAlloc: 64 << 10}, []byte("hello host"))
	buf := make([]byte, 10)
	if _, err := io.ReadFull(hc, buf); err != nil || string(buf) != "hello host" {
		t.Fatalf("host read %q, %v", buf, err)
	}
	hc.Write([]byte("hi guest"))
	var got []byte
	for len(got) < 8 {
		_, p := g.recvOp(OpRW)
		got = append(got, p...)
	}
	if string(got) != "hi guest" {
		t.Errorf("guest got %q", got)
	}
	// Host closes: the guest hears SHUTDOWN(SEND), then closes too.
	hc.Close()
	if h, _ := g.recvOp(OpShutdown); h.Flags != ShutdownSend {
		t.Errorf("shutdown flags %d, want SEND", h.Flags)
	}
	g.send(Header{SrcPort: 7777, DstPort: 5000, Op: OpShutdown, Flags: ShutdownRcv | ShutdownSend}, nil)
	g.recvOp(OpRst)
}

func TestRefused(t *testing.T) {
	tests := []struct {
		name string
		h    Header
	}{
		{"no listener", Header{SrcPort: 7778, DstPort: 6000, Op: OpRequest}},
		{"data on unknown connection", Header{SrcPort: 7779, DstPort: 6001, Op: OpRW}},
		{"response without request", Header{SrcPort: 7780, DstPort: 6002, Op: OpResponse}},
	}
	g, _ := newGuest(t, Config{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g.send(tt.h, nil)
			h, _ := g.recvOp(OpRst)
			if h.SrcPort != tt.h.DstPort || h.DstPort != tt.h.SrcPort {
				t.Errorf("RST ports %d->%d, want %d->%d", h.SrcPort, h.DstPort, tt.h.DstPort, tt.h.SrcPort)
			}
		})
	}
}

func TestGuestRefusesOrIgnores(t *testing.T) {
	g, path := newGuest(t, Config{ConnectTimeout: 50 * time.Millisecond})
	buf := make([]byte, 1)

	// Guest answers RST: the host client is closed without an OK.
	_, br := dialHybrid(t, path, 80)
	req, _ := g.recvOp(OpRequest)
	g.send(Header{SrcPort: 80, DstPort: req.SrcPort, Op: OpRst}, nil)
	if n, err := br.Read(buf); err != io.EOF {
		t.Errorf("host read after guest RST = %d, %v; want EOF", n, err)
	}

	// Guest never answers: after the timeout the guest gets RST and the
	// host client is closed.
	_, br = dialHybrid(t, path, 81)
	req, _ = g.recvOp(OpRequest)
	if h, _ := g.recvOp(OpRst); h.SrcPort != req.SrcPort {
		t.Errorf("timeout RST from port %d, want %d", h.SrcPort, req.SrcPort)
	}
	if n, err := br.Read(buf); err != io.EOF {
		t.Errorf("host read after timeout = %d, %v; want EOF", n, err)
	}
}

func TestBadHandshake(t *testing.T) {
	tests := []string{
		"HELLO\n",
		"CONNECT abc\n",
		"CONNECT 99999999999\n",
		"CONNECT -1\n",
		"CONNECT 12", // then EOF
		strings.Repeat("A", 100),
	}
	g, path := newGuest(t, Config{})
	for _, line := range tests {
		t.Run(fmt.Sprintf("%q", line), func(t *testing.T) {
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(virtiotest.DefaultTimeout))
			io.WriteString(c, line)
			if !strings.HasSuffix(line, "\n") && len(line) < MaxConnectLine {
				c.(*net.UnixConn).CloseWrite()
			}
			got, err := io.ReadAll(c)
			if err != nil || len(got) != 0 {
				t.Errorf("device answered %q, %v; want a plain close", got, err)
			}
		})
	}
	if n := strings.Count(g.log.String(), "bad hybrid handshake"); n != len(tests) {
		t.Errorf("%d handshake log lines, want %d", n, len(tests))
	}
}

func randomPayload(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestFlowHostToGuest sends far more than the guest's receive buffer; the
// device must never exceed the guest's credit and everything must arrive.
func TestFlowHostToGuest(t *testing.T) {
	const guestBuf = 8 << 10
	g, path := newGuest(t, Config{})
	c, _, hostPort := g.hostConnect(path, 2000, guestBuf)
	k := key{local: hostPort, peer: 2000}
	want := randomPayload(1 << 20)
	go func() {
		c.Write(want)
	}()
	var got []byte
	var advertised uint32 // fwd_cnt last told to the device
	for len(got) < len(want) {
		h, p := g.recv()
		switch h.Op {
		case OpRW:
			got = append(got, p...)
			if inFlight := uint32(len(got)) - advertised; inFlight > guestBuf {
				t.Fatalf("device sent %d bytes beyond the guest's credit", inFlight-guestBuf)
			}
		case OpCreditRequest:
		default:
			t.Fatalf("unexpected packet %+v", h)
		}
		// The "application" consumed everything; tell the device now and
		// then (or when asked).
		if uint32(len(got))-advertised >= guestBuf/2 || h.Op == OpCreditRequest {
			advertised = uint32(len(got))
			g.send(Header{SrcPort: k.peer, DstPort: k.local, Op: OpCreditUpdate, BufAlloc: guestBuf, FwdCnt: advertised}, nil)
		}
	}
	if sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatal("payload corrupted in transit")
	}
}

// TestFlowGuestToHost has the guest send far more than the device's
// buf_alloc, respecting the credit the device advertises.
func TestFlowGuestToHost(t *testing.T) {
	const devBuf = 16 << 10
	g, path := newGuest(t, Config{BufAlloc: devBuf})
	ln, err := net.Listen("unix", path+"_5001")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	want := randomPayload(1 << 20)
	sum := make(chan [32]byte, 1)
	go func() {
		hc, err := ln.Accept()
		if err != nil {
			sum <- [32]byte{}
			return
		}
		defer hc.Close()
		got, _ := io.ReadAll(io.LimitReader(hc, int64(len(want))))
		sum <- sha256.Sum256(got)
	}()
	g.send(Header{SrcPort: 9000, DstPort: 5001, Op: OpRequest, BufAlloc: 64 << 10}, nil)
	h, _ := g.recvOp(OpResponse)
	bufAlloc, fwdCnt := h.BufAlloc, h.FwdCnt
	if bufAlloc != devBuf {
		t.Fatalf("device advertised buf_alloc %d, want %d", bufAlloc, devBuf)
	}
	sent, stalls := uint32(0), 0
	for int(sent) < len(want) {
		credit := bufAlloc - (sent - fwdCnt)
		if credit == 0 {
			stalls++
			h, _ := g.recvOp(OpCreditUpdate)
			bufAlloc, fwdCnt = h.BufAlloc, h.FwdCnt
			continue
		}
		n := min(credit, 4096, uint32(len(want))-sent)
		g.send(Header{SrcPort: 9000, DstPort: 5001, Op: OpRW, BufAlloc: 64 << 10}, want[sent:sent+n])
		sent += n
	}
	if got := <-sum; got != sha256.Sum256(want) {
		t.Fatal("payload corrupted in transit")
	}
	if stalls == 0 {
		t.Error("guest never ran out of credit; the test did not exercise flow control")
	}
	if strings.Contains(g.log.String(), "overran") {
		t.Error("device thinks the guest overran its buffer")
	}
}

func TestGuestOverrunResets(t *testing.T) {
	g, path := newGuest(t, Config{BufAlloc: 1024})
	ln, err := net.Listen("unix", path+"_5002")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	g.send(Header{SrcPort: 9001, DstPort: 5002, Op: OpRequest}, nil)
	g.recvOp(OpResponse)
	hc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	// One packet beyond the advertised buffer: a protocol violation.
	g.send(Header{SrcPort: 9001, DstPort: 5002, Op: OpRW}, make([]byte, 2000))
	g.recvOp(OpRst)
	if !strings.Contains(g.log.String(), "overran") {
		t.Error("overrun not logged")
	}
}

func TestTransportResetAfterRestore(t *testing.T) {
	g, _ := newGuest(t, Config{})
	s := g.dev.State()
	ms := g.m.State()
	if err := g.dev.Restore(s); err != nil {
		t.Fatal(err)
	}
	if err := g.m.Restore(ms); err != nil {
		t.Fatal(err)
	}
	u, err := g.d.Queues[eventQueue].Wait(0)
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Written) != 4 || binary.LittleEndian.Uint32(u.Written) != eventTransportReset {
		t.Errorf("event %x, want TRANSPORT_RESET", u.Written)
	}
	s.GuestCID = 99
	if err := g.dev.Restore(s); err == nil {
		t.Error("restore accepted a different guest CID")
	}
}

func TestNewErrors(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		cfg  Config
	}{
		{"host CID", Config{Path: filepath.Join(dir, "a"), GuestCID: 2}},
		{"missing directory", Config{Path: filepath.Join(dir, "no", "such", "dir")}},
	}
	for _, tt := range tests {
		if d, err := New(tt.cfg); err == nil {
			d.Close()
			t.Errorf("%s: New succeeded", tt.name)
		}
	}
}

func TestHalfClose(t *testing.T) {
	g, path := newGuest(t, Config{})
	ln, err := net.Listen("unix", path+"_5003")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	g.send(Header{SrcPort: 9100, DstPort: 5003, Op: OpRequest, BufAlloc: 64 << 10}, nil)
	g.recvOp(OpResponse)
	hc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	hc.SetDeadline(time.Now().Add(virtiotest.DefaultTimeout))

	// Guest: write, then shutdown(SHUT_WR). The host reads data then EOF.
	g.send(Header{SrcPort: 9100, DstPort: 5003, Op: OpRW, BufAlloc: 64 << 10}, []byte("abc"))
	g.send(Header{SrcPort: 9100, DstPort: 5003, Op: OpShutdown, Flags: ShutdownSend, BufAlloc: 64 << 10}, nil)
	got, err := io.ReadAll(hc)
	if err != nil || string(got) != "abc" {
		t.Fatalf("host read %q, %v; want abc then EOF", got, err)
	}
	// The other direction still works; the host's half-close completes
	// the connection and the device resets it.
	hc.Write([]byte("xyz"))
	hc.(*net.UnixConn).CloseWrite()
	if _, p := g.recvOp(OpRW); string(p) != "xyz" {
		t.Errorf("guest got %q, want xyz", p)
	}
	if h, _ := g.recvOp(OpShutdown); h.Flags != ShutdownSend {
		t.Errorf("shutdown flags %d, want SEND", h.Flags)
	}
	g.recvOp(OpRst)
}

func TestConnectBeforeDriverReady(t *testing.T) {
	g, path := newGuest(t, Config{})
	g.d.Write32(virtiotest.RegStatus, 0) // driver gone
	_, br := dialHybrid(t, path, 22)
	if got, err := io.ReadAll(br); err != nil || len(got) != 0 {
		t.Errorf("device answered %q, %v; want a plain close", got, err)
	}
	if !strings.Contains(g.log.String(), "not ready") {
		t.Error("refusal not logged")
	}
}

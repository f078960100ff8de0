package dsm

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

type recHandler struct {
	mu     sync.Mutex
	msgs   []Msg
	from   []int
	failed chan error
}

func newRecHandler() *recHandler { return &recHandler{failed: make(chan error, 1)} }

func (h *recHandler) Deliver(from int, m *Msg) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := *m
	c.Data = append([]byte(nil), m.Data...)
	h.msgs = append(h.msgs, c)
	h.from = append(h.from, from)
}

func (h *recHandler) PeerFailed(peer int, err error) { h.failed <- err }

func (h *recHandler) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.msgs)
}

var testSecret = []byte("0123456789abcdef-test-secret")

// loopbackListeners opens n listeners on 127.0.0.1 with kernel-chosen ports.
func loopbackListeners(t testing.TB, n int) ([]net.Listener, []string) {
	t.Helper()
	var lns []net.Listener
	var addrs []string
	for i := 0; i < n; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		addrs = append(addrs, ln.Addr().String())
	}
	return lns, addrs
}

// logBuffer is a concurrency-safe log sink for asserting on log output.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func mesh(t *testing.T, n int, secrets [][]byte, logs []*logBuffer) ([]*Transport, []error) {
	t.Helper()
	return meshWithin(t, n, secrets, logs, 20*time.Second)
}

// meshWithin is mesh with a connect timeout (how long a slice waits for
// peers that never authenticate).
func meshWithin(t *testing.T, n int, secrets [][]byte, logs []*logBuffer, connect time.Duration) ([]*Transport, []error) {
	t.Helper()
	lns, addrs := loopbackListeners(t, n)
	trs := make([]*Transport, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			lg := slog.New(slog.NewTextHandler(logs[i], nil))
			trs[i], errs[i] = NewTransport(context.Background(), TransportConfig{ID: i, Addrs: addrs, Listener: lns[i],
				VMID: "vm-test", Secret: secrets[i], Logger: lg, ConnectTimeout: connect,
				Heartbeat: 50 * time.Millisecond, PeerTimeout: 10 * time.Second})
		}(i)
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, tr := range trs {
			if tr != nil {
				tr.Close()
			}
		}
	})
	return trs, errs
}

func logs(n int) []*logBuffer {
	l := make([]*logBuffer, n)
	for i := range l {
		l[i] = &logBuffer{}
	}
	return l
}

func TestMeshDeliversInOrder(t *testing.T) {
	const n, count = 3, 200
	trs, errs := mesh(t, n, [][]byte{testSecret, testSecret, testSecret}, logs(n))
	for i, err := range errs {
		if err != nil {
			t.Fatalf("slice %d: %v", i, err)
		}
	}
	hs := make([]*recHandler, n)
	for i, tr := range trs {
		hs[i] = newRecHandler()
		if err := tr.Start(hs[i]); err != nil {
			t.Fatal(err)
		}
	}
	for i, tr := range trs {
		for j := 0; j < n; j++ {
			for k := 0; k < count; k++ {
				if err := tr.Send(j, &Msg{Type: MsgReadReq, ReqID: uint64(k), Page: uint64(i)}); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for j := 0; j < n; j++ {
		for hs[j].count() < n*count && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		hs[j].mu.Lock()
		next := make([]uint64, n)
		for k, m := range hs[j].msgs {
			from := hs[j].from[k]
			if m.Page != uint64(from) || m.ReqID != next[from] {
				t.Fatalf("slice %d got page %d id %d from %d, want page %d id %d", j, m.Page, m.ReqID, from, from, next[from])
			}
			next[from]++
		}
		hs[j].mu.Unlock()
		for i := 0; i < n; i++ {
			if next[i] != count {
				t.Fatalf("slice %d got %d messages from %d, want %d", j, next[i], i, count)
			}
		}
	}
	// The byte counters cover at least the page messages (heartbeats add
	// to them); a message to self crosses no connection.
	frame, err := AppendFrame(nil, &Msg{Type: MsgReadReq, ReqID: 1, Page: 1})
	if err != nil {
		t.Fatal(err)
	}
	least := int64((n - 1) * count * len(frame))
	for i, tr := range trs {
		if s, r := tr.BytesSent.Load(), tr.BytesReceived.Load(); s < least || r < least {
			t.Errorf("slice %d: %d bytes sent, %d received; want at least %d each", i, s, r, least)
		}
	}
}

// TestWrongSecretRefused: a slice with the wrong secret cannot join, and a
// hand-made client without the secret is refused, logged, and never gets
// a page message delivered or answered.
func TestWrongSecretRefused(t *testing.T) {
	lg := logs(2)
	_, errs := meshWithin(t, 2, [][]byte{testSecret, []byte("wrong-secret-wrong-secret")}, lg, 2*time.Second)
	if errs[1] == nil || !errors.Is(errs[1], ErrAuth) {
		t.Fatalf("slice 1 with the wrong secret: err %v, want ErrAuth", errs[1])
	}
	if errs[0] == nil {
		t.Fatal("slice 0 formed a mesh with an unauthenticated slice")
	}

	// A real slice 0 waiting for slice 1, and an intruder posing as slice 1.
	lns, addrs := loopbackListeners(t, 2)
	logBuf := &logBuffer{}
	h := newRecHandler()
	trc := make(chan *Transport, 1)
	go func() {
		tr, _ := NewTransport(context.Background(), TransportConfig{ID: 0, Addrs: addrs, Listener: lns[0], VMID: "vm-test",
			Secret: testSecret, Logger: slog.New(slog.NewTextHandler(logBuf, nil)), ConnectTimeout: 2 * time.Second})
		trc <- tr
	}()
	c, err := net.Dial("tcp", addrs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := NewFrameReader(c)
	hello := Msg{Type: MsgHello, From: 1, To: 0, VMID: "vm-test"}
	if err := writeMsg(c, &hello); err != nil {
		t.Fatal(err)
	}
	ch, err := fr.Read()
	if err != nil || ch.Type != MsgChallenge {
		t.Fatalf("expected a challenge, got %v (%v)", ch.Type, err)
	}
	if err := writeMsg(c, &Msg{Type: MsgProof}); err != nil { // no secret: a zero MAC
		t.Fatal(err)
	}
	// The intruder then tries to request a page anyway.
	writeMsg(c, &Msg{Type: MsgReadReq, Page: 0x100})
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := fr.Read()
	if err != nil || m.Type != MsgError || m.Code != CodeAuth {
		t.Fatalf("intruder got %v code %d (%v), want an auth error", m.Type, m.Code, err)
	}
	if m2, err := fr.Read(); err == nil {
		t.Fatalf("intruder received %v after being refused", m2.Type)
	}
	tr := <-trc
	if tr != nil {
		if err := tr.Start(h); err != nil {
			t.Fatal(err)
		}
		tr.Close()
	}
	if h.count() != 0 {
		t.Fatalf("refused peer's messages were delivered: %d", h.count())
	}
	if !strings.Contains(logBuf.String(), "dsm connection refused") || !strings.Contains(logBuf.String(), "authentication failed") {
		t.Fatalf("refusal not logged; log:\n%s", logBuf.String())
	}
}

func TestPeerDeathDetected(t *testing.T) {
	const n = 3
	trs, errs := mesh(t, n, [][]byte{testSecret, testSecret, testSecret}, logs(n))
	for i, err := range errs {
		if err != nil {
			t.Fatalf("slice %d: %v", i, err)
		}
	}
	hs := make([]*recHandler, n)
	for i, tr := range trs {
		hs[i] = newRecHandler()
		if err := tr.Start(hs[i]); err != nil {
			t.Fatal(err)
		}
	}
	trs[2].Close()
	for i := 0; i < 2; i++ {
		select {
		case err := <-hs[i].failed:
			if !strings.Contains(err.Error(), "slice 2") {
				t.Fatalf("slice %d failure does not name slice 2: %v", i, err)
			}
		case <-time.After(time.Minute): // a hang guard, not a latency check
			t.Fatalf("slice %d did not notice slice 2's death", i)
		}
	}
}

// stallFirstListener accepts its first connection and holds it, silent,
// for stall before closing it (a peer too busy to answer the handshake);
// later connections are passed on.
type stallFirstListener struct {
	net.Listener
	stall time.Duration
	once  sync.Once
}

func (l *stallFirstListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		first := false
		l.once.Do(func() { first = true })
		if !first {
			return c, nil
		}
		go func() { time.Sleep(l.stall); c.Close() }()
	}
}

// TestHandshakeTimeoutRetried: a slice whose handshake is not answered in
// time dials again until the connect deadline instead of failing.
func TestHandshakeTimeoutRetried(t *testing.T) {
	lns, addrs := loopbackListeners(t, 2)
	const peerTimeout = 300 * time.Millisecond
	lns[0] = &stallFirstListener{Listener: lns[0], stall: 2 * peerTimeout}
	trs := make([]*Transport, 2)
	errs := make([]error, 2)
	lg := &logBuffer{}
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			trs[i], errs[i] = NewTransport(context.Background(), TransportConfig{ID: i, Addrs: addrs, Listener: lns[i],
				VMID: "vm-test", Secret: testSecret, Logger: slog.New(slog.NewTextHandler(lg, nil)),
				ConnectTimeout: 10 * time.Second, Heartbeat: 50 * time.Millisecond, PeerTimeout: peerTimeout})
		}(i)
	}
	wg.Wait()
	for i, tr := range trs {
		if tr != nil {
			defer tr.Close()
		}
		if errs[i] != nil {
			t.Fatalf("slice %d: %v", i, errs[i])
		}
	}
	if !strings.Contains(lg.String(), "dsm handshake timed out; retrying") {
		t.Errorf("no retry logged:\n%s", lg)
	}
}

package dsm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// TransportConfig describes one slice's place in the TCP mesh.
type TransportConfig struct {
	ID    int      // this slice
	Addrs []string // every slice's address (host:port), indexed by slice id
	// Listener, if set, is used instead of listening on Addrs[ID] (tests
	// pass pre-opened loopback listeners or inherited sockets).
	Listener net.Listener
	VMID     string
	Secret   []byte
	Logger   *slog.Logger
	// Heartbeat is the interval between heartbeats (default 200ms);
	// PeerTimeout the silence after which a peer is declared dead
	// (default 10s: a dead process or a closed connection is seen at
	// once anyway; silence means a hung or cut-off node, and a loaded
	// node, such as 3 emulated nodes on 2 cores, can be silent for more
	// than 3 s while alive); ConnectTimeout how long to wait for the whole mesh
	// (default 30s).
	Heartbeat, PeerTimeout, ConnectTimeout time.Duration
	// BusyPoll: a connection's reader polls the socket without sleeping
	// for this long before it waits in the kernel (0: never spins). A
	// message arriving meanwhile costs no thread wake-up; the price is a
	// busy CPU: worth it only with idle cores to spare (on an
	// oversubscribed host it makes every fault slower).
	BusyPoll time.Duration
}

func (c *TransportConfig) defaults() error {
	if c.ID < 0 || c.ID >= len(c.Addrs) {
		return fmt.Errorf("dsm: slice id %d not in 0..%d", c.ID, len(c.Addrs)-1)
	}
	if len(c.Addrs) > 64 {
		return fmt.Errorf("dsm: %d slices, at most 64 supported", len(c.Addrs))
	}
	if len(c.Secret) < 16 {
		return fmt.Errorf("dsm: VM secret of %d bytes, need at least 16", len(c.Secret))
	}
	if c.VMID == "" || len(c.VMID) > MaxVMIDLen {
		return fmt.Errorf("dsm: VM id %q must be 1..%d bytes", c.VMID, MaxVMIDLen)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = 200 * time.Millisecond
	}
	if c.PeerTimeout == 0 {
		c.PeerTimeout = 10 * time.Second
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 30 * time.Second
	}
	return nil
}

// Handler receives messages from a Transport.
type Handler interface {
	// Deliver is called on the sending peer's reader goroutine, in the
	// order the peer sent; messages to self are delivered synchronously
	// inside Send. m.Data is only valid during the call.
	Deliver(from int, m *Msg)
	// PeerFailed is called once, for the first peer whose connection
	// breaks or goes silent, unless the transport is closing.
	PeerFailed(peer int, err error)
}

// Transport is an authenticated full mesh of TCP connections between the
// slices of one VM. Slice i dials every slice j < i and accepts from j > i.
type Transport struct {
	cfg   TransportConfig
	log   *slog.Logger
	ln    net.Listener
	peers []*peer // nil at cfg.ID
	h     Handler

	mu        sync.Mutex
	connected chan struct{} // closed when every peer is connected
	nconn     int
	closing   atomic.Bool
	failed    atomic.Bool
	started   atomic.Bool
	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup

	// Refused counts connections refused during authentication.
	Refused atomic.Int64
	// BytesSent and BytesReceived count the bytes of the frames sent to
	// and read from the peers after the handshake (heartbeats included).
	BytesSent, BytesReceived atomic.Int64
}

// countingReader counts the bytes read through it into n.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(b []byte) (int, error) {
	k, err := c.r.Read(b)
	c.n.Add(int64(k))
	return k, err
}

type peer struct {
	id   int
	conn net.Conn     // handshake, then only closed
	fr   *FrameReader // the handshake's reader
	sock *sock        // from Start on: the detached socket (see sock)
	wmu  sync.Mutex
	wbuf []byte
	eof  chan struct{} // closed when the reader stops
}

// NewTransport listens and connects to every other slice, authenticating
// each connection. It returns once the mesh is complete; no message is
// delivered before Start.
func NewTransport(ctx context.Context, cfg TransportConfig) (*Transport, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	n := len(cfg.Addrs)
	t := &Transport{cfg: cfg, log: cfg.Logger.With("slice", cfg.ID), peers: make([]*peer, n),
		connected: make(chan struct{}), done: make(chan struct{})}
	t.ln = cfg.Listener
	if t.ln == nil {
		ln, err := net.Listen("tcp", cfg.Addrs[cfg.ID])
		if err != nil {
			return nil, fmt.Errorf("dsm: slice %d listen: %w", cfg.ID, err)
		}
		t.ln = ln
	}
	if n == 1 {
		close(t.connected)
	}
	t.wg.Add(1)
	go t.acceptLoop()
	ctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	defer cancel()
	errc := make(chan error, n)
	for j := 0; j < cfg.ID; j++ {
		go func(j int) { errc <- t.dial(ctx, j) }(j)
	}
	for j := 0; j < cfg.ID; j++ {
		if err := <-errc; err != nil {
			t.Close()
			return nil, err
		}
	}
	select {
	case <-t.connected:
		return t, nil
	case <-ctx.Done():
		t.mu.Lock()
		var missing []int
		for j, p := range t.peers {
			if p == nil && j != cfg.ID {
				missing = append(missing, j)
			}
		}
		t.mu.Unlock()
		t.Close()
		return nil, fmt.Errorf("dsm: slice %d: slices %v did not connect within %v", cfg.ID, missing, cfg.ConnectTimeout)
	}
}

func (t *Transport) dial(ctx context.Context, j int) error {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "tcp", t.cfg.Addrs[j])
		if err == nil {
			fr := NewFrameReader(c)
			err = dialHandshake(c, fr, t.cfg.Secret, t.cfg.VMID, t.cfg.ID, j, t.cfg.PeerTimeout)
			if err == nil {
				return t.add(j, c, fr)
			}
			c.Close()
			// A peer too busy to answer in time (a slice loading its
			// kernel on a loaded host) is tried again until the connect
			// deadline; a refusal is final.
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() || ctx.Err() != nil {
				return fmt.Errorf("dsm: slice %d: handshake with slice %d at %s: %w", t.cfg.ID, j, t.cfg.Addrs[j], err)
			}
			t.log.Warn("dsm handshake timed out; retrying", "peer", j, "addr", t.cfg.Addrs[j])
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("dsm: slice %d: connecting to slice %d at %s: %w", t.cfg.ID, j, t.cfg.Addrs[j], err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (t *Transport) acceptLoop() {
	defer t.wg.Done()
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if !t.closing.Load() {
				t.log.Error("dsm accept failed", "err", err)
			}
			return
		}
		go func() {
			fr := NewFrameReader(c)
			j, err := acceptHandshake(c, fr, t.cfg.Secret, t.cfg.VMID, t.cfg.ID, len(t.cfg.Addrs), t.cfg.PeerTimeout)
			if err == nil {
				err = t.add(j, c, fr)
			}
			if err != nil {
				t.Refused.Add(1)
				t.log.Warn("dsm connection refused", "remote", c.RemoteAddr().String(), "err", err)
				c.Close()
			}
		}()
	}
}

func (t *Transport) add(j int, c net.Conn, fr *FrameReader) error {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.peers[j] != nil {
		return fmt.Errorf("dsm: slice %d already connected", j)
	}
	t.peers[j] = &peer{id: j, conn: c, fr: fr, eof: make(chan struct{})}
	t.nconn++
	t.log.Debug("dsm peer connected", "peer", j, "remote", c.RemoteAddr().String())
	if t.nconn == len(t.cfg.Addrs)-1 {
		close(t.connected)
	}
	return nil
}

// Start begins delivering messages to h and sending heartbeats. It fails
// if a connection cannot be detached from Go's poller (see sock).
func (t *Transport) Start(h Handler) error {
	for _, p := range t.peers {
		if p == nil {
			continue
		}
		s, err := detach(p.conn, t.cfg.PeerTimeout, t.cfg.BusyPoll)
		if err != nil {
			return fmt.Errorf("dsm: slice %d: connection to slice %d: %w", t.cfg.ID, p.id, err)
		}
		p.wmu.Lock()
		p.sock = s
		p.wmu.Unlock()
	}
	t.h = h
	t.started.Store(true)
	for _, p := range t.peers {
		if p != nil {
			t.wg.Add(1)
			go t.readLoop(p)
		}
	}
	t.wg.Add(1)
	go t.heartbeats()
	return nil
}

func (t *Transport) readLoop(p *peer) {
	defer t.wg.Done()
	defer close(p.eof)
	// A dedicated thread: a message wakes it directly (see sock).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// The handshake read exact frames, so nothing is buffered yet: from
	// here on read through a buffer (header and payload in one system
	// call).
	fr := NewFrameReader(bufio.NewReaderSize(countingReader{p.sock, &t.BytesReceived}, 64<<10))
	for {
		m, err := fr.Read()
		if err != nil {
			if errors.Is(err, errSilent) {
				err = fmt.Errorf("no message for %v", t.cfg.PeerTimeout)
			}
			t.fail(p.id, fmt.Errorf("connection to slice %d lost: %w", p.id, err))
			return
		}
		switch m.Type {
		case MsgHeartbeat:
			continue
		case MsgError:
			t.fail(p.id, fmt.Errorf("slice %d reported an error: %s (code %d)", p.id, m.Text, m.Code))
			return
		case MsgHello, MsgChallenge, MsgProof, MsgWelcome:
			t.fail(p.id, fmt.Errorf("%w: slice %d sent %v after the handshake", ErrProtocol, p.id, m.Type))
			return
		}
		t.h.Deliver(p.id, &m)
	}
}

func (t *Transport) heartbeats() {
	defer t.wg.Done()
	tick := time.NewTicker(t.cfg.Heartbeat)
	defer tick.Stop()
	hb := Msg{Type: MsgHeartbeat}
	for {
		select {
		case <-t.done:
			return
		case <-tick.C:
			for _, p := range t.peers {
				if p != nil {
					if err := t.sendPeer(p, &hb); err != nil {
						t.fail(p.id, err)
					}
				}
			}
		}
	}
}

func (t *Transport) fail(j int, err error) {
	if t.closing.Load() || !t.failed.CompareAndSwap(false, true) {
		return
	}
	t.log.Error("dsm peer failed", "peer", j, "err", err)
	// Tell the others why, so their errors name the slice that was lost
	// rather than this one closing.
	for _, p := range t.peers {
		if p != nil && p.id != j {
			t.sendPeer(p, &Msg{Type: MsgError, Code: CodePeerLost, Text: err.Error()})
		}
	}
	if t.h != nil {
		t.h.PeerFailed(j, err)
	}
}

func (t *Transport) sendPeer(p *peer, m *Msg) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	var err error
	if p.wbuf, err = AppendFrame(p.wbuf[:0], m); err != nil {
		return err
	}
	if p.sock == nil {
		// Before Start (the failure notice of a refused peer).
		p.conn.SetWriteDeadline(time.Now().Add(t.cfg.PeerTimeout))
		_, err = p.conn.Write(p.wbuf)
	} else if err = p.sock.writeAll(p.wbuf); err == nil {
		t.BytesSent.Add(int64(len(p.wbuf)))
	}
	if err != nil {
		return fmt.Errorf("sending %v to slice %d: %w", m.Type, p.id, err)
	}
	return nil
}

// Send sends m to slice `to`. A message to self is delivered synchronously.
func (t *Transport) Send(to int, m *Msg) error {
	if to == t.cfg.ID {
		t.h.Deliver(to, m)
		return nil
	}
	if to < 0 || to >= len(t.peers) || t.peers[to] == nil {
		return fmt.Errorf("dsm: no connection to slice %d", to)
	}
	return t.sendPeer(t.peers[to], m)
}

// N is the number of slices; ID this slice's id.
func (t *Transport) N() int  { return len(t.cfg.Addrs) }
func (t *Transport) ID() int { return t.cfg.ID }

// SetClosing makes later connection failures expected (orderly shutdown).
func (t *Transport) SetClosing() { t.closing.Store(true) }

// WaitPeerClosed waits until peer j's connection reaches EOF or the
// timeout passes.
func (t *Transport) WaitPeerClosed(j int, timeout time.Duration) {
	if p := t.peers[j]; p != nil && t.started.Load() {
		select {
		case <-p.eof:
		case <-time.After(timeout):
		}
	}
}

// Close tears the mesh down.
func (t *Transport) Close() error {
	t.closing.Store(true)
	t.closeOnce.Do(func() {
		close(t.done)
		t.ln.Close()
		t.mu.Lock()
		for _, p := range t.peers {
			if p != nil {
				if p.sock != nil {
					p.sock.shutdown()
				}
				p.conn.Close()
			}
		}
		t.mu.Unlock()
		t.wg.Wait()
		for _, p := range t.peers {
			if p != nil && p.sock != nil {
				p.wmu.Lock()
				p.sock.close()
				p.sock = nil
				p.wmu.Unlock()
			}
		}
	})
	return nil
}

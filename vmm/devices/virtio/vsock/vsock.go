// Package vsock is a virtio-vsock device (virtio 1.x §5.10) with a
// Firecracker-style hybrid backend: guest stream sockets are bridged to Unix
// domain sockets on the host.
//
//   - Host to guest: a client connects to the Unix socket Config.Path,
//     writes "CONNECT <port>\n"; the device opens a connection to the
//     guest's <port> and, once the guest accepts, answers "OK <hostport>\n".
//     After that the Unix connection carries the stream.
//   - Guest to host: a guest connect() to CID 2 port N is bridged to the
//     Unix socket "<Config.Path>_N"; if nothing listens there the guest's
//     connect is refused (RST).
//
// All connection state is owned by one event-loop goroutine; per
// connection, one goroutine reads the Unix socket and one writes it, so
// neither vCPU threads nor the loop ever block on host I/O.
package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hpcvm/hpcvm/vmm/devices/virtio"
)

// Queue indices.
const (
	rxQueue    = 0
	txQueue    = 1
	eventQueue = 2
	queueSize  = 256

	// eventTransportReset is VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
	eventTransportReset = 0
)

// Config configures the device.
type Config struct {
	// Path is the Unix socket the device listens on for host clients; guest
	// connections to host port N go to Path + "_N".
	Path string
	// GuestCID is the guest's context ID (DefaultGuestCID if zero).
	GuestCID uint64
	// BufAlloc is the receive buffer the device advertises per connection
	// for guest-to-host data (256 KiB if zero).
	BufAlloc uint32
	// ConnectTimeout bounds how long a host client waits for the guest to
	// accept (2 s if zero).
	ConnectTimeout time.Duration
	// HandshakeTimeout bounds how long a host client may take to send its
	// CONNECT line (5 s if zero).
	HandshakeTimeout time.Duration
	Log              *slog.Logger
}

// Device is the virtio-vsock device. Wrap it with virtio.NewMMIO.
type Device struct {
	cfg Config
	log *slog.Logger
	ln  *net.UnixListener

	events chan func()
	kick   chan struct{}
	stop   chan struct{}
	wg     sync.WaitGroup
	once   sync.Once

	hsMu       sync.Mutex
	handshakes map[net.Conn]struct{}

	// Owned by the event loop.
	env        *virtio.Env
	conns      map[key]*conn
	ctrl       []ctrlPacket
	nextPort   uint32
	needTReset bool
}

// key identifies a connection: the host-side port and the guest-side port.
type key struct{ local, peer uint32 }

type ctrlPacket struct {
	key   key
	op    uint16
	flags uint32
}

var _ virtio.Device = (*Device)(nil)

// New starts listening on cfg.Path and starts the device's event loop.
func New(cfg Config) (*Device, error) {
	if cfg.GuestCID == 0 {
		cfg.GuestCID = DefaultGuestCID
	}
	if cfg.GuestCID <= HostCID || cfg.GuestCID >= 0xffffffff {
		return nil, fmt.Errorf("vsock: guest CID %d is reserved", cfg.GuestCID)
	}
	if cfg.BufAlloc == 0 {
		cfg.BufAlloc = 256 << 10
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 2 * time.Second
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 5 * time.Second
	}
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.Path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("vsock: listen on hybrid socket: %w", err)
	}
	d := &Device{
		cfg:        cfg,
		log:        log.With("vsock", cfg.Path),
		ln:         ln,
		events:     make(chan func(), 64),
		kick:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		handshakes: map[net.Conn]struct{}{},
		conns:      map[key]*conn{},
		nextPort:   1 << 30,
	}
	d.wg.Add(2)
	go d.run()
	go d.accept()
	return d, nil
}

// Type implements virtio.Device.
func (d *Device) Type() uint32 { return virtio.IDVsock }

// Features implements virtio.Device: stream sockets only.
func (d *Device) Features() uint64 { return 0 }

// QueueMaxSizes implements virtio.Device: rx, tx, event.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{queueSize, queueSize, queueSize} }

// ReadConfig implements virtio.Device: the config space is the le64 guest CID.
func (d *Device) ReadConfig(off uint64, data []byte) {
	clear(data)
	var c [8]byte
	binary.LittleEndian.PutUint64(c[:], d.cfg.GuestCID)
	if off < 8 {
		copy(data, c[off:])
	}
}

// WriteConfig implements virtio.Device; the CID is read-only.
func (d *Device) WriteConfig(off uint64, data []byte) {}

// Activate implements virtio.Device.
func (d *Device) Activate(env *virtio.Env) error {
	if env.Queues[rxQueue] == nil || env.Queues[txQueue] == nil {
		return errors.New("vsock: rx and tx queues must be enabled")
	}
	d.call(func() { d.env = env })
	return nil
}

// Notify implements virtio.Device: any kick makes the loop look at all
// queues.
func (d *Device) Notify(int) {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// Reset implements virtio.Device: every connection is dropped.
func (d *Device) Reset() {
	d.call(func() {
		if len(d.conns) > 0 {
			d.log.Info("vsock: the guest reset the device: dropping its connections", "connections", len(d.conns))
		}
		d.dropAll()
		d.env = nil
	})
}

// Close stops the loop, closes every connection and the listener (which
// removes the socket file).
func (d *Device) Close() error {
	var err error
	d.once.Do(func() {
		close(d.stop) // first, so accept knows the listener error is ours
		err = d.ln.Close()
		d.hsMu.Lock()
		for c := range d.handshakes {
			c.Close()
		}
		d.hsMu.Unlock()
		d.wg.Wait()
	})
	return err
}

// post runs f on the event loop; it reports false if the device is closed.
func (d *Device) post(f func()) bool {
	select {
	case d.events <- f:
		return true
	case <-d.stop:
		return false
	}
}

// call runs f on the event loop and waits for it.
func (d *Device) call(f func()) {
	done := make(chan struct{})
	if !d.post(func() { f(); close(done) }) {
		return
	}
	select {
	case <-done:
	case <-d.stop:
	}
}

func (d *Device) run() {
	defer d.wg.Done()
	for {
		select {
		case <-d.stop:
			d.dropAll()
			return
		case f := <-d.events:
			f()
		case <-d.kick:
		}
		d.process()
	}
}

func (d *Device) dropAll() {
	for _, c := range d.conns {
		d.remove(c)
	}
	d.ctrl = nil
}

// process moves packets between the queues and the connections.
func (d *Device) process() {
	env := d.env
	if env == nil || env.Failed() {
		return
	}
	if err := d.processTx(env); err != nil {
		env.Fail(err)
		return
	}
	if err := d.processRx(env); err != nil {
		env.Fail(err)
		return
	}
	if err := d.processEvents(env); err != nil {
		env.Fail(err)
	}
}

func (d *Device) processTx(env *virtio.Env) error {
	q := env.Queues[txQueue]
	did := false
	defer func() {
		if did {
			q.Signal()
		}
	}()
	for {
		c, err := q.Pop()
		if err != nil || c == nil {
			return err
		}
		h, payload, perr, err := readPacket(env, c)
		if err != nil {
			return err
		}
		if err := q.PushUsed(c.Head, 0); err != nil {
			return err
		}
		did = true
		if perr != nil {
			d.log.Warn("vsock: dropping malformed packet from guest", "err", perr)
			continue
		}
		d.fromGuest(h, payload)
	}
}

// readPacket reads a tx chain. perr is a malformed packet (dropped); err
// is a guest-memory fault (device needs reset).
func readPacket(env *virtio.Env, c *virtio.Chain) (h Header, payload []byte, perr, err error) {
	r := c.Reader(env.Mem)
	if r.Remaining() < HeaderLen {
		return h, nil, fmt.Errorf("tx chain has %d readable bytes, less than a header", r.Remaining()), nil
	}
	var hb [HeaderLen]byte
	if err := r.ReadFull(hb[:]); err != nil {
		return h, nil, nil, err
	}
	h, perr = DecodeHeader(hb[:])
	if perr != nil {
		return h, nil, perr, nil
	}
	if uint64(h.Len) > r.Remaining() {
		return h, nil, fmt.Errorf("header says %d payload bytes, chain has %d", h.Len, r.Remaining()), nil
	}
	if h.Op != OpRW || h.Len == 0 {
		return h, nil, nil, nil
	}
	payload = make([]byte, h.Len)
	if err := r.ReadFull(payload); err != nil {
		return h, nil, nil, err
	}
	return h, payload, nil, nil
}

// processRx fills guest rx buffers: control packets first, then data.
func (d *Device) processRx(env *virtio.Env) error {
	q := env.Queues[rxQueue]
	did := false
	defer func() {
		if did {
			q.Signal()
		}
	}()
	for {
		dc := d.dataReady()
		if len(d.ctrl) == 0 && dc == nil {
			return nil
		}
		ch, err := q.Pop()
		if err != nil || ch == nil {
			return err // nil chain: wait for the guest to add rx buffers
		}
		w := ch.Writer(env.Mem)
		room := w.Remaining()
		if room < HeaderLen {
			return fmt.Errorf("vsock: rx buffer of %d bytes cannot hold a packet header", room)
		}
		var h Header
		var payload []byte
		var drained *conn
		if len(d.ctrl) > 0 {
			p := d.ctrl[0]
			d.ctrl = d.ctrl[1:]
			h = d.header(p.key, p.op, p.flags, 0)
		} else {
			n := min(uint64(len(dc.pending)), uint64(dc.credit()), room-HeaderLen, MaxPayload)
			payload = dc.pending[:n]
			h = d.header(dc.key, OpRW, 0, uint32(n))
			dc.pending = dc.pending[n:]
			dc.txCnt += uint32(n)
			if len(dc.pending) == 0 {
				dc.pending = nil
				drained = dc
			}
		}
		var hb [HeaderLen]byte
		h.Encode(hb[:])
		if _, err := w.Write(hb[:]); err != nil {
			return err
		}
		if _, err := w.Write(payload); err != nil {
			return err
		}
		if drained != nil {
			// payload aliases the reader's buffer: only now may it refill it.
			drained.resumeReader()
			d.maybeShutdownSend(drained)
		}
		if err := q.PushUsed(ch.Head, w.Written()); err != nil {
			return err
		}
		did = true
	}
}

// dataReady returns a connection with host data the guest has credit for,
// asking for credit on behalf of stalled ones.
func (d *Device) dataReady() *conn {
	for _, c := range d.conns {
		if c.state != stateEstablished || len(c.pending) == 0 {
			continue
		}
		if c.peerShutdown&ShutdownRcv != 0 {
			c.pending = nil // the guest will not read it
			c.resumeReader()
			continue
		}
		if c.credit() > 0 {
			return c
		}
		if !c.creditRequested {
			c.creditRequested = true
			d.queue(c.key, OpCreditRequest, 0)
		}
	}
	return nil
}

func (d *Device) processEvents(env *virtio.Env) error {
	q := env.Queues[eventQueue]
	if !d.needTReset || q == nil {
		return nil
	}
	ch, err := q.Pop()
	if err != nil || ch == nil {
		return err
	}
	var ev [4]byte
	binary.LittleEndian.PutUint32(ev[:], eventTransportReset)
	w := ch.Writer(env.Mem)
	if _, err := w.Write(ev[:]); err != nil {
		return err
	}
	if err := q.PushUsed(ch.Head, w.Written()); err != nil {
		return err
	}
	d.needTReset = false
	q.Signal()
	return nil
}

// header builds a host-to-guest packet header for connection k, carrying
// the connection's current credit.
func (d *Device) header(k key, op uint16, flags, n uint32) Header {
	h := Header{SrcCID: HostCID, DstCID: d.cfg.GuestCID, SrcPort: k.local, DstPort: k.peer,
		Len: n, Type: TypeStream, Op: op, Flags: flags}
	if c := d.conns[k]; c != nil {
		h.BufAlloc, h.FwdCnt = d.cfg.BufAlloc, c.fwdCnt
		c.lastAdvFwd = c.fwdCnt
	}
	return h
}

func (d *Device) queue(k key, op uint16, flags uint32) {
	d.ctrl = append(d.ctrl, ctrlPacket{key: k, op: op, flags: flags})
}

// fromGuest handles one packet the guest sent.
func (d *Device) fromGuest(h Header, payload []byte) {
	if h.SrcCID != d.cfg.GuestCID || h.DstCID != HostCID {
		d.log.Warn("vsock: dropping packet with wrong CIDs", "src_cid", h.SrcCID, "dst_cid", h.DstCID)
		return
	}
	k := key{local: h.DstPort, peer: h.SrcPort}
	c := d.conns[k]
	if h.Op == OpRst {
		if c != nil {
			if c.state == stateEstablished {
				// Refusals (nothing listens yet) are routine while a guest boots; an
				// established connection reset by the guest is worth knowing about.
				d.log.Info("vsock: guest reset the connection", "host_port", k.local, "guest_port", k.peer)
			}
			d.remove(c)
		}
		return
	}
	if h.Type != TypeStream {
		d.queue(k, OpRst, 0)
		return
	}
	if c != nil {
		c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
		if c.credit() > 0 {
			c.creditRequested = false
		}
	}
	if h.Op == OpRequest {
		if c != nil {
			d.reset(c, "guest reused a live connection's ports")
			return
		}
		d.dial(k, h)
		return
	}
	if c == nil {
		d.queue(k, OpRst, 0)
		return
	}
	switch h.Op {
	case OpResponse:
		if c.state != stateConnecting {
			d.reset(c, "guest sent RESPONSE on a connection not being opened")
			return
		}
		c.timer.Stop()
		c.state = stateEstablished
		c.w.push(item{data: []byte(fmt.Sprintf("OK %d\n", k.local))})
		c.startReader(d)
	case OpRW:
		if c.state != stateEstablished || c.peerShutdown&ShutdownSend != 0 {
			d.reset(c, "guest sent data on a connection not open for it")
			return
		}
		c.rxCnt += h.Len
		if c.rxCnt-c.fwdCnt > d.cfg.BufAlloc {
			d.reset(c, "guest overran the advertised receive buffer")
			return
		}
		if len(payload) > 0 {
			c.w.push(item{data: payload, counts: true})
		}
	case OpCreditUpdate:
	case OpCreditRequest:
		d.queue(k, OpCreditUpdate, 0)
	case OpShutdown:
		c.peerShutdown |= h.Flags & (ShutdownRcv | ShutdownSend)
		if h.Flags&ShutdownSend != 0 && !c.closeWriteQueued {
			c.closeWriteQueued = true
			c.w.push(item{closeWrite: true})
		}
		d.maybeFinish(c)
	default:
		d.reset(c, fmt.Sprintf("guest sent unknown operation %d", h.Op))
	}
}

// maybeShutdownSend tells the guest the host stopped sending, once all the
// host's data has been delivered.
func (d *Device) maybeShutdownSend(c *conn) {
	if c.hostEOF && len(c.pending) == 0 && !c.shutdownSent {
		c.shutdownSent = true
		d.queue(c.key, OpShutdown, ShutdownSend)
		d.maybeFinish(c)
	}
}

// maybeFinish closes a connection both sides are done with: after the
// guest's remaining data reaches the host, the device sends RST.
func (d *Device) maybeFinish(c *conn) {
	both := c.peerShutdown == ShutdownRcv|ShutdownSend
	if (both || c.peerShutdown&ShutdownSend != 0 && c.shutdownSent) && !c.finishQueued {
		c.finishQueued = true
		c.w.push(item{finish: true})
	}
}

// reset aborts c towards the guest (RST) and the host (close). A reason
// other than "" is a protocol or I/O problem worth a warning.
func (d *Device) reset(c *conn, reason string) {
	if reason != "" {
		d.log.Warn("vsock: resetting connection: "+reason, "host_port", c.key.local, "guest_port", c.key.peer)
	}
	d.queue(c.key, OpRst, 0)
	d.remove(c)
}

func (d *Device) remove(c *conn) {
	if d.conns[c.key] == c {
		delete(d.conns, c.key)
	}
	c.close()
}

// dial handles a guest connect to host port h.DstPort.
func (d *Device) dial(k key, h Header) {
	c := newConn(k, stateDialing)
	c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
	d.conns[k] = c
	path := fmt.Sprintf("%s_%d", d.cfg.Path, k.local)
	go func() {
		nc, err := net.DialTimeout("unix", path, d.cfg.ConnectTimeout)
		if !d.post(func() { d.dialed(c, nc, err, path) }) && nc != nil {
			nc.Close()
		}
	}()
}

func (d *Device) dialed(c *conn, nc net.Conn, err error, path string) {
	if d.conns[c.key] != c {
		if nc != nil {
			nc.Close() // the guest gave up meanwhile
		}
		return
	}
	if err != nil {
		d.log.Info("vsock: guest connection refused: nothing listens on the host socket", "path", path, "guest_port", c.key.peer, "err", err)
		d.reset(c, "")
		return
	}
	c.state = stateEstablished
	c.attach(d, nc, nc)
	c.startReader(d)
	d.queue(c.key, OpResponse, 0)
}

// hostConnect starts a host-initiated connection to guest port port.
func (d *Device) hostConnect(hc *handshake) {
	if d.env == nil {
		// Expected while the guest boots (clients poll until its agent is up): debug, not a warning.
		d.log.Debug("vsock: closing host connection: the guest's vsock driver is not ready", "port", hc.port)
		hc.nc.Close()
		return
	}
	k, ok := d.allocPort(hc.port)
	if !ok {
		d.log.Error("vsock: closing host connection: no free host port")
		hc.nc.Close()
		return
	}
	c := newConn(k, stateConnecting)
	c.attach(d, hc.nc, hc.r)
	d.conns[k] = c
	c.timer = time.AfterFunc(d.cfg.ConnectTimeout, func() {
		d.post(func() {
			if d.conns[k] == c && c.state == stateConnecting {
				// Common while a guest boots and clients poll for its agent: debug.
				d.log.Debug("vsock: guest did not accept the connection in time", "guest_port", k.peer, "timeout", d.cfg.ConnectTimeout)
				d.reset(c, "")
			}
		})
	})
	d.queue(k, OpRequest, 0)
}

func (d *Device) allocPort(peer uint32) (key, bool) {
	for range 1 << 16 {
		p := d.nextPort
		d.nextPort++
		if d.nextPort == 0 {
			d.nextPort = 1 << 30
		}
		k := key{local: p, peer: peer}
		if d.conns[k] == nil {
			return k, true
		}
	}
	return key{}, false
}

// Host-side events, posted by connection goroutines.

func (d *Device) hostData(c *conn, data []byte) {
	if d.conns[c.key] != c {
		return
	}
	c.pending = data
}

func (d *Device) hostEOFed(c *conn, err error) {
	if d.conns[c.key] != c {
		return
	}
	if err != nil {
		d.log.Debug("vsock: host read ended", "host_port", c.key.local, "err", err)
	}
	c.hostEOF = true
	d.maybeShutdownSend(c)
}

func (d *Device) forwarded(c *conn, n int) {
	if d.conns[c.key] != c {
		return
	}
	c.fwdCnt += uint32(n)
	unadvertised := c.fwdCnt - c.lastAdvFwd
	guestCredit := d.cfg.BufAlloc - (c.rxCnt - c.lastAdvFwd)
	if unadvertised >= d.cfg.BufAlloc/4 || (unadvertised > 0 && guestCredit < MaxPayload) {
		d.queue(c.key, OpCreditUpdate, 0)
		c.lastAdvFwd = c.fwdCnt // the update will carry at least this
	}
}

func (d *Device) hostWriteFailed(c *conn, err error) {
	if d.conns[c.key] != c {
		return
	}
	d.log.Info("vsock: host side of connection closed", "host_port", c.key.local, "guest_port", c.key.peer, "err", err)
	d.reset(c, "")
}

func (d *Device) finished(c *conn) {
	if d.conns[c.key] != c {
		return
	}
	d.reset(c, "")
}

// StateVersion is the current version of State.
const StateVersion = 1

// State is the vsock device state (version 1). Connections are not saved:
// after a restore the device sends the guest a TRANSPORT_RESET event, as
// the spec requires when connections are lost.
type State struct {
	Version  uint32
	GuestCID uint64
}

// State captures the device.
func (d *Device) State() State { return State{Version: StateVersion, GuestCID: d.cfg.GuestCID} }

// Restore checks s against this device and arranges for a TRANSPORT_RESET
// event once the transport re-activates the device.
func (d *Device) Restore(s State) error {
	if s.Version != StateVersion {
		return fmt.Errorf("vsock state version %d, want %d", s.Version, StateVersion)
	}
	if s.GuestCID != d.cfg.GuestCID {
		return fmt.Errorf("vsock restore: snapshot guest CID %d, device configured with %d", s.GuestCID, d.cfg.GuestCID)
	}
	d.call(func() { d.needTReset = true })
	return nil
}

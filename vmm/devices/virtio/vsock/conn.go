package vsock

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

const (
	stateConnecting  = iota // host-initiated, REQUEST sent, waiting for RESPONSE
	stateDialing            // guest-initiated, dialing the host's Unix socket
	stateEstablished        // data flows
)

// readChunk is how much host data a connection reads at a time; the reader
// waits until the loop has delivered it all to the guest before reading
// more, which bounds per-connection buffering.
const readChunk = 64 << 10

// conn is one bridged stream. Fields are owned by the event loop, except
// that the goroutines started by attach/startReader use nc, r, w, done and
// resume.
type conn struct {
	key   key
	state int
	nc    net.Conn
	r     io.Reader
	w     *hostWriter
	timer *time.Timer

	done      chan struct{}
	resume    chan struct{}
	closeOnce sync.Once

	// Host to guest.
	pending         []byte // read from the host, not yet given to the guest
	hostEOF         bool
	shutdownSent    bool
	txCnt           uint32 // payload bytes sent to the guest
	peerBufAlloc    uint32 // the guest's receive buffer
	peerFwdCnt      uint32 // bytes the guest has consumed
	creditRequested bool

	// Guest to host.
	rxCnt            uint32 // payload bytes received from the guest
	fwdCnt           uint32 // of which written to the host
	lastAdvFwd       uint32 // fwdCnt last told to the guest
	peerShutdown     uint32
	closeWriteQueued bool
	finishQueued     bool
}

func newConn(k key, state int) *conn {
	return &conn{key: k, state: state, done: make(chan struct{}), resume: make(chan struct{}, 1)}
}

// credit is how many more bytes the guest can take now.
func (c *conn) credit() uint32 {
	inFlight := c.txCnt - c.peerFwdCnt
	if inFlight >= c.peerBufAlloc {
		return 0
	}
	return c.peerBufAlloc - inFlight
}

// attach binds the host connection and starts its writer.
func (c *conn) attach(d *Device, nc net.Conn, r io.Reader) {
	c.nc, c.r = nc, r
	c.w = &hostWriter{wake: make(chan struct{}, 1)}
	go c.write(d)
}

func (c *conn) startReader(d *Device) { go c.read(d) }

func (c *conn) resumeReader() {
	select {
	case c.resume <- struct{}{}:
	default:
	}
}

func (c *conn) close() {
	c.closeOnce.Do(func() {
		close(c.done)
		if c.timer != nil {
			c.timer.Stop()
		}
		if c.nc != nil {
			c.nc.Close()
		}
	})
}

// read copies host data to the loop one chunk at a time.
func (c *conn) read(d *Device) {
	buf := make([]byte, readChunk)
	for {
		n, err := c.r.Read(buf)
		if n > 0 {
			// buf is not reused until the loop has drained it (resume).
			data := buf[:n]
			if !d.post(func() { d.hostData(c, data) }) {
				return
			}
			select {
			case <-c.resume:
			case <-c.done:
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			select {
			case <-c.done: // closed by us: nothing to report
			default:
				d.post(func() { d.hostEOFed(c, err) })
			}
			return
		}
	}
}

type item struct {
	data       []byte
	counts     bool // guest payload: advances fwd_cnt once written
	closeWrite bool // half-close the host connection
	finish     bool // everything is written: tell the loop
}

// hostWriter is an unbounded queue from the loop to the writer goroutine;
// the guest's credit (BufAlloc) bounds how much payload it can hold.
type hostWriter struct {
	mu    sync.Mutex
	items []item
	wake  chan struct{}
}

func (w *hostWriter) push(it item) {
	w.mu.Lock()
	w.items = append(w.items, it)
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *hostWriter) take(done <-chan struct{}) []item {
	for {
		w.mu.Lock()
		items := w.items
		w.items = nil
		w.mu.Unlock()
		if len(items) > 0 {
			return items
		}
		select {
		case <-w.wake:
		case <-done:
			return nil
		}
	}
}

func (c *conn) write(d *Device) {
	for {
		items := c.w.take(c.done)
		if items == nil {
			return
		}
		for _, it := range items {
			switch {
			case it.finish:
				d.post(func() { d.finished(c) })
				return
			case it.closeWrite:
				if cw, ok := c.nc.(interface{ CloseWrite() error }); ok {
					cw.CloseWrite()
				}
			default:
				if _, err := c.nc.Write(it.data); err != nil {
					select {
					case <-c.done:
					default:
						d.post(func() { d.hostWriteFailed(c, err) })
					}
					return
				}
				if it.counts {
					n := len(it.data)
					if !d.post(func() { d.forwarded(c, n) }) {
						return
					}
				}
			}
		}
	}
}

// handshake is a host client that sent a valid CONNECT line.
type handshake struct {
	nc   net.Conn
	r    io.Reader // the rest of the stream, including bytes read ahead
	port uint32
}

func (d *Device) accept() {
	defer d.wg.Done()
	for {
		nc, err := d.ln.Accept()
		if err != nil {
			select {
			case <-d.stop:
				return
			default:
			}
			d.log.Error("vsock: accept on hybrid socket", "err", err)
			// Back off instead of spinning on e.g. EMFILE.
			select {
			case <-d.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		d.hsMu.Lock()
		d.handshakes[nc] = struct{}{}
		d.hsMu.Unlock()
		go d.handshake(nc)
	}
}

// handshake reads and checks the CONNECT line, then hands the client to
// the loop.
func (d *Device) handshake(nc net.Conn) {
	done := func() {
		d.hsMu.Lock()
		delete(d.handshakes, nc)
		d.hsMu.Unlock()
	}
	nc.SetReadDeadline(time.Now().Add(d.cfg.HandshakeTimeout))
	br := bufio.NewReader(nc)
	line, err := readLine(br, MaxConnectLine)
	var port uint32
	if err != nil {
		err = fmt.Errorf("reading the CONNECT line (got %q): %w", line, err)
	} else {
		port, err = ParseConnect(line)
	}
	if err != nil {
		done()
		d.log.Warn("vsock: closing host connection: bad hybrid handshake (want \"CONNECT <port>\\n\")", "err", err)
		nc.Close()
		return
	}
	nc.SetReadDeadline(time.Time{})
	done()
	hc := &handshake{nc: nc, r: br, port: port}
	if !d.post(func() { d.hostConnect(hc) }) {
		nc.Close()
	}
}

// readLine reads up to and including '\n', at most max bytes.
func readLine(r *bufio.Reader, max int) (string, error) {
	var b []byte
	for len(b) < max {
		c, err := r.ReadByte()
		if err != nil {
			return string(b), err
		}
		b = append(b, c)
		if c == '\n' {
			return string(b), nil
		}
	}
	return string(b), fmt.Errorf("no newline within %d bytes", max)
}

package dsm

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// sock is an authenticated peer connection detached from Go's network
// poller: a duplicate of the TCP socket in blocking mode, read by one
// dedicated OS thread and written under the peer's lock with plain
// read(2)/write(2). A message arriving then wakes exactly the thread that
// handles it; through the poller it would first wake whichever thread
// sits in epoll_wait and then be scheduled (measured: docs/benchmarks.md).
// The kernel enforces the peer timeout: SO_RCVTIMEO (silence) and
// SO_SNDTIMEO (a peer that stopped reading).
type sock struct {
	fd   int
	spin time.Duration // busy-poll before a blocking read
}

// detach duplicates c's socket as a blocking sock. c itself is only
// closed afterwards (Close).
func detach(c net.Conn, timeout, spin time.Duration) (*sock, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil, fmt.Errorf("dsm: connection %T is not TCP", c)
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) { fd, derr = unix.Dup(int(f)) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dsm: dup socket: %w", derr)
	}
	s := &sock{fd: fd, spin: spin}
	// O_NONBLOCK belongs to the open file, shared with Go's descriptor,
	// which is not used for I/O any more.
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("dsm: blocking socket: %w", err)
	}
	tv := unix.NsecToTimeval(int64(timeout))
	for _, opt := range []int{unix.SO_RCVTIMEO, unix.SO_SNDTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("dsm: socket timeout: %w", err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("dsm: TCP_NODELAY: %w", err)
	}
	return s, nil
}

// errSilent is a read that timed out (SO_RCVTIMEO).
var errSilent = errors.New("read timed out")

// Read implements io.Reader: at most spin of non-blocking reads, then a
// blocking one.
func (s *sock) Read(b []byte) (int, error) {
	var until time.Time
	for {
		flags := 0
		if s.spin > 0 {
			if until.IsZero() {
				until = time.Now().Add(s.spin)
			}
			if time.Now().Before(until) {
				flags = unix.MSG_DONTWAIT
			}
		}
		n, _, err := unix.Recvfrom(s.fd, b, flags)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN && flags != 0:
			continue
		case err == unix.EAGAIN:
			return 0, errSilent
		case err != nil:
			return 0, &os.SyscallError{Syscall: "read", Err: err}
		case n == 0 && len(b) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

// writeAll writes b completely (a blocking socket may still write part
// of it when interrupted).
func (s *sock) writeAll(b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(s.fd, b)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return errors.New("write timed out (peer not reading)")
		case err != nil:
			return &os.SyscallError{Syscall: "write", Err: err}
		}
		b = b[n:]
	}
	return nil
}

// shutdown wakes a reader blocked in read(2) (it sees EOF) and makes
// later writes fail; close releases the descriptor once nobody uses it.
func (s *sock) shutdown() { unix.Shutdown(s.fd, unix.SHUT_RDWR) }
func (s *sock) close()    { unix.Close(s.fd) }

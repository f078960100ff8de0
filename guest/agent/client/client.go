// Package client is the host side of the agent protocol (package proto). Each
// call opens its own connection through a Dialer, so calls may run
// concurrently (a Signal while a Run streams output).
package client

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
)

// Dialer opens a new byte stream to the agent.
type Dialer func(ctx context.Context) (net.Conn, error)

// Client talks to one guest agent.
type Client struct {
	dial Dialer
}

// New returns a client that reaches the agent through dial.
func New(dial Dialer) *Client { return &Client{dial: dial} }

// HybridVsock returns a Dialer for a VMM's hybrid vsock Unix socket
// (Firecracker protocol): connect to udsPath, send "CONNECT <port>\n", read
// "OK <hostport>\n"; after that the stream is the guest connection.
func HybridVsock(udsPath string, port uint32) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", udsPath)
		if err != nil {
			return nil, fmt.Errorf("vsock %s: %w", udsPath, err)
		}
		stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
		defer stop()
		if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
			c.Close()
			return nil, fmt.Errorf("vsock %s: CONNECT %d: %w", udsPath, port, err)
		}
		// Read the reply a byte at a time: a buffered reader could swallow
		// the first bytes of the guest's stream.
		line, err := readLine(c, 64)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("vsock %s: CONNECT %d: %w", udsPath, port, err)
		}
		rest, ok := strings.CutPrefix(line, "OK ")
		if _, perr := strconv.ParseUint(rest, 10, 32); !ok || perr != nil {
			c.Close()
			return nil, fmt.Errorf("vsock %s: CONNECT %d: reply %q (is the agent listening on that port?)", udsPath, port, line)
		}
		if ctx.Err() != nil {
			c.Close()
			return nil, ctx.Err()
		}
		c.SetDeadline(time.Time{})
		return c, nil
	}
}

func readLine(r io.Reader, max int) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for len(b) < max {
		if _, err := io.ReadFull(r, one); err != nil {
			if err == io.EOF {
				err = errors.New("connection closed before reply (no listener on that port?)")
			}
			return "", err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
	return "", fmt.Errorf("reply longer than %d bytes", max)
}

// Unix returns a Dialer for a plain Unix socket (tests, or an agent run
// outside a VM with --listen unix:PATH).
func Unix(path string) Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
}

// conn is one request's connection after the handshake.
type conn struct {
	c  net.Conn
	fr *proto.Reader
	mu sync.Mutex // serialises writers
	hi proto.Hello
}

func (c *conn) frame(t proto.Type, p []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return proto.WriteFrame(c.c, t, p)
}

func (c *conn) msg(t proto.Type, m any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return proto.WriteMsg(c.c, t, m)
}

// open dials, handshakes and sends the request. The connection is closed
// when ctx is done, which unblocks every read and write on it.
func (cl *Client) open(ctx context.Context, t proto.Type, req any) (*conn, func(), error) {
	nc, err := cl.dial(ctx)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	done := func() { stop(); nc.Close() }
	c := &conn{c: nc, fr: proto.NewReader(bufio.NewReaderSize(nc, 128<<10))}
	fail := func(err error) (*conn, func(), error) {
		done()
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		return nil, nil, err
	}
	if err := c.msg(proto.THello, &proto.Hello{Protocol: proto.Name, Version: proto.Version}); err != nil {
		return fail(fmt.Errorf("agent hello: %w", err))
	}
	m, err := proto.ReadMsg(c.fr, proto.THello)
	if err != nil {
		return fail(fmt.Errorf("agent hello: %w", err))
	}
	c.hi = *m.(*proto.Hello)
	if err := c.msg(t, req); err != nil {
		return fail(fmt.Errorf("sending %s: %w", t, err))
	}
	return c, done, nil
}

// simple sends a request that is answered by one frame of type want.
func (cl *Client) simple(ctx context.Context, t proto.Type, req any, want proto.Type) (any, error) {
	c, done, err := cl.open(ctx, t, req)
	if err != nil {
		return nil, err
	}
	defer done()
	if want == proto.TOK {
		f, err := c.fr.ReadFrame()
		if err != nil {
			return nil, ctxErr(ctx, fmt.Errorf("%s: %w", t, err))
		}
		if f.Type == proto.TOK {
			return nil, nil
		}
		m, err := proto.Decode(f)
		if e, ok := m.(*proto.Error); ok && err == nil {
			return nil, e
		}
		return nil, fmt.Errorf("%s: unexpected %s reply (%v)", t, f.Type, err)
	}
	m, err := proto.ReadMsg(c.fr, want)
	if err != nil {
		return nil, ctxErr(ctx, err)
	}
	return m, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// PingInfo is the agent's answer to Ping.
type PingInfo struct {
	Agent    string        // agent build version
	Protocol int           // protocol version
	Time     time.Time     // guest clock
	Uptime   time.Duration // agent uptime
}

// Ping checks the agent answers.
func (cl *Client) Ping(ctx context.Context) (PingInfo, error) {
	c, done, err := cl.open(ctx, proto.TPing, &proto.Ping{})
	if err != nil {
		return PingInfo{}, err
	}
	defer done()
	m, err := proto.ReadMsg(c.fr, proto.TPong)
	if err != nil {
		return PingInfo{}, ctxErr(ctx, err)
	}
	p := m.(*proto.Pong)
	return PingInfo{Agent: p.Agent, Protocol: c.hi.Version, Time: time.Unix(0, p.TimeNano), Uptime: time.Duration(p.UptimeNS)}, nil
}

// WaitReady pings every interval until the agent answers or ctx ends (a
// booting guest's agent is not listening yet).
func (cl *Client) WaitReady(ctx context.Context, interval time.Duration) (PingInfo, error) {
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*interval+time.Second)
		info, err := cl.Ping(pctx)
		cancel()
		if err == nil {
			return info, nil
		}
		select {
		case <-ctx.Done():
			return PingInfo{}, fmt.Errorf("agent not ready: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(interval):
		}
	}
}

// Signal sends sig to the process group of a command the agent started.
func (cl *Client) Signal(ctx context.Context, pid int, sig syscall.Signal) error {
	_, err := cl.simple(ctx, proto.TSignal, &proto.Signal{PID: pid, Signal: int(sig)}, proto.TOK)
	return err
}

// Poweroff asks the guest to sync and power off (or reboot). It returns
// once the agent acknowledged; the VM stops shortly after.
func (cl *Client) Poweroff(ctx context.Context, reboot bool) error {
	_, err := cl.simple(ctx, proto.TPoweroff, &proto.Poweroff{Reboot: reboot}, proto.TOK)
	return err
}

// Freeze freezes the filesystems mounted at paths ("/" if none). With
// autoThaw > 0 the agent thaws them by itself if no Thaw comes in time.
func (cl *Client) Freeze(ctx context.Context, autoThaw time.Duration, paths ...string) error {
	_, err := cl.simple(ctx, proto.TFreeze, &proto.Freeze{Paths: paths, AutoThawNS: int64(autoThaw)}, proto.TOK)
	return err
}

// Thaw thaws the given filesystems, or everything the agent froze.
func (cl *Client) Thaw(ctx context.Context, paths ...string) error {
	_, err := cl.simple(ctx, proto.TThaw, &proto.Thaw{Paths: paths}, proto.TOK)
	return err
}

// SetClock sets the guest's real-time clock.
func (cl *Client) SetClock(ctx context.Context, t time.Time) error {
	_, err := cl.simple(ctx, proto.TSetClock, &proto.SetClock{UnixNano: t.UnixNano()}, proto.TOK)
	return err
}

// CopyOptions are a copied file's attributes.
type CopyOptions struct {
	Mode     uint32 // permission bits; 0 means 0644
	UID, GID uint32
	MkdirAll bool // create missing parent directories
}

// CopyIn writes everything from r to path in the guest, atomically (the
// file appears complete or not at all), and checks the agent's sha256.
func (cl *Client) CopyIn(ctx context.Context, path string, r io.Reader, o CopyOptions) error {
	if o.Mode == 0 {
		o.Mode = 0o644
	}
	req := &proto.CopyIn{Path: path, Mode: o.Mode, UID: o.UID, GID: o.GID, MkdirAll: o.MkdirAll}
	if err := req.Validate(); err != nil {
		return err
	}
	c, done, err := cl.open(ctx, proto.TCopyIn, req)
	if err != nil {
		return err
	}
	defer done()
	h := sha256.New()
	buf := make([]byte, proto.ChunkSize)
	var size int64
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			size += int64(n)
			if err := c.frame(proto.TData, buf[:n]); err != nil {
				return ctxErr(ctx, fmt.Errorf("copy-in %s: %w", path, err))
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return fmt.Errorf("copy-in %s: reading source: %w", path, rerr)
		}
	}
	if err := c.frame(proto.TDataEnd, nil); err != nil {
		return ctxErr(ctx, fmt.Errorf("copy-in %s: %w", path, err))
	}
	m, err := proto.ReadMsg(c.fr, proto.TCopyDone)
	if err != nil {
		return ctxErr(ctx, err)
	}
	d := m.(*proto.CopyDone)
	if want := hex.EncodeToString(h.Sum(nil)); d.Size != size || d.SHA256 != want {
		return fmt.Errorf("copy-in %s: agent wrote %d bytes sha256 %s, sent %d bytes sha256 %s", path, d.Size, d.SHA256, size, want)
	}
	return nil
}

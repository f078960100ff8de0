// Package server is the guest side of the agent protocol (package proto):
// it accepts connections on any net.Listener (AF_VSOCK in a guest, a Unix
// socket in tests) and serves one request per connection. Everything that
// touches the machine as a whole (clock, filesystem freeze, power) goes
// through small interfaces so tests can use fakes.
package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
)

// ClockSetter sets the system's real-time clock.
type ClockSetter interface {
	SetClock(t time.Time) error
}

// Freezer freezes and thaws one mounted filesystem.
type Freezer interface {
	Freeze(mountpoint string) error
	Thaw(mountpoint string) error
}

// Power stops the machine. It is called after the reply is sent and after
// every filesystem the agent froze was thawed; it need not return.
type Power interface {
	Poweroff(reboot bool) error
}

// Config is the server's configuration. Zero fields get safe defaults
// except Clock, Freezer and Power: a request needing a nil one fails.
type Config struct {
	Version string       // agent build version reported in Hello/Pong
	Logger  *slog.Logger // nil: slog.Default()
	Clock   ClockSetter
	Freezer Freezer
	Power   Power
	// DrainTimeout is how long to keep reading a command's stdout/stderr
	// after it exited: a background child holding the pipes open must not
	// keep the Exit from being reported forever. Default 5s.
	DrainTimeout time.Duration
	// HandshakeTimeout bounds the wait for the host's Hello. Default 30s.
	HandshakeTimeout time.Duration
	// DefaultPath is PATH when a command's environment is empty.
	DefaultPath string
}

// Server serves agent requests.
type Server struct {
	cfg   Config
	log   *slog.Logger
	start time.Time

	mu       sync.Mutex
	procs    map[int]struct{} // pids (= pgids) of running commands
	frozen   []string         // mount points frozen by us, in freeze order
	autoThaw *time.Timer
	conns    map[net.Conn]struct{}
}

// New returns a server with cfg.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	if cfg.DefaultPath == "" {
		cfg.DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	if cfg.Version == "" {
		cfg.Version = "dev"
	}
	return &Server{
		cfg: cfg, log: cfg.Logger, start: time.Now(),
		procs: map[int]struct{}{}, conns: map[net.Conn]struct{}{},
	}
}

// Serve accepts connections on l until ctx is done, then closes l and every
// open connection (which kills the commands they run) and returns ctx.Err().
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				s.closeAll()
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			s.closeAll()
			return fmt.Errorf("accept: %w", err)
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.ServeConn(ctx, c)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

func (s *Server) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
}

// frameWriter serialises frames from several goroutines onto one conn.
type frameWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (fw *frameWriter) frame(t proto.Type, p []byte) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return proto.WriteFrame(fw.w, t, p)
}

func (fw *frameWriter) msg(t proto.Type, m any) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return proto.WriteMsg(fw.w, t, m)
}

func (fw *frameWriter) fail(code string, format string, args ...any) error {
	return fw.msg(proto.TError, &proto.Error{Code: code, Message: fmt.Sprintf(format, args...)})
}

// ServeConn serves one connection: handshake, one request, close.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	defer c.Close()
	log := s.log.With("remote", c.RemoteAddr().String())
	fr := proto.NewReader(c)
	fw := &frameWriter{w: c}

	c.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	m, err := proto.ReadMsg(fr, proto.THello)
	if err != nil {
		log.Warn("handshake failed", "err", err)
		return
	}
	version := min(m.(*proto.Hello).Version, proto.Version)
	if version < proto.MinVersion {
		fw.fail(proto.CodeVersion, "host speaks protocol version %d, agent speaks %d to %d", version, proto.MinVersion, proto.Version)
		return
	}
	if err := fw.msg(proto.THello, &proto.Hello{Protocol: proto.Name, Version: version, Agent: s.cfg.Version}); err != nil {
		return
	}
	f, err := fr.ReadFrame()
	if err != nil {
		log.Warn("reading request", "err", err)
		return
	}
	c.SetReadDeadline(time.Time{})
	req, err := proto.Decode(f)
	if err != nil {
		fw.fail(proto.CodeInvalid, "%v", err)
		return
	}
	log = log.With("req", f.Type.String())
	switch r := req.(type) {
	case *proto.Ping:
		fw.msg(proto.TPong, &proto.Pong{Agent: s.cfg.Version, TimeNano: time.Now().UnixNano(), UptimeNS: int64(time.Since(s.start))})
	case *proto.Exec:
		s.exec(ctx, log, c, fr, fw, r, version)
	case *proto.Signal:
		s.signal(log, fw, r)
	case *proto.CopyIn:
		s.copyIn(log, fr, fw, r)
	case *proto.Freeze:
		s.freeze(log, fw, r)
	case *proto.Thaw:
		s.thaw(log, fw, r)
	case *proto.SetClock:
		s.setClock(log, fw, r)
	case *proto.Poweroff:
		s.poweroff(log, c, fw, r)
	default:
		fw.fail(proto.CodeInvalid, "%s is not a request", f.Type)
	}
}

func (s *Server) setClock(log *slog.Logger, fw *frameWriter, r *proto.SetClock) {
	if s.cfg.Clock == nil {
		fw.fail(proto.CodeInvalid, "this agent cannot set the clock")
		return
	}
	if err := s.cfg.Clock.SetClock(r.Time()); err != nil {
		log.Error("set clock", "err", err)
		fw.fail(errCode(err), "set clock: %v", err)
		return
	}
	log.Info("clock set", "time", r.Time().UTC())
	fw.frame(proto.TOK, nil)
}

func (s *Server) poweroff(log *slog.Logger, c net.Conn, fw *frameWriter, r *proto.Poweroff) {
	if s.cfg.Power == nil {
		fw.fail(proto.CodeInvalid, "this agent cannot power off")
		return
	}
	// Frozen filesystems would make the kernel's sync hang forever.
	if err := s.thawAll(); err != nil {
		log.Warn("thaw before poweroff", "err", err)
	}
	fw.frame(proto.TOK, nil)
	c.Close()
	log.Info("powering off", "reboot", r.Reboot)
	if err := s.cfg.Power.Poweroff(r.Reboot); err != nil {
		log.Error("poweroff", "err", err)
	}
}

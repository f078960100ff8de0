package server

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
)

// errCode maps an error to the protocol's error class.
func errCode(err error) string {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return proto.CodeNotFound
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EPERM):
		return proto.CodePermission
	case errors.Is(err, syscall.EBUSY):
		return proto.CodeBusy
	case errors.Is(err, syscall.EINVAL):
		return proto.CodeInvalid
	}
	return proto.CodeInternal
}

// lookPath resolves argv[0] like execvp, but with the command's own PATH
// (not the agent's) and relative to the command's directory.
func lookPath(name string, env []string, dir string) (string, error) {
	if strings.Contains(name, "/") {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		return p, checkExec(p)
	}
	pathVar := ""
	for _, e := range env {
		// The first PATH wins, as with getenv(3).
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			pathVar = v
			break
		}
	}
	for _, d := range filepath.SplitList(pathVar) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, name)
		if checkExec(p) == nil {
			return p, nil
		}
	}
	return "", &fs.PathError{Op: "exec", Path: name, Err: fs.ErrNotExist}
}

func checkExec(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return &fs.PathError{Op: "exec", Path: p, Err: fs.ErrPermission}
	}
	return nil
}

func (s *Server) exec(ctx context.Context, log *slog.Logger, c net.Conn, fr *proto.Reader, fw *frameWriter, r *proto.Exec, version int) {
	env := r.Env
	if len(env) == 0 {
		env = []string{"PATH=" + s.cfg.DefaultPath}
	}
	dir := r.Dir
	if dir == "" {
		dir = "/"
	}
	bin, err := lookPath(r.Argv[0], env, dir)
	if err != nil {
		fw.fail(errCode(err), "%v", err)
		return
	}

	// Pipes, not the socket, so the agent frames each stream separately.
	var files [3]*os.File
	var parentEnds []*os.File // closed by us once the child has them
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	var stdinW *os.File
	if r.Stdin {
		pr, pw, err := os.Pipe()
		if err != nil {
			fw.fail(proto.CodeInternal, "stdin pipe: %v", err)
			return
		}
		files[0], stdinW = pr, pw
	} else {
		devnull, err := os.Open(os.DevNull)
		if err != nil {
			fw.fail(proto.CodeInternal, "%v", err)
			return
		}
		files[0] = devnull
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		closeAll([]*os.File{files[0], stdinW})
		fw.fail(proto.CodeInternal, "stdout pipe: %v", err)
		return
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		closeAll([]*os.File{files[0], stdinW, outR, outW})
		fw.fail(proto.CodeInternal, "stderr pipe: %v", err)
		return
	}
	files[1], files[2] = outW, errW
	parentEnds = []*os.File{files[0], outW, errW}

	sys := &syscall.SysProcAttr{Setpgid: true}
	if r.Cred != nil {
		// Groups is set explicitly (empty by default) so a command run as
		// a user does not keep the agent's supplementary groups.
		groups := r.Cred.Groups
		if groups == nil {
			groups = []uint32{}
		}
		sys.Credential = &syscall.Credential{Uid: r.Cred.UID, Gid: r.Cred.GID, Groups: groups}
	}
	p, err := os.StartProcess(bin, r.Argv, &os.ProcAttr{Dir: dir, Env: env, Files: files[:], Sys: sys})
	closeAll(parentEnds)
	if err != nil {
		closeAll([]*os.File{stdinW, outR, errR})
		fw.fail(errCode(err), "start %s: %v", r.Argv[0], err)
		return
	}
	pid := p.Pid
	s.mu.Lock()
	s.procs[pid] = struct{}{}
	s.mu.Unlock()
	log = log.With("pid", pid, "argv0", r.Argv[0])
	log.Info("started")
	if err := fw.msg(proto.TStarted, &proto.Started{PID: pid}); err != nil {
		s.killGroup(pid)
	}

	// Host -> agent: stdin frames, and from version 2 signals. The host
	// keeps the connection open until it has read Exit, so EOF or an error
	// here means it went away: the command is killed rather than left
	// running unobserved.
	hostGone := make(chan struct{})
	go func() {
		defer close(hostGone)
		stdinOpen := stdinW != nil
		defer func() {
			if stdinOpen {
				stdinW.Close()
			}
		}()
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					s.killGroup(pid) // no-op once it exited
					log.Debug("host connection ended", "err", err)
				}
				return
			}
			switch f.Type {
			case proto.TStdin:
				if stdinOpen {
					if _, err := stdinW.Write(f.Payload); err != nil {
						// The command closed its stdin: drop the rest.
						stdinW.Close()
						stdinOpen = false
					}
				}
			case proto.TStdinClose:
				if stdinOpen {
					stdinW.Close()
					stdinOpen = false
				}
			case proto.TSignal:
				if version < 2 {
					log.Warn("signal frame on a version 1 exec stream: killing command")
					s.killGroup(pid)
					c.Close()
					return
				}
				// One-way: the host learns the outcome from Exit. A
				// malformed frame or another pid is logged, not obeyed.
				m, err := proto.Decode(f)
				if err != nil {
					log.Warn("in-band signal", "err", err)
					continue
				}
				if sig := m.(*proto.Signal); sig.PID != pid {
					log.Warn("in-band signal for another pid: ignored", "to", sig.PID)
				} else {
					s.signalGroup(log, pid, syscall.Signal(sig.Signal))
				}
			default:
				log.Warn("unexpected frame during exec: killing command", "type", f.Type)
				s.killGroup(pid)
				c.Close()
				return
			}
		}
	}()

	var pumps sync.WaitGroup
	pump := func(rd *os.File, t proto.Type) {
		defer pumps.Done()
		buf := make([]byte, proto.ChunkSize)
		for {
			n, err := rd.Read(buf)
			if n > 0 {
				if werr := fw.frame(t, buf[:n]); werr != nil {
					// Keep draining so the command never blocks on a
					// full pipe; it is being killed anyway.
					s.killGroup(pid)
				}
			}
			if err != nil {
				return
			}
		}
	}
	pumps.Add(2)
	go pump(outR, proto.TStdout)
	go pump(errR, proto.TStderr)

	st, werr := p.Wait()
	s.mu.Lock()
	delete(s.procs, pid)
	s.mu.Unlock()

	drained := make(chan struct{})
	go func() { pumps.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(s.cfg.DrainTimeout):
		log.Warn("output still open after exit (background child?): closing", "timeout", s.cfg.DrainTimeout)
	case <-ctx.Done():
	}
	// Closing the read ends unblocks the pumps if they are still reading.
	outR.Close()
	errR.Close()
	<-drained

	exit := &proto.Exit{Code: 255}
	if werr != nil {
		log.Error("wait", "err", werr)
	} else if ws, ok := st.Sys().(syscall.WaitStatus); ok {
		switch {
		case ws.Signaled():
			exit = &proto.Exit{Signal: int(ws.Signal()), CoreDumped: ws.CoreDump()}
		default:
			exit = &proto.Exit{Code: ws.ExitStatus()}
		}
	}
	log.Info("exited", "code", exit.Code, "signal", exit.Signal)
	fw.msg(proto.TExit, exit)
	// Let the host read Exit and close first; then our reader sees EOF.
	select {
	case <-hostGone:
	case <-time.After(s.cfg.HandshakeTimeout):
	}
	c.Close()
}

// signal delivers a signal to the process group of a running command.
func (s *Server) signal(log *slog.Logger, fw *frameWriter, r *proto.Signal) {
	ok, err := s.killRunning(r.PID, syscall.Signal(r.Signal))
	if !ok {
		fw.fail(proto.CodeNotFound, "no running command with pid %d", r.PID)
		return
	}
	if err != nil {
		fw.fail(errCode(err), "kill(-%d, %d): %v", r.PID, r.Signal, err)
		return
	}
	log.Info("signalled", "pid", r.PID, "signal", r.Signal)
	fw.frame(proto.TOK, nil)
}

// signalGroup delivers sig to a running command's process group; a command
// that already ended is not an error (the signal and the exit crossed).
func (s *Server) signalGroup(log *slog.Logger, pid int, sig syscall.Signal) {
	ok, err := s.killRunning(pid, sig)
	switch {
	case !ok:
		log.Info("in-band signal after exit: dropped", "signal", int(sig))
	case err != nil:
		log.Warn("in-band signal", "signal", int(sig), "err", err)
	default:
		log.Info("signalled", "signal", int(sig), "in_band", true)
	}
}

// killRunning sends sig to the process group of pid if it is a command
// this agent started and still runs (ok false otherwise). The waiter
// removes the pid right after reaping it; a pid is only reused after the
// whole pid space wrapped, so signalling a stranger's group in that window
// is not a practical risk.
func (s *Server) killRunning(pid int, sig syscall.Signal) (ok bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok = s.procs[pid]; ok {
		err = syscall.Kill(-pid, sig)
	}
	return ok, err
}

// killGroup SIGKILLs a command's process group if it is still running.
func (s *Server) killGroup(pid int) { s.killRunning(pid, syscall.SIGKILL) }

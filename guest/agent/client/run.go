package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/proto"
)

// Command is a command to run in the guest.
type Command struct {
	Argv  []string  // Argv[0] is looked up in Env's PATH
	Env   []string  // whole environment, KEY=VALUE; empty: PATH only
	Dir   string    // absolute working directory; empty: "/"
	Cred  *Cred     // nil: run as the agent (root)
	Stdin io.Reader // nil: /dev/null
}

// Cred is the identity a command runs as; Groups are the supplementary
// groups (none if empty).
type Cred struct {
	UID, GID uint32
	Groups   []uint32
}

// ExitStatus is how a command ended.
type ExitStatus struct {
	Code       int            // exit code if Signal == 0
	Signal     syscall.Signal // terminating signal, 0 if it exited
	CoreDumped bool
}

// ExitCode is the shell convention: the code, or 128+signal.
func (s ExitStatus) ExitCode() int {
	if s.Signal != 0 {
		return 128 + int(s.Signal)
	}
	return s.Code
}

func (s ExitStatus) String() string {
	if s.Signal != 0 {
		return fmt.Sprintf("killed by signal %d (%v)", int(s.Signal), s.Signal)
	}
	return fmt.Sprintf("exit status %d", s.Code)
}

// Process is a command started in the guest.
type Process struct {
	cl  *Client
	c   *conn // the Exec stream
	pid int
	// stdinOpen is set while stdin frames may still be sent: a signal
	// frame behind stdin the command does not read would wait with it.
	stdinOpen atomic.Bool
	done      chan struct{}
	st        ExitStatus
	err       error
}

// PID is the command's pid in the guest (also its process group).
func (p *Process) PID() int { return p.pid }

// Signal forwards sig to the command's process group. Once stdin is closed
// (or if there is none) an agent speaking protocol version 2 gets it on the
// command's own stream: one frame, no new connection, and it returns once the
// frame is written. Otherwise it goes on a connection of its own, which is
// never stuck behind stdin the command does not read.
func (p *Process) Signal(ctx context.Context, sig syscall.Signal) error {
	if p.c.hi.Version < 2 || p.stdinOpen.Load() {
		return p.cl.Signal(ctx, p.pid, sig)
	}
	m := &proto.Signal{PID: p.pid, Signal: int(sig)}
	if err := m.Validate(); err != nil {
		return err
	}
	select {
	case <-p.done:
		return fmt.Errorf("signal %v: the command already ended", sig)
	default:
	}
	if err := p.c.msg(proto.TSignal, m); err != nil {
		return ctxErr(ctx, fmt.Errorf("signal %v: %w", sig, err))
	}
	return nil
}

// Wait waits until the command ended and all its output was written.
func (p *Process) Wait() (ExitStatus, error) {
	<-p.done
	return p.st, p.err
}

// Done is closed when Wait would return.
func (p *Process) Done() <-chan struct{} { return p.done }

// Start starts cmd and streams its stdout and stderr to the writers (nil
// discards). If ctx ends first the connection is closed, which makes the
// agent SIGKILL the command's process group.
func (cl *Client) Start(ctx context.Context, cmd Command, stdout, stderr io.Writer) (*Process, error) {
	req := &proto.Exec{Argv: cmd.Argv, Env: cmd.Env, Dir: cmd.Dir, Stdin: cmd.Stdin != nil}
	if cmd.Cred != nil {
		req.Cred = &proto.Credential{UID: cmd.Cred.UID, GID: cmd.Cred.GID, Groups: cmd.Cred.Groups}
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	c, done, err := cl.open(ctx, proto.TExec, req)
	if err != nil {
		return nil, err
	}
	m, err := proto.ReadMsg(c.fr, proto.TStarted)
	if err != nil {
		done()
		return nil, ctxErr(ctx, err)
	}
	p := &Process{cl: cl, c: c, pid: m.(*proto.Started).PID, done: make(chan struct{})}
	if cmd.Stdin != nil {
		p.stdinOpen.Store(true)
		go func() {
			defer p.stdinOpen.Store(false)
			buf := make([]byte, proto.ChunkSize)
			for {
				n, err := cmd.Stdin.Read(buf)
				if n > 0 {
					if c.frame(proto.TStdin, buf[:n]) != nil {
						return // connection gone: the reader reports it
					}
				}
				if err != nil {
					// Any read error ends stdin: the command sees EOF.
					c.frame(proto.TStdinClose, nil)
					return
				}
			}
		}()
	}
	go func() {
		defer close(p.done)
		defer done()
		p.st, p.err = readOutput(c, stdout, stderr)
		if p.err != nil {
			p.err = ctxErr(ctx, p.err)
		}
	}()
	return p, nil
}

func readOutput(c *conn, stdout, stderr io.Writer) (ExitStatus, error) {
	var werr error
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return ExitStatus{}, fmt.Errorf("agent connection lost before exit status: %w", err)
		}
		switch f.Type {
		case proto.TStdout, proto.TStderr:
			w := stdout
			if f.Type == proto.TStderr {
				w = stderr
			}
			// A failing writer must not stop the stream: keep reading so
			// the exit status still arrives; report the error then.
			if werr == nil {
				if _, err := w.Write(f.Payload); err != nil {
					werr = fmt.Errorf("writing command %s: %w", f.Type, err)
				}
			}
		case proto.TExit, proto.TError:
			m, err := proto.Decode(f)
			if err != nil {
				return ExitStatus{}, err
			}
			if e, ok := m.(*proto.Error); ok {
				return ExitStatus{}, e
			}
			x := m.(*proto.Exit)
			return ExitStatus{Code: x.Code, Signal: syscall.Signal(x.Signal), CoreDumped: x.CoreDumped}, werr
		default:
			return ExitStatus{}, fmt.Errorf("unexpected %s frame while running a command", f.Type)
		}
	}
}

// Run starts cmd and waits for it. If ctx ends first the command is killed
// (SIGTERM through Signal, then the connection is dropped, which makes the
// agent SIGKILL it) and ctx.Err() is returned with whatever status arrived.
func (cl *Client) Run(ctx context.Context, cmd Command, stdout, stderr io.Writer) (ExitStatus, error) {
	// The stream lives on a context of its own so that on cancellation the
	// command gets a SIGTERM and a grace period before the hard kill.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	p, err := cl.Start(sctx, cmd, stdout, stderr)
	if err != nil {
		return ExitStatus{}, ctxErr(ctx, err)
	}
	select {
	case <-p.Done():
		return p.Wait()
	case <-ctx.Done():
	}
	tctx, tcancel := context.WithTimeout(context.Background(), 2*time.Second)
	p.Signal(tctx, syscall.SIGTERM)
	tcancel()
	select {
	case <-p.Done():
	case <-time.After(killGrace):
		cancel()
		<-p.Done()
	}
	st, _ := p.Wait()
	return st, ctx.Err()
}

// killGrace is how long Run waits after SIGTERM before the hard kill.
const killGrace = 10 * time.Second

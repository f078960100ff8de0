// Package imagevm boots an OS image from the image store as a VM on this
// node and connects to the guest agent inside it. It is what `hpcvm run`
// and the Slurm job launcher use to run commands in a job's chosen OS.
//
// The image is never written: the VM's disk is a copy-on-write view of the
// image's disk, its writes kept in a sparse overlay file in a per-VM work
// directory that is removed with the VM.
package imagevm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/client"
	"github.com/hpcvm/hpcvm/images"
	"github.com/hpcvm/hpcvm/vmm/linuxvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
)

// Config says which image to boot and how big the VM is.
type Config struct {
	Store    *images.Store
	Image    string
	CPUs     int
	MemBytes uint64
	// Verify checks the image's checksums before booting and refuses an
	// image that does not match its manifest (cached while the files are
	// unchanged, see verifyImage).
	Verify bool
	// WorkDir holds the VM's disk copy and sockets (default: a new
	// directory under os.TempDir()); it is removed by Close.
	WorkDir string
	// Console receives the guest's serial console (default: discarded; a
	// file in WorkDir keeps the tail for error messages either way).
	Console io.Writer
	// ExtraCmdline is appended to the image's kernel command line.
	ExtraCmdline string
	// BootTimeout bounds the wait for the agent (0: DefaultBootTimeout).
	BootTimeout time.Duration
	Logger      *slog.Logger
}

// VM is a booted image with a connected agent.
type VM struct {
	Agent *client.Client
	// BootTime is the time from Start until the agent answered.
	BootTime time.Duration

	cfg     Config
	dir     string
	ownDir  bool
	cancel  context.CancelFunc
	done    chan struct{}
	exit    machine.Exit
	runErr  error
	console string
}

// DefaultBootTimeout bounds a boot when no timeout is given. Minutes: a
// Debian image under nested virtualization takes ~2 minutes
// (docs/benchmarks.md). The job launcher uses it too.
const DefaultBootTimeout = 10 * time.Minute

// ErrUnknownImage is returned (wrapped) for an image the store lacks; the
// message lists the images that exist.
var ErrUnknownImage = errors.New("unknown image")

// Start boots the image and waits until its agent answers.
func Start(ctx context.Context, cfg Config) (*VM, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = DefaultBootTimeout
	}
	m, err := cfg.Store.Get(cfg.Image)
	if errors.Is(err, images.ErrNotFound) {
		return nil, fmt.Errorf("%w %q; available: %s", ErrUnknownImage, cfg.Image, available(cfg.Store))
	}
	if err != nil {
		return nil, err
	}
	if cfg.Verify {
		if err := verifyImage(ctx, cfg.Store, m); err != nil {
			return nil, err
		}
	}
	v := &VM{cfg: cfg, done: make(chan struct{})}
	if cfg.WorkDir == "" {
		if v.dir, err = os.MkdirTemp("", "hpcvm-vm-"); err != nil {
			return nil, err
		}
		v.ownDir = true
	} else {
		v.dir = cfg.WorkDir
	}
	ok := false
	defer func() {
		if !ok {
			v.Close()
		}
	}()
	v.console = filepath.Join(v.dir, "console.log")
	clog, err := os.Create(v.console)
	if err != nil {
		return nil, err
	}
	var out io.Writer = clog
	if cfg.Console != nil {
		out = io.MultiWriter(clog, cfg.Console)
	}
	sock := filepath.Join(v.dir, "vsock")
	lcfg := linuxvm.Config{
		Kernel:    cfg.Store.Path(cfg.Image, images.KernelFile),
		Initrd:    cfg.Store.Path(cfg.Image, images.InitrdFile),
		Cmdline:   strings.TrimSpace(m.Cmdline + " " + cfg.ExtraCmdline),
		CPUs:      cfg.CPUs,
		MemBytes:  cfg.MemBytes,
		Disks:     []linuxvm.Disk{{Path: cfg.Store.Path(cfg.Image, images.DiskFile), Overlay: filepath.Join(v.dir, "disk.overlay")}},
		VsockPath: sock, VsockCID: 3,
		Console: out, Logger: cfg.Logger,
	}
	if err := lcfg.Validate(); err != nil {
		clog.Close()
		return nil, err
	}
	runCtx, cancel := context.WithCancel(context.Background())
	v.cancel = cancel
	start := time.Now()
	go func() {
		defer close(v.done)
		defer clog.Close()
		v.exit, v.runErr = linuxvm.Run(runCtx, lcfg)
	}()

	port := m.AgentPort
	if port == 0 {
		port = 1024
	}
	v.Agent = client.New(client.HybridVsock(sock, port))
	wctx, wcancel := context.WithTimeout(ctx, cfg.BootTimeout)
	defer wcancel()
	ready := make(chan error, 1)
	go func() {
		// The socket appears once the VMM created the vsock device.
		ready <- WaitAgent(wctx, v.Agent)
	}()
	select {
	case err := <-ready:
		if err != nil {
			return nil, fmt.Errorf("image %s: guest agent did not answer: %w\n%s", cfg.Image, err, v.ConsoleTail(15))
		}
	case <-v.done:
		return nil, fmt.Errorf("image %s: the VM stopped while booting: %s\n%s", cfg.Image, v.exitReason(), v.ConsoleTail(15))
	}
	v.BootTime = time.Since(start)
	ok = true
	return v, nil
}

// agentPoll is how often WaitAgent pings the booting guest's agent and
// agentPingTimeout bounds one ping. A ping fails at once while the agent
// is not listening (the guest resets the connection; the VMM drops it if
// the guest does not answer within its connect timeout), so a generous
// bound costs nothing then; but an agent that is listening in a slow guest
// (nested virtualization, a loaded host, systemd starting everything else
// on the same vCPU) may take seconds to accept and answer, and with
// client.WaitReady's bound (2 s at a 200 ms interval) an agent slower than
// that is never found ready (TestWaitAgentSlowAgent). In the benchmark's
// runs the pings were not the bottleneck; this is a guard, not a speed-up.
const (
	agentPoll        = 200 * time.Millisecond
	agentPingTimeout = time.Minute
)

// WaitAgent pings a booting guest's agent until it answers or ctx ends.
// Use it rather than client.WaitReady, whose short ping bound misses slow
// agents (see agentPingTimeout).
func WaitAgent(ctx context.Context, cl *client.Client) error {
	for {
		pctx, cancel := context.WithTimeout(ctx, agentPingTimeout)
		_, err := cl.Ping(pctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("agent not ready: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(agentPoll):
		}
	}
}

// Done is closed when the VM has stopped.
func (v *VM) Done() <-chan struct{} { return v.done }

func (v *VM) exitReason() string {
	if v.runErr != nil {
		return v.runErr.Error()
	}
	return fmt.Sprintf("%s: %s", v.exit.Kind, v.exit.Reason)
}

// ConsoleTail returns the last n lines of the guest console.
func (v *VM) ConsoleTail(n int) string {
	b, err := os.ReadFile(v.console)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "guest console (last lines):\n  " + strings.Join(lines, "\n  ")
}

// Shutdown asks the guest to power off and waits for the VM to stop; after
// grace it stops the VM from outside.
func (v *VM) Shutdown(ctx context.Context, grace time.Duration) (machine.Exit, error) {
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := v.Agent.Poweroff(pctx, false)
	cancel()
	if err != nil {
		v.cfg.Logger.Debug("agent poweroff", "err", err)
	}
	select {
	case <-v.done:
	case <-time.After(grace):
		v.cancel()
		<-v.done
	case <-ctx.Done():
		v.cancel()
		<-v.done
	}
	return v.exit, v.runErr
}

// Close stops the VM if it still runs and removes its work directory.
func (v *VM) Close() error {
	if v.cancel != nil {
		v.cancel()
		<-v.done
	}
	if v.ownDir {
		return os.RemoveAll(v.dir)
	}
	return os.Remove(filepath.Join(v.dir, "disk.overlay"))
}

func available(s *images.Store) string {
	ms, err := s.List()
	if err != nil || len(ms) == 0 {
		return fmt.Sprintf("none in %s (build one with hpcvm image build debian12)", s.Dir)
	}
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
	}
	return strings.Join(names, ", ")
}

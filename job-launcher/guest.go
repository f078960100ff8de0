package launcher

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/client"
)

// Guest is a running VM as the launcher sees it: its agent, and its VMM
// processes on every node.
type Guest interface {
	// Agent reaches the guest agent (it may not be listening yet).
	Agent() *client.Client
	// Done is closed when the VMM (any slice) has ended on its own.
	Done() <-chan struct{}
	// Err says why Done was closed.
	Err() error
	// Stop stops the VM and returns when every VMM process of every slice
	// is gone (or ctx ends).
	Stop(ctx context.Context) error
}

// Booter starts the VMM slices of a plan.
type Booter interface {
	Boot(ctx context.Context, p *Plan) (Guest, error)
}

// innerEnv marks the steps the launcher starts itself, so that the plugin
// leaves them alone (slurm-spank/task.c).
const innerEnv = "HPCVM_LAUNCH_INNER=1"

// SrunBooter starts one slice per node with
// `srun --overlap --nodes=N --ntasks=N --ntasks-per-node=1 hpcvm launch slice`:
// a new step of the job on the same resources, so Slurm accounts for it,
// signals it on scancel and walltime, and kills it with the job.
type SrunBooter struct {
	Srun    string   // srun binary (default "srun")
	Hpcvm   string   // the hpcvm binary the slices run (`hpcvm launch slice`)
	Environ []string // the task's environment
	LogFile string   // the slices' stdout and stderr (default: the runtime directory's vmm.log)
	Log     *slog.Logger
}

// SliceEnv is the environment for the slice step: the job's, without the
// hpcvm options Slurm would otherwise pass on (the slices are not VM jobs),
// marked as inner.
func SliceEnv(environ []string) []string {
	var out []string
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		// The options reach a step's environment as
		// SLURM_SPANK__SLURM_SPANK_OPTION_hpcvm_<opt> (22.05).
		if strings.Contains(k, "_SLURM_SPANK_OPTION_hpcvm_") || strings.HasPrefix(k, "SPANK_") || k == "HPCVM_LAUNCH_INNER" {
			continue
		}
		out = append(out, kv)
	}
	return append(out, innerEnv)
}

// Boot implements Booter.
func (b *SrunBooter) Boot(ctx context.Context, p *Plan) (Guest, error) {
	srun := b.Srun
	if srun == "" {
		srun = "srun"
	}
	planArg, err := p.Encode()
	if err != nil {
		return nil, err
	}
	logFile := b.LogFile
	if logFile == "" {
		logFile = p.RuntimeDir + "/vmm.log"
	}
	if err := os.MkdirAll(p.RuntimeDir, 0o700); err != nil {
		return nil, fmt.Errorf("runtime directory: %w", err)
	}
	lf, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("VMM log: %w", err)
	}
	n := strconv.Itoa(len(p.Nodes))
	cmd := exec.Command(srun, "--overlap", "--nodes="+n, "--ntasks="+n, "--ntasks-per-node=1",
		"--nodelist="+strings.Join(p.Nodes, ","), "--kill-on-bad-exit=1", "--quiet", "--job-name=hpcvm-vmm",
		b.Hpcvm, "launch", "slice", "--plan", planArg)
	cmd.Env = SliceEnv(b.Environ)
	if len(p.Secret) > 0 {
		cmd.Env = append(cmd.Env, SecretEnv+"="+hex.EncodeToString(p.Secret))
	}
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Stdin = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("starting the VMM slices (%s): %w", srun, err)
	}
	g := &srunGuest{cmd: cmd, plan: p, logFile: logFile, done: make(chan struct{}), log: b.Log,
		agent: client.New(client.HybridVsock(p.VsockPath(), p.VM.AgentPort))}
	go func() {
		err := cmd.Wait()
		lf.Close()
		g.mu.Lock()
		if err == nil && !g.stopping {
			err = errors.New("the VM powered off")
		}
		g.err = err
		g.mu.Unlock()
		close(g.done)
	}()
	return g, nil
}

type srunGuest struct {
	cmd     *exec.Cmd
	plan    *Plan
	logFile string
	agent   *client.Client
	done    chan struct{}
	log     *slog.Logger

	mu       sync.Mutex
	err      error
	stopping bool
}

func (g *srunGuest) Agent() *client.Client { return g.agent }
func (g *srunGuest) Done() <-chan struct{} { return g.done }

func (g *srunGuest) Err() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.err == nil {
		return nil
	}
	return fmt.Errorf("VMM step: %w\n%s", g.err, tailFile(g.logFile, 15))
}

// Stop asks every slice to stop through srun, which forwards SIGUSR1 to
// the slice tasks as is (SIGTERM would make srun SIGKILL them, leaving their
// cgroups behind). If the step does not end in time: SIGTERM to srun (it
// kills the step), then SIGKILL to srun; Slurm kills what is left of the
// step with the job.
func (g *srunGuest) Stop(ctx context.Context) error {
	g.mu.Lock()
	g.stopping = true
	g.mu.Unlock()
	for _, s := range []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGUSR1, SliceStopGrace + 10*time.Second}, {syscall.SIGTERM, 15 * time.Second}, {syscall.SIGKILL, time.Minute}} {
		select {
		case <-g.done:
			return nil
		default:
		}
		if s.sig != syscall.SIGUSR1 {
			g.log.Warn("VMM step did not stop; signalling srun", "signal", s.sig)
		}
		if s.sig == syscall.SIGKILL {
			syscall.Kill(-g.cmd.Process.Pid, syscall.SIGKILL)
		} else {
			g.cmd.Process.Signal(s.sig)
		}
		select {
		case <-g.done:
			return nil
		case <-time.After(s.wait):
		case <-ctx.Done():
			return fmt.Errorf("stopping the VMM step: %w", ctx.Err())
		}
	}
	return errors.New("the VMM step (srun) did not exit after SIGKILL")
}

func tailFile(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	parts := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

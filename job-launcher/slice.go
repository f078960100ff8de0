package launcher

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// SliceTermDelay is how long a slice keeps its VM after Slurm's SIGTERM,
// waiting for the launcher's stop request (SIGUSR1) so that the guest
// command can handle the SIGTERM forwarded to it. Slurm's KillWait must be
// longer than SliceTermDelay + SliceStopGrace (27 s; Slurm's default
// KillWait is 30 s). A guest spread over nodes needs most of it: there the
// forwarded SIGTERM took more than 12 s to come back as the command's exit.
const SliceTermDelay = 22 * time.Second

// SliceStopGrace is how long a slice waits for its VMM after SIGTERM before
// SIGKILL.
const SliceStopGrace = 5 * time.Second

// RunSlice is one node's part of a VM (`hpcvm launch slice`), started by
// the launcher through srun on every node of the step. It creates the
// node's VMM cgroup (a child of its own cgroup, so within the job's
// limits); slice 0 runs the VM with `hpcvm vm run --stop-signal=SIGUSR1`
// (Plan.VMM, Plan.VMMArgs) inside that cgroup — or, for a distributed VM
// (Plan.Slices), every slice runs its part with `hpcvm slice` (Plan.SliceVMM,
// Plan.SliceArgs; the secret from SecretEnv in a 0600 file) — the job's writes to its disk
// going to a copy-on-write overlay file (Plan.DiskOverlay) that is removed
// at the end. When ctx ends (srun forwards SIGTERM when the launcher stops
// the step) the VMM is stopped and the cgroup, with anything left in it,
// removed. It returns the VMM's exit error, nil
// after a guest poweroff or a stop.
func RunSlice(ctx context.Context, p *Plan, index int, log *slog.Logger) (err error) {
	if index < 0 || index >= len(p.Nodes) {
		return fmt.Errorf("slice %d: the plan has %d node(s)", index, len(p.Nodes))
	}
	log = log.With("job", p.JobID, "step", p.StepID, "slice", index)
	if err := os.MkdirAll(p.RuntimeDir, 0o700); err != nil {
		return fmt.Errorf("slice %d: runtime directory: %w", index, err)
	}
	cg, err := NewCgroup(p.CgroupName(index), p.Cgroup)
	if err != nil {
		return fmt.Errorf("slice %d: VMM cgroup: %w", index, err)
	}
	log.Info("slice cgroup", "path", cg.Path())
	defer func() {
		if derr := cg.Destroy(); derr != nil {
			log.Warn("removing the VMM cgroup", "path", cg.Path(), "err", derr)
		}
		if index == 0 {
			if rerr := os.Remove(p.DiskOverlay()); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
				log.Warn("removing the disk overlay", "path", p.DiskOverlay(), "err", rerr)
			}
		}
	}()
	var argv []string
	switch {
	case p.Slices != nil:
		// Distributed: every node runs its slice of the VM.
		if len(p.SliceVMM) == 0 || len(p.Slices.Addrs) != len(p.Nodes) || len(p.Slices.Placement) != len(p.Nodes) {
			return fmt.Errorf("slice %d: the plan's slices do not match its %d node(s)", index, len(p.Nodes))
		}
		if err := p.writeSecret(os.Getenv); err != nil {
			return fmt.Errorf("slice %d: %w", index, err)
		}
		defer os.Remove(p.SecretFile())
		argv = append(append([]string(nil), p.SliceVMM...), p.SliceArgs(index)...)
	case index != 0:
		// Single-node VM: this slice holds its node for the VM and
		// stops with the step.
		<-ctx.Done()
		return nil
	default:
		argv = append(append([]string(nil), p.VMM...), p.VMMArgs()...)
	}

	if index == 0 {
		// Left over from an earlier run of this step: the VMM creates a
		// new overlay and refuses an existing one.
		os.Remove(p.DiskOverlay())
		os.Remove(p.VsockPath())
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = withoutEnv(os.Environ(), SecretEnv)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cg.Start(cmd); err != nil {
		return fmt.Errorf("slice %d: starting the VMM in its cgroup: %w", index, err)
	}
	log.Info("VMM started", "pid", cmd.Process.Pid, "cpus", p.VM.CPUs, "mem_mib", p.VM.MemBytes>>20, "console", p.ConsolePath(),
		"distributed", p.Slices != nil)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("slice %d: the VMM exited: %w (console: %s)", index, err, p.ConsolePath())
		}
		return nil
	case <-ctx.Done():
	}
	syscall.Kill(cmd.Process.Pid, VMMStopSignal)
	select {
	case <-done:
	case <-time.After(SliceStopGrace):
		log.Warn("VMM did not stop after its stop signal; killing it", "signal", VMMStopSignal, "grace", SliceStopGrace)
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	return nil
}

// removeRuntimeDir removes a step's runtime directory, refusing anything
// that is not below root (a bad plan must not delete elsewhere).
func removeRuntimeDir(root, dir string) error {
	rel, err := filepath.Rel(root, dir)
	if err != nil || rel == "." || rel == ".." || filepath.IsAbs(rel) || len(rel) >= 2 && rel[:2] == ".." {
		return errors.New("runtime directory " + dir + " is not below " + root)
	}
	return os.RemoveAll(dir)
}

// withoutEnv is environ without the variable key.
func withoutEnv(environ []string, key string) []string {
	var out []string
	for _, kv := range environ {
		if k, _, _ := strings.Cut(kv, "="); k != key {
			out = append(out, kv)
		}
	}
	return out
}

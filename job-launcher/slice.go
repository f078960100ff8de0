package launcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// SliceTermDelay is how long a slice keeps its VM after Slurm's SIGTERM,
// waiting for the launcher's stop request (SIGUSR1) so that the guest
// command can handle the SIGTERM forwarded to it. Slurm's KillWait must be
// longer than SliceTermDelay + SliceStopGrace.
const SliceTermDelay = 15 * time.Second

// SliceStopGrace is how long a slice waits for its VMM after SIGTERM before
// SIGKILL.
const SliceStopGrace = 5 * time.Second

// RunSlice is one node's part of a VM (`hpcvm launch slice`), started by
// the launcher through srun on every node of the step. It creates the
// node's VMM cgroup (a child of its own cgroup, so within the job's
// limits); slice 0 copies the image's disk and runs the VM with
// `hpcvm launch vmm` inside that cgroup. When ctx ends (srun forwards SIGTERM
// when the launcher stops the step) the VMM is stopped and the cgroup,
// with anything left in it, removed. It returns the VMM's exit error, nil
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
			os.Remove(p.DiskCopy())
		}
	}()
	if index != 0 {
		// Until the distributed VMM runs vCPUs and memory here, this
		// slice holds its node for the VM and stops with the step.
		<-ctx.Done()
		return nil
	}

	disk := ""
	if p.VM.Disk != "" && p.VM.DiskMode == DiskModeShared {
		disk = p.VM.Disk + ",ro"
	} else if p.VM.Disk != "" {
		start := time.Now()
		if err := copySparse(ctx, p.VM.Disk, p.DiskCopy()); err != nil {
			return fmt.Errorf("slice 0: copying the image disk: %w", err)
		}
		disk = p.DiskCopy()
		log.Info("disk copied", "from", p.VM.Disk, "to", disk, "took", time.Since(start).Round(time.Millisecond))
	}
	args := []string{"--kernel", p.VM.Kernel, "--cpus", strconv.Itoa(p.VM.CPUs),
		"--mem", fmt.Sprintf("%dMiB", p.VM.MemBytes>>20), "--cmdline", p.VM.Cmdline,
		"--vsock", p.VsockPath(), "--console", p.ConsolePath()}
	if p.VM.Initrd != "" {
		args = append(args, "--initrd", p.VM.Initrd)
	}
	if disk != "" {
		args = append(args, "--disk", disk)
	}
	os.Remove(p.VsockPath())
	cmd := exec.Command(p.VMM[0], append(p.VMM[1:], args...)...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cg.Start(cmd); err != nil {
		return fmt.Errorf("slice 0: starting the VMM in its cgroup: %w", err)
	}
	log.Info("VMM started", "pid", cmd.Process.Pid, "cpus", p.VM.CPUs, "mem_mib", p.VM.MemBytes>>20, "console", p.ConsolePath())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("slice 0: the VMM exited: %w (console: %s)", err, p.ConsolePath())
		}
		return nil
	case <-ctx.Done():
	}
	syscall.Kill(cmd.Process.Pid, syscall.SIGUSR1)
	select {
	case <-done:
	case <-time.After(SliceStopGrace):
		log.Warn("VMM did not stop after SIGUSR1; killing it", "grace", SliceStopGrace)
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	return nil
}

// copySparse copies src to dst keeping holes (cp --sparse=always, with a
// reflink when the file system can).
func copySparse(ctx context.Context, src, dst string) error {
	if _, err := exec.LookPath("cp"); err == nil {
		out, err := exec.CommandContext(ctx, "cp", "--reflink=auto", "--sparse=always", src, dst).CombinedOutput()
		if err != nil {
			return fmt.Errorf("cp %s %s: %v: %s", src, dst, err, out)
		}
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
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

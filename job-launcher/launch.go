package launcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hpcvm/hpcvm/guest/agent/client"
	"github.com/hpcvm/hpcvm/policies"
	"github.com/hpcvm/hpcvm/vmm/imagevm"
)

// Options are `hpcvm launch`'s settings: the plugin's plugstack arguments
// and the user's --vm-* options.
type Options struct {
	Wish
	PolicyDir  string
	ImageStore string
	RuntimeDir string // node-local root of per-step runtime directories
	Console    string // --vm-console: keep the guest console here
	DiskMode   string // DiskModeCopy (default) or DiskModeShared
	GuestDir   string // where the script is staged and run in the guest (default GuestDir)
	// GuestCPUDir is the guest's sysfs CPU directory (default
	// /sys/devices/system/cpu; tests with a fake guest change it).
	GuestCPUDir string
	// GuestProcDir is the guest's /proc (default /proc; tests change it).
	GuestProcDir string
	Batch        bool // the task is a batch script (argv[0] is staged into the guest)
	Argv         []string
	VMM          []string // the VMM command of the slices (Plan.VMM)
	// Span is SpanSingle (default) or SpanNodes: one distributed VM over
	// every node of a multi-node step, its slices running SliceVMM.
	Span     string
	SliceVMM []string

	// BootTimeout bounds boot to the agent answering (0: imagevm.DefaultBootTimeout).
	BootTimeout time.Duration
	// TermGrace is how long the guest command gets after a forwarded
	// SIGTERM before the VM is stopped (default 5 s; Slurm's KillWait
	// should be longer).
	TermGrace time.Duration
}

// Launcher runs one job step's task in a VM.
type Launcher struct {
	Opts    Options
	Env     *SlurmEnv
	Environ []string // the task's environment
	Policy  Policy
	Images  Images
	Booter  Booter
	// NodeAddrs returns the addresses the nodes reach each other at
	// (SpanNodes), e.g. slurm.conf's NodeAddr from scontrol.
	NodeAddrs func(ctx context.Context, nodes []string) ([]string, error)
	// Walltime returns the job's time limit in seconds (0: unknown).
	Walltime func(ctx context.Context) int64
	// Signals delivers the signals the task receives (SIGTERM, SIGINT,
	// SIGUSR1, SIGUSR2, SIGHUP, SIGCONT).
	Signals        <-chan os.Signal
	Stdout, Stderr io.Writer
	Log            *slog.Logger
}

// GuestDir is where the job script is staged in the guest and where it
// runs.
const GuestDir = "/tmp/hpcvm-job"

// Exit statuses of the launcher itself (the guest command's status is
// passed through).
const (
	ExitFailure = 1   // hpcvm could not run the job (message on stderr)
	ExitTermed  = 143 // stopped by SIGTERM (scancel, walltime) before the command ended
)

func (l *Launcher) failf(format string, args ...any) int {
	fmt.Fprintf(l.Stderr, "hpcvm: "+format+"\n", args...)
	return ExitFailure
}

// Run runs the step's task in a VM and returns the exit status for the
// step.
func (l *Launcher) Run(ctx context.Context) int {
	if l.Env.ProcID != 0 {
		// One VM per step: task 0 runs the command in it; the step's
		// other tasks have nothing to do.
		return 0
	}
	if len(l.Opts.Argv) == 0 {
		return l.failf("no command to run")
	}
	if l.Opts.BootTimeout == 0 {
		l.Opts.BootTimeout = imagevm.DefaultBootTimeout
	}
	if l.Opts.TermGrace == 0 {
		l.Opts.TermGrace = 5 * time.Second
		if l.Opts.Span == SpanNodes {
			// Across nodes the guest command's reaction to SIGTERM (a
			// trap's output) takes longer to come back; still under the
			// slices' own SliceTermDelay, after which they stop the VM.
			l.Opts.TermGrace = SliceTermDelay - 3*time.Second
		}
	}
	if l.Opts.GuestDir == "" {
		l.Opts.GuestDir = GuestDir
	}
	if l.Opts.GuestCPUDir == "" {
		l.Opts.GuestCPUDir = "/sys/devices/system/cpu"
	}
	if l.Opts.GuestProcDir == "" {
		l.Opts.GuestProcDir = "/proc"
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	eff, err := l.admit(ctx)
	if err != nil {
		var ref *RefusedError
		if errors.As(err, &ref) {
			fmt.Fprintln(l.Stderr, ref.Message)
			return ExitFailure
		}
		return l.failf("%v", err)
	}
	for _, w := range eff.Warnings {
		fmt.Fprintf(l.Stderr, "hpcvm: warning: %s\n", w)
	}
	img, err := l.Images.Lookup(eff.Image)
	if err != nil {
		return l.failf("%v", err)
	}
	step := l.Env.StepID
	if step == "" {
		step = "batch"
	}
	plan := &Plan{
		JobID: l.Env.JobID, Cluster: l.Env.Cluster, StepID: step, Nodes: l.Env.Nodes,
		RuntimeDir: filepath.Join(l.Opts.RuntimeDir, l.Env.JobID+"."+step),
		VM:         Shape(eff, img, l.Opts.Console, l.Opts.DiskMode), Cgroup: Limits(eff), VMM: l.Opts.VMM,
	}
	if l.Opts.Span == SpanNodes && len(plan.Nodes) > 1 {
		if err := l.spread(ctx, plan); err != nil {
			return l.failf("spreading the VM over %d nodes: %v", len(plan.Nodes), err)
		}
	}
	l.Log.Info("starting VM", "image", img.Name, "nodes", plan.Nodes, "cpus", plan.VM.CPUs, "mem_mib", plan.VM.MemBytes>>20,
		"distributed", plan.Slices != nil)
	guest, err := l.Booter.Boot(ctx, plan)
	if err != nil {
		return l.failf("%v", err)
	}
	defer func() {
		sctx, scancel := context.WithTimeout(context.Background(), time.Minute)
		defer scancel()
		if err := guest.Stop(sctx); err != nil {
			fmt.Fprintf(l.Stderr, "hpcvm: stopping the VM: %v\n", err)
		}
		if err := removeRuntimeDir(l.Opts.RuntimeDir, plan.RuntimeDir); err != nil {
			l.Log.Warn("removing the runtime directory", "err", err)
		}
	}()

	// Boot: until the agent answers, the VM stops, a signal, or timeout.
	bootCtx, bootCancel := context.WithTimeout(ctx, l.Opts.BootTimeout)
	defer bootCancel()
	ready := make(chan error, 1)
	go func() {
		ready <- imagevm.WaitAgent(bootCtx, guest.Agent())
	}()
	for booted := false; !booted; {
		select {
		case err := <-ready:
			if err != nil {
				return l.failf("the VM did not come up within %v: %v (console: %s)", l.Opts.BootTimeout, err, plan.ConsolePath())
			}
			booted = true
		case <-guest.Done():
			return l.failf("the VM stopped while booting: %v", guest.Err())
		case sig := <-l.Signals:
			if s, ok := sig.(syscall.Signal); ok && (s == syscall.SIGTERM || s == syscall.SIGINT || s == syscall.SIGHUP) {
				fmt.Fprintf(l.Stderr, "hpcvm: %v while the VM was booting; stopping it\n", s)
				return 128 + int(s)
			}
		}
	}
	bootCancel()
	l.Log.Info("guest agent ready")

	if plan.Slices != nil {
		// A spread guest boots on the home slice's vCPUs only (maxcpus=,
		// docs/dsm.md, "Linux guests"): bring the other nodes' vCPUs up
		// before the job starts, so it sees them all.
		start := time.Now()
		if err := l.guestRoot(ctx, guest.Agent(), "sh", "-c", onlineScript, "online", l.Opts.GuestCPUDir, l.Opts.GuestProcDir); err != nil {
			return l.failf("bringing the other nodes' vCPUs online: %v", err)
		}
		l.Log.Info("vCPUs online", "cpus", plan.VM.CPUs, "took", time.Since(start).Round(time.Millisecond))
	}
	if plan.VM.DiskMode == DiskModeShared {
		// Read-only root: give the job a writable /tmp.
		if err := l.guestRoot(ctx, guest.Agent(), "mount", "-t", "tmpfs", "-o", "mode=1777,size=50%", "tmpfs", "/tmp"); err != nil {
			return l.failf("preparing the guest: %v", err)
		}
	}
	cmd, err := l.stage(ctx, guest.Agent())
	if err != nil {
		return l.failf("%v", err)
	}
	if plan.Slices != nil {
		cmd.Argv = jobAffinity(cmd.Argv, plan.VM.CPUs)
	}
	p, err := guest.Agent().Start(ctx, cmd, l.Stdout, l.Stderr)
	if err != nil {
		return l.failf("starting %s in the guest: %v", cmd.Argv[0], err)
	}
	l.Log.Info("guest command started", "pid", p.PID())
	var grace <-chan time.Time
	for {
		select {
		case <-p.Done():
			st, err := p.Wait()
			if err != nil {
				// The agent's connection also ends when the VM stops (a
				// slice died, say): name that cause, not the lost connection.
				select {
				case <-guest.Done():
					return l.failf("the VM stopped while the job ran: %v", guest.Err())
				case <-time.After(vmStopWait):
				}
				return l.failf("running %s in the guest: %v", cmd.Argv[0], err)
			}
			l.Log.Info("guest command ended", "status", st)
			return st.ExitCode()
		case <-guest.Done():
			return l.failf("the VM stopped while the job ran: %v", guest.Err())
		case sig := <-l.Signals:
			s, ok := sig.(syscall.Signal)
			if !ok {
				continue
			}
			// The grace runs from the signal's arrival, as the slices'
			// SliceTermDelay does: forwarding it can take seconds.
			if s == syscall.SIGTERM && grace == nil {
				grace = time.After(l.Opts.TermGrace)
			}
			// Each signal is forwarded on its own connection, in the
			// background: the loop keeps watching the command and the
			// grace, and Slurm's SIGCONT (scancel sends it before SIGTERM)
			// does not hold SIGTERM up. A guest spread over nodes took
			// more than 5 s to accept the connection (debian12, 2 nodes),
			// so a forward may take as long as the grace.
			go func() {
				sctx, scancel := context.WithTimeout(ctx, max(signalForwardTimeout, l.Opts.TermGrace))
				defer scancel()
				if err := p.Signal(sctx, s); err != nil && ctx.Err() == nil {
					l.Log.Warn("forwarding a signal to the guest", "signal", s, "err", err)
				}
			}()
		case <-grace:
			fmt.Fprintf(l.Stderr, "hpcvm: the job did not end %v after SIGTERM; stopping the VM\n", l.Opts.TermGrace)
			return ExitTermed
		}
	}
}

// onlineScript confines every process of the guest (all threads; the
// guest agent, init and the daemons it starts later inherit it) to the
// CPUs online so far, the home slice's, then brings every offline CPU
// under the sysfs CPU directory $1 online, failing on the first that does
// not come up. $2 is the guest's /proc. Only the job (jobAffinity) may
// use the other slices' vCPUs: anything else moved there drags every
// page it touches across the network (in a run that did not pin the
// agent, the next agent request after onlining timed out). Kernel
// threads bound to one CPU refuse the new affinity; that is ignored.
const onlineScript = `set -e
home=$(cat "$1"/online)
for p in "$2"/[0-9]*; do
	[ -e "$p" ] || continue
	taskset -a -p -c "$home" "${p##*/}" >/dev/null 2>&1 || true
done
for f in "$1"/cpu[0-9]*/online; do
	[ -e "$f" ] || continue
	[ "$(cat "$f")" = 1 ] || echo 1 > "$f"
done`

// jobAffinity makes the job's command run with every vCPU of a spread VM
// allowed, as the agent that starts it is confined to the home slice's
// (onlineScript): taskset (util-linux, busybox) sets it and execs argv.
func jobAffinity(argv []string, cpus int) []string {
	return append([]string{"taskset", "-c", fmt.Sprintf("0-%d", cpus-1)}, argv...)
}

// signalForwardTimeout is the least time a signal forward to the guest
// command gets (the grace, when longer, bounds it instead).
const signalForwardTimeout = 5 * time.Second

// vmStopWait is how long a lost agent connection waits for the VM's own
// end, whose error says more.
const vmStopWait = 5 * time.Second

// guestRoot runs a preparation command in the guest as root.
func (l *Launcher) guestRoot(ctx context.Context, agent *client.Client, argv ...string) error {
	var out strings.Builder
	st, err := agent.Run(ctx, client.Command{Argv: argv}, &out, &out)
	if err != nil {
		return fmt.Errorf("%s: %w", strings.Join(argv, " "), err)
	}
	if st.ExitCode() != 0 {
		return fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), st, strings.TrimSpace(out.String()))
	}
	return nil
}

// admit asks the policy, with the VMM reserve the policy itself sets:
// first with the built-in reserve, again if the policy's differs and the
// memory was derived from the allocation.
func (l *Launcher) admit(ctx context.Context) (*policies.Effective, error) {
	var wall int64
	if l.Walltime != nil {
		wall = l.Walltime(ctx)
	}
	reserve := int64(builtinReserve)
	for attempt := 0; ; attempt++ {
		req, err := Request(l.Env, l.Opts.Wish, wall, reserve)
		if err != nil {
			return nil, err
		}
		eff, err := l.Policy.Admit(ctx, req)
		if err != nil {
			return nil, err
		}
		if l.Opts.Mem != "" || l.Env.MemPerNodeMiB == 0 || int64(eff.VMMReservePerNode) == reserve || attempt > 0 {
			return eff, nil
		}
		reserve = int64(eff.VMMReservePerNode)
	}
}

// stage copies the batch script into the guest and builds the command.
func (l *Launcher) stage(ctx context.Context, agent *client.Client) (client.Command, error) {
	argv := append([]string(nil), l.Opts.Argv...)
	uid, gid := os.Getuid(), os.Getgid()
	if l.Opts.Batch {
		f, err := os.Open(argv[0])
		if err != nil {
			return client.Command{}, fmt.Errorf("job script: %w", err)
		}
		defer f.Close()
		dst := path.Join(l.Opts.GuestDir, "slurm_script")
		if err := agent.CopyIn(ctx, dst, f, client.CopyOptions{Mode: 0o755, UID: uint32(uid), GID: uint32(gid), MkdirAll: true}); err != nil {
			return client.Command{}, fmt.Errorf("staging the job script into the guest: %w", err)
		}
		argv[0] = dst
	} else {
		// Make sure the working directory exists for an srun command.
		if err := agent.CopyIn(ctx, path.Join(l.Opts.GuestDir, ".hpcvm"), strings.NewReader(l.Env.JobID+"\n"),
			client.CopyOptions{UID: uint32(uid), GID: uint32(gid), MkdirAll: true}); err != nil {
			return client.Command{}, fmt.Errorf("preparing %s in the guest: %w", l.Opts.GuestDir, err)
		}
	}
	cmd := client.Command{Argv: argv, Env: GuestEnv(l.Environ, uid, l.Opts.GuestDir), Dir: l.Opts.GuestDir}
	if uid != 0 {
		cmd.Cred = &client.Cred{UID: uint32(uid), GID: uint32(gid)}
		if gs, err := os.Getgroups(); err == nil {
			for _, g := range gs {
				cmd.Cred.Groups = append(cmd.Cred.Groups, uint32(g))
			}
		}
	}
	return cmd, nil
}

// GuestEnv is the guest command's environment: the task's SLURM_*
// variables, the user's identity, and a PATH and HOME of the guest's.
func GuestEnv(environ []string, uid int, dir string) []string {
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PWD=" + dir, "HPCVM_GUEST=1"}
	if uid == 0 {
		env = append(env, "HOME=/root")
	} else {
		env = append(env, "HOME="+dir)
	}
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "SLURM_"), strings.HasPrefix(k, "SLURMD_"),
			k == "USER", k == "LOGNAME", k == "LANG", k == "LC_ALL", k == "TZ", k == "OMP_NUM_THREADS":
			env = append(env, kv)
		}
	}
	return env
}

// spread makes plan a distributed VM (SpanNodes): each node's slice runs
// the vCPUs of the CPUs Slurm allocated there, the slices meet at the
// nodes' addresses, and a fresh secret authenticates the mesh.
func (l *Launcher) spread(ctx context.Context, plan *Plan) error {
	if len(l.Opts.SliceVMM) == 0 || l.NodeAddrs == nil {
		return errors.New("this launcher cannot start VM slices (no slice VMM or node addresses)")
	}
	if len(l.Env.CPUsPerNode) != len(plan.Nodes) {
		return fmt.Errorf("Slurm gave CPUs for %d node(s), the step has %d", len(l.Env.CPUsPerNode), len(plan.Nodes))
	}
	placement, err := PlaceVCPUs(plan.VM.CPUs, l.Env.CPUsPerNode)
	if err != nil {
		return err
	}
	addrs, err := l.NodeAddrs(ctx, plan.Nodes)
	if err != nil {
		return fmt.Errorf("node addresses: %w", err)
	}
	if len(addrs) != len(plan.Nodes) {
		return fmt.Errorf("got %d node addresses for %d nodes", len(addrs), len(plan.Nodes))
	}
	port := SlicePort(plan.JobID, plan.StepID)
	s := &Slices{Placement: placement, VM: "slurm-" + plan.JobID + "." + plan.StepID}
	for _, a := range addrs {
		s.Addrs = append(s.Addrs, net.JoinHostPort(a, strconv.Itoa(port)))
	}
	if plan.Secret, err = newSecret(); err != nil {
		return err
	}
	plan.Slices, plan.SliceVMM = s, l.Opts.SliceVMM
	return nil
}

package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// HostOptions configures a HostCluster.
type HostOptions struct {
	Nodes  int    // default 2
	CPUs   int    // per node, default 2
	MemMiB int    // per node RealMemory, default 1000; also DefMemPerNode
	Dir    string // required: state, logs, config
	// SpankSO and Plugstack configure the hpcvm plugin (see Config).
	SpankSO   string
	Plugstack []string
	Logf      func(format string, args ...any)
}

// HostCluster is a Slurm cluster made of namespaces on this machine: the
// controller and munged in a "lab" network namespace holding the bridge
// (ControllerIP), each node's slurmd in its own network + UTS namespace
// (hostname nN, 10.77.0.(10+N)). Jobs run as processes of this machine.
type HostCluster struct {
	Config
	lab   *exec.Cmd   // holder of the lab namespace
	nodes []*exec.Cmd // holders of the node namespaces
	logf  func(string, ...any)
}

// Prerequisites reports what this machine lacks for a lab, or nil.
func Prerequisites() error {
	if os.Geteuid() != 0 {
		return errors.New("the Slurm lab needs root (namespaces, slurmd as root)")
	}
	for _, b := range []string{"slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo", "unshare", "nsenter", "ip"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%s not found: run `make slurm-deps` (Debian packages slurmctld slurmd slurm-client munge)", b)
		}
	}
	return accountingPrerequisites()
}

func nodeAddr(i int) string { return fmt.Sprintf("10.77.0.%d", 10+i) }

// holder starts a process in new network and UTS namespaces that keeps them
// alive; it dies with this process.
func holder() (*exec.Cmd, error) {
	h := exec.Command("sleep", "infinity")
	h.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWUTS,
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
	}
	if err := h.Start(); err != nil {
		return nil, fmt.Errorf("lab: creating namespaces: %w", err)
	}
	go h.Wait()
	return h, nil
}

// sizeDefaults fills a lab's unset sizes (2 nodes of 2 CPUs and memMiB
// MiB each) and logger (none).
func sizeDefaults(nodes, cpus, mem *int, memMiB int, logf *func(string, ...any)) {
	if *nodes <= 0 {
		*nodes = 2
	}
	if *cpus <= 0 {
		*cpus = 2
	}
	if *mem <= 0 {
		*mem = memMiB
	}
	if *logf == nil {
		*logf = func(string, ...any) {}
	}
}

// StartHost brings up a HostCluster and waits until every node is idle.
func StartHost(ctx context.Context, o HostOptions) (_ *HostCluster, err error) {
	if err := Prerequisites(); err != nil {
		return nil, err
	}
	sizeDefaults(&o.Nodes, &o.CPUs, &o.MemMiB, 1000, &o.Logf)
	if o.Dir == "" {
		return nil, errors.New("lab: HostOptions.Dir is required")
	}
	c := &HostCluster{logf: o.Logf}
	c.Config = Config{Dir: o.Dir, SpankSO: o.SpankSO, Plugstack: o.Plugstack,
		MungeSocket: filepath.Join(o.Dir, "munge", "munge.socket"), DefMemPerNodeMiB: o.MemMiB}
	for i := 1; i <= o.Nodes; i++ {
		c.Nodes = append(c.Nodes, NodeSpec{Name: fmt.Sprintf("n%d", i), Addr: nodeAddr(i), CPUs: o.CPUs, MemMiB: o.MemMiB})
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if err := c.write(); err != nil {
		return nil, err
	}
	if c.lab, err = holder(); err != nil {
		return nil, err
	}
	if err := c.inNS(ctx, c.lab, fmt.Sprintf("set -e; hostname ctl; ip link set lo up; ip link add br0 type bridge; "+
		"ip addr add %s/24 dev br0; ip link set br0 up", ControllerIP)); err != nil {
		return nil, err
	}
	for i, n := range c.Nodes {
		h, err := holder()
		if err != nil {
			return nil, err
		}
		c.nodes = append(c.nodes, h)
		veth := fmt.Sprintf("veth%d", i+1)
		if err := c.inNS(ctx, c.lab, fmt.Sprintf("set -e; ip link add %s type veth peer name eth0 netns %d; ip link set %s master br0; ip link set %s up",
			veth, h.Process.Pid, veth, veth)); err != nil {
			return nil, err
		}
		if err := c.inNS(ctx, h, fmt.Sprintf("set -e; hostname %s; ip link set lo up; ip addr add %s/24 dev eth0; ip link set eth0 up",
			n.Name, n.Addr)); err != nil {
			return nil, err
		}
	}
	if err := os.Chmod(filepath.Join(c.Dir, "munge"), 0o755); err != nil {
		return nil, err
	}
	if err := c.daemon(c.lab, "munged", "munged", "-F", "--force", "--key-file", c.MungeKey(), "--socket", c.MungeSocket,
		"--pid-file", filepath.Join(c.Dir, "run", "munged.pid"), "--log-file", filepath.Join(c.Dir, "log", "munged.log"),
		"--seed-file", filepath.Join(c.Dir, "munge", "seed")); err != nil {
		return nil, err
	}
	if err := waitFile(ctx, c.MungeSocket); err != nil {
		return nil, fmt.Errorf("lab: munged did not start: %w\n%s", err, tail(filepath.Join(c.Dir, "log", "munged.log"), 20))
	}
	if err := c.startAccounting(ctx,
		func(name, script string) error { return c.daemon(c.lab, name, "sh", "-c", script) },
		c.nsScript("-t", strconv.Itoa(c.lab.Process.Pid), "-n", "-u")); err != nil {
		return nil, err
	}
	if err := c.daemon(c.lab, "slurmctld", "slurmctld", "-D", "-i", "-f", c.SlurmConf()); err != nil {
		return nil, err
	}
	for i, n := range c.Nodes {
		if err := c.daemon(c.nodes[i], "slurmd-"+n.Name, "slurmd", "-D", "-f", c.SlurmConf()); err != nil {
			return nil, err
		}
	}
	if err := WaitIdle(ctx, c, len(c.Nodes)); err != nil {
		return nil, fmt.Errorf("%w\nslurmctld log:\n%s", err, tail(c.ControllerLog(), 30))
	}
	o.Logf("lab: %d node(s) idle", len(c.Nodes))
	return c, nil
}

// inNS runs a root shell command in h's namespaces.
func (c *HostCluster) inNS(ctx context.Context, h *exec.Cmd, script string) error {
	cmd := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(h.Process.Pid), "-n", "-u", "sh", "-c", script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("lab: %q: %v: %s", script, err, out)
	}
	return nil
}

// daemon starts a daemon in the foreground inside h's namespaces, its
// output going to log/<name>.out.
func (c *HostCluster) daemon(h *exec.Cmd, name string, argv ...string) error {
	out, err := os.Create(filepath.Join(c.Dir, "log", name+".out"))
	if err != nil {
		return err
	}
	args := append([]string{"-t", strconv.Itoa(h.Process.Pid), "-n", "-u", "--"}, argv...)
	cmd := exec.Command("nsenter", args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "SLURM_CONF="+c.SlurmConf())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		return fmt.Errorf("lab: starting %s: %w", name, err)
	}
	go func() { cmd.Wait(); out.Close() }()
	return nil
}

// Client runs a shell script as root in the lab namespace (where
// slurmctld and the nodes are reachable) with SLURM_CONF set: sbatch,
// srun, scontrol... A non-zero exit status is not an error.
func (c *HostCluster) Client(ctx context.Context, script string) (Result, error) {
	return c.ClientEnv(ctx, nil, script)
}

// ClientEnv is Client with extra environment variables.
func (c *HostCluster) ClientEnv(ctx context.Context, env []string, script string) (Result, error) {
	cmd := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(c.lab.Process.Pid), "-n", "-u", "--", "sh", "-c", script)
	cmd.Env = append(append(os.Environ(), "SLURM_CONF="+c.SlurmConf()), env...)
	cmd.Dir = c.Dir
	return runResult(cmd)
}

// NodeRun runs a shell script as root on node i (0-based): in its
// namespaces, so `hostname` is its name.
func (c *HostCluster) NodeRun(ctx context.Context, i int, script string) (Result, error) {
	cmd := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(c.nodes[i].Process.Pid), "-n", "-u", "--", "sh", "-c", script)
	cmd.Env = append(os.Environ(), "SLURM_CONF="+c.SlurmConf())
	return runResult(cmd)
}

// NodeProcs lists the processes running in node i's network namespace
// (slurmd, slurmstepd, job tasks) as "pid comm args".
func (c *HostCluster) NodeProcs(i int) []string {
	return procsInNetNS(c.nodes[i].Process.Pid)
}

// Close kills every process in the lab's namespaces (daemons, job steps,
// tasks) and the namespace holders.
func (c *HostCluster) Close() {
	var holders []*exec.Cmd
	if c.lab != nil {
		holders = append(holders, c.lab)
	}
	holders = append(holders, c.nodes...)
	for _, h := range holders {
		killNetNS(h.Process.Pid)
	}
	for _, h := range holders {
		syscall.Kill(-h.Process.Pid, syscall.SIGKILL)
	}
}

// Result is a finished command.
type Result struct {
	Stdout, Stderr string
	ExitCode       int
}

func (r Result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.ExitCode, r.Stdout, r.Stderr)
}

func runResult(cmd *exec.Cmd) (Result, error) {
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	r := Result{Stdout: o.String(), Stderr: e.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.Exited() {
		r.ExitCode = ee.ExitCode()
		err = nil
	}
	return r, err
}

func waitFile(ctx context.Context, path string) error {
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Tail is the last lines of a file, or why it cannot be read (for logs
// and consoles in failure reports).
func Tail(path string, lines int) string { return tail(path, lines) }

func tail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	parts := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// netNS is the identity of a process's network namespace ("net:[4026...]").
func netNS(pid int) string {
	s, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
	return s
}

// procsInNetNS lists the processes (other than the holder) in holder's
// network namespace.
func procsInNetNS(holderPid int) []string {
	ns := netNS(holderPid)
	if ns == "" {
		return nil
	}
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == holderPid || netNS(pid) != ns {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if len(cmdline) == 0 {
			continue // kernel thread or zombie
		}
		out = append(out, fmt.Sprintf("%d %s", pid, strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))))
	}
	return out
}

// killNetNS SIGKILLs every process in holder's network namespace except the
// holder, until none is left (at most 10 s).
func killNetNS(holderPid int) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		procs := procsInNetNS(holderPid)
		if len(procs) == 0 {
			return
		}
		for _, p := range procs {
			pid, _ := strconv.Atoi(strings.Fields(p)[0])
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/hpcvm/hpcvm/test/virtnode"
)

// VirtOptions configures a VirtCluster.
type VirtOptions struct {
	Nodes  int // default 2
	CPUs   int // vCPUs per virt node, default 2
	MemMiB int // memory per virt node, default 2560
	// Dir holds the lab's configuration, logs and job files; it is shared
	// read-write with every node at the same path. Required; no whitespace,
	// ',' or '='.
	Dir        string
	Hpcvm      string // hpcvm binary (host path, visible in the nodes)
	SpankSO    string
	PolicyDir  string
	ImageStore string
	// Plugstack adds plugin arguments (e.g. "disk=copy"); the defaults
	// are hpcvm, policy_dir, image_store, runtime_dir=/run/hpcvm, disk=ro.
	Plugstack []string
	Logf      func(format string, args ...any)
}

// VirtCluster is a Slurm cluster of virt nodes: slurmd (and munged) inside
// each QEMU TCG node with real KVM, slurmctld and munged on the host side of
// the nodes' bridge (ControllerIP), in the virt nodes' network namespace.
type VirtCluster struct {
	Config
	VN     *virtnode.Cluster
	daemon []*exec.Cmd
	logf   func(string, ...any)
}

// VirtPrerequisites reports what this machine lacks for a VirtCluster.
func VirtPrerequisites() error {
	if err := Prerequisites(); err != nil {
		return err
	}
	return virtnode.Prerequisites()
}

// StartVirt boots the virt nodes, starts the daemons and waits until every
// node is idle.
func StartVirt(ctx context.Context, o VirtOptions) (_ *VirtCluster, err error) {
	if err := VirtPrerequisites(); err != nil {
		return nil, err
	}
	sizeDefaults(&o.Nodes, &o.CPUs, &o.MemMiB, 2560, &o.Logf)
	if o.Dir == "" || !filepath.IsAbs(o.Dir) {
		return nil, errors.New("lab: VirtOptions.Dir must be an absolute path")
	}
	id := make([]byte, 4)
	rand.Read(id)
	// Node-local paths (each node's /run and /var are its own tmpfs); the
	// same path on the host side, made unique per lab.
	local := "/run/hpcvm-lab-" + hex.EncodeToString(id)
	c := &VirtCluster{logf: o.Logf}
	// Guest RAM: node memory minus room for the node's own system, the
	// VMM and its reserve (the lab policy's 128 MiB).
	realMem := o.MemMiB - 512
	c.Config = Config{Dir: o.Dir, SpankSO: o.SpankSO, MungeSocket: local + "/munge.socket",
		SpoolDir: local + "/spool/%n", DefMemPerNodeMiB: realMem}
	c.Plugstack = append([]string{"hpcvm=" + o.Hpcvm, "policy_dir=" + o.PolicyDir, "image_store=" + o.ImageStore,
		"runtime_dir=/run/hpcvm", "disk=ro", "boot_timeout=30m"}, o.Plugstack...)
	c.Plugstack = dedupeArgs(c.Plugstack)
	for i := 1; i <= o.Nodes; i++ {
		c.Nodes = append(c.Nodes, NodeSpec{Name: fmt.Sprintf("n%d", i), Addr: nodeAddr(i), CPUs: o.CPUs, MemMiB: realMem})
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if err := c.write(); err != nil {
		return nil, err
	}
	o.Logf("lab: booting %d virt node(s) (QEMU TCG, %d vCPUs, %d MiB each)", o.Nodes, o.CPUs, o.MemMiB)
	c.VN, err = virtnode.Start(ctx, virtnode.Config{Nodes: o.Nodes, CPUs: o.CPUs, MemMiB: o.MemMiB,
		Shares: []string{o.Dir}, Dir: filepath.Join(o.Dir, "vn"), Logf: o.Logf})
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(local, 0o755); err != nil {
		return nil, err
	}
	munged := fmt.Sprintf("munged -F --force --key-file %s --socket %s --pid-file %s/munged.pid --log-file %s --seed-file %s/seed",
		c.MungeKey(), c.MungeSocket, local, filepath.Join(c.Dir, "log", "munged-%s.log"), local)
	if err := c.hostDaemon("munged", "exec "+fmt.Sprintf(munged, "ctl")); err != nil {
		return nil, err
	}
	if err := waitFile(ctx, c.MungeSocket); err != nil {
		return nil, fmt.Errorf("lab: munged did not start: %w", err)
	}
	if err := c.startAccounting(ctx, c.hostDaemon, c.nsScript("--net="+c.VN.NetNSPath())); err != nil {
		return nil, err
	}
	if err := c.hostDaemon("slurmctld", "hostname ctl; exec slurmctld -D -i -f "+c.SlurmConf()); err != nil {
		return nil, err
	}
	for _, n := range c.VN.Nodes {
		script := fmt.Sprintf("mkdir -p %s/spool/%s /run/hpcvm /sys/fs/cgroup/system.slice && chmod 755 %s && export SLURM_CONF=%s && (%s >%s 2>&1 &) && "+
			"while [ ! -S %s ]; do sleep 0.1; done && exec slurmd -D -f %s >%s 2>&1",
			local, n.Name, local, c.SlurmConf(), fmt.Sprintf(munged, n.Name), filepath.Join(c.Dir, "log", "munged-"+n.Name+".out"),
			c.MungeSocket, c.SlurmConf(), filepath.Join(c.Dir, "log", "slurmd-"+n.Name+".out"))
		if _, err := n.RunBackground(script); err != nil {
			return nil, fmt.Errorf("lab: starting slurmd in %s: %w", n.Name, err)
		}
	}
	if err := WaitIdle(ctx, c, len(c.Nodes)); err != nil {
		return nil, fmt.Errorf("%w\nslurmctld log:\n%s\nslurmd n1 log:\n%s", err, tail(c.ControllerLog(), 20), tail(c.SlurmdLog("n1"), 20))
	}
	o.Logf("lab: %d node(s) idle", len(c.Nodes))
	return c, nil
}

// dedupeArgs keeps the last KEY=VALUE of each key, in first-seen order.
func dedupeArgs(args []string) []string {
	last := map[string]string{}
	var order []string
	for _, a := range args {
		k, _, _ := strings.Cut(a, "=")
		if _, seen := last[k]; !seen {
			order = append(order, k)
		}
		last[k] = a
	}
	out := make([]string, len(order))
	for i, k := range order {
		out[i] = last[k]
	}
	return out
}

// hostDaemon runs a shell script in the nodes' network namespace, in a UTS
// namespace of its own (slurmctld checks its host name).
func (c *VirtCluster) hostDaemon(name, script string) error {
	out, err := os.Create(filepath.Join(c.Dir, "log", name+".out"))
	if err != nil {
		return err
	}
	cmd := exec.Command("nsenter", "--net="+c.VN.NetNSPath(), "--", "unshare", "--uts", "--", "sh", "-c", script)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "SLURM_CONF="+c.SlurmConf())
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		return fmt.Errorf("lab: starting %s: %w", name, err)
	}
	c.daemon = append(c.daemon, cmd)
	go func() { cmd.Wait(); out.Close() }()
	return nil
}

// Client runs a shell script on the host side of the lab network (where
// slurmctld runs) with SLURM_CONF set, in the lab directory.
func (c *VirtCluster) Client(ctx context.Context, script string) (Result, error) {
	cmd := exec.CommandContext(ctx, "nsenter", "--net="+c.VN.NetNSPath(), "--", "sh", "-c", script)
	cmd.Env = append(os.Environ(), "SLURM_CONF="+c.SlurmConf())
	cmd.Dir = c.Dir
	return runResult(cmd)
}

// NodeRun runs a shell script as root in node i (0-based).
func (c *VirtCluster) NodeRun(ctx context.Context, i int, script string) (Result, error) {
	r, err := c.VN.Nodes[i].Run(ctx, script)
	return Result{Stdout: r.Stdout, Stderr: r.Stderr, ExitCode: r.ExitCode}, err
}

// Close stops the daemons and the nodes.
func (c *VirtCluster) Close() {
	for _, d := range c.daemon {
		if d.Process != nil {
			syscall.Kill(-d.Process.Pid, syscall.SIGKILL)
		}
	}
	if c.VN != nil {
		c.VN.Close()
	}
	if strings.HasPrefix(c.MungeSocket, "/run/hpcvm-lab-") {
		os.RemoveAll(filepath.Dir(c.MungeSocket))
	}
}

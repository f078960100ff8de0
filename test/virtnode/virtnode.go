// Package virtnode boots "virt nodes" for end-to-end tests: QEMU TCG virtual
// machines that emulate an AMD CPU with SVM, so that inside them kvm-amd loads
// and a real Linux guest can be run by the project's VMM (the machines this
// project is developed on have no hardware virtualization; see
// docs/testing.md).
//
// A node runs Debian's 6.1 kernel with a small busybox initramfs (built by
// `make node-assets`, test/virtnode/assets). Its root file system is the
// host's / shared read-only over 9p with a tmpfs overlay on top, so every
// host path (bin/hpcvm, guest kernels, test temp dirs) is visible inside the
// node at the same path. Writes inside a node stay in the node, except in
// read-write shares (Config.Shares), which are mounted at their host path.
//
// Commands run through a per-node control directory (a read-write 9p share)
// served by a small agent (test/virtnode/agent) that runs as the node's PID 1.
// All nodes of a cluster sit on a Linux bridge inside a network namespace
// the harness creates (10.77.0.0/24; the bridge is 10.77.0.1, node i is
// 10.77.0.(10+i), named n<i>). Close kills everything by PID; the namespace
// disappears with its last process.
package virtnode

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Subnet layout of the cluster network.
const (
	BridgeIP   = "10.77.0.1"
	subnetBits = 24
)

// Config describes a cluster of virt nodes. Zero values get defaults.
type Config struct {
	Nodes  int // number of nodes (default 1)
	CPUs   int // vCPUs per node (default 1)
	MemMiB int // memory per node in MiB (default 2048)
	// Shares are host directories mounted read-write (and coherent with the
	// host) at the same path in every node. Paths must not contain
	// whitespace, ',' or '='.
	Shares []string
	// Assets overrides the node kernel/initramfs (default: FindAssets()).
	Assets *Assets
	// ExtraAppend is appended to every node's kernel command line.
	ExtraAppend string
	// Accel is QEMU's -accel value (default: tcg, multi-threaded, or
	// $HPCVM_VN_ACCEL). "tcg,thread=single" runs a node's vCPUs in turn on
	// one host thread: slower, but a nested guest spinning without exits
	// cannot starve the node's other CPU (docs/dsm.md, "The platform").
	Accel string
	// Dir is where the cluster keeps its control directories and logs
	// (default: a new directory under os.TempDir(), removed by Close).
	Dir string
	// Logf, if set, receives progress messages (e.g. t.Logf).
	Logf func(format string, args ...any)
}

// Assets are the files a node boots from.
type Assets struct {
	Kernel string // vmlinux (PVH ELF) or bzImage
	Initrd string // node initramfs
	ModDir string // host path of the kernel's lib/modules/<release> (optional)
	// QEMU runs the nodes and QEMUData is its data directory (-L); empty:
	// qemu-system-x86_64 from PATH with its own data.
	QEMU, QEMUData string
}

// FindAssets locates the node assets built by `make node-assets`:
// $HPCVM_NODE_ASSETS, else $HPCVM_CACHE/node/current, else
// ~/.cache/hpcvm/node/current.
func FindAssets() (Assets, error) {
	dir := os.Getenv("HPCVM_NODE_ASSETS")
	if dir == "" {
		dir = filepath.Join(CacheDir(), "node", "current")
	}
	a := Assets{Kernel: filepath.Join(dir, "vmlinux"), Initrd: filepath.Join(dir, "initramfs.cpio.gz")}
	for _, f := range []string{a.Kernel, a.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return a, fmt.Errorf("virt-node assets missing (%v); run `make node-assets`", err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "moddir")); err == nil {
		a.ModDir = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile(filepath.Join(dir, "qemu")); err == nil {
		a.QEMU = strings.TrimSpace(string(b))
		if _, err := os.Stat(a.QEMU); err != nil {
			return a, fmt.Errorf("virt-node QEMU missing (%v); run `make node-assets`", err)
		}
		if b, err := os.ReadFile(filepath.Join(dir, "qemu-data")); err == nil {
			a.QEMUData = strings.TrimSpace(string(b))
		}
	}
	if q := os.Getenv("HPCVM_VN_QEMU"); q != "" {
		a.QEMU, a.QEMUData = q, os.Getenv("HPCVM_VN_QEMU_DATA")
	}
	return a, nil
}

// CacheDir is $HPCVM_CACHE or ~/.cache/hpcvm.
func CacheDir() string {
	if d := os.Getenv("HPCVM_CACHE"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "hpcvm")
}

// Cluster is a set of running virt nodes on one bridge.
type Cluster struct {
	Nodes []*Node

	cfg       Config
	assets    Assets
	agent     string // node agent binary (host path, seen by the nodes)
	dir       string
	ownDir    bool
	holder    *exec.Cmd // owns the network namespace
	closeOnce sync.Once
}

// Node is one virt node.
type Node struct {
	Name  string // hostname, n1..nN
	IP    string // address on the cluster bridge
	Index int    // 1-based

	// BootTime is the time from starting QEMU until the node's agent served
	// commands.
	BootTime time.Duration

	dir     string // per-node directory on the host
	ctl     string // control directory (shared with the node)
	console string // console log file
	started time.Time
	// run is the node's current QEMU; Restart replaces it, so readers
	// load it once (a poller never sees half of a restart).
	run atomic.Pointer[qemuRun]
	seq atomic.Int64
}

// qemuRun is one QEMU process of a node.
type qemuRun struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd.Wait returned
	err    error         // cmd.Wait's error, set before exited closes
}

// current is the node's QEMU run (never nil once the node started).
func (n *Node) current() *qemuRun { return n.run.Load() }

// kill SIGKILLs the node's QEMU process group, if it started.
func (n *Node) kill() {
	if r := n.current(); r != nil && r.cmd.Process != nil {
		syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// waitExit waits up to d for the node's QEMU to exit and reports whether
// it did (true for a node that never started).
func (n *Node) waitExit(d time.Duration) bool {
	r := n.current()
	if r == nil {
		return true
	}
	select {
	case <-r.exited:
		return true
	case <-time.After(d):
		return false
	}
}

// Result is the outcome of a command run in a node.
type Result struct {
	Stdout   string
	Stderr   string
	ExitCode int
}

func (r Result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.ExitCode, r.Stdout, r.Stderr)
}

func (c Config) withDefaults() Config {
	if c.Nodes <= 0 {
		c.Nodes = 1
	}
	if c.CPUs <= 0 {
		c.CPUs = 1
	}
	if c.MemMiB <= 0 {
		c.MemMiB = 2048
	}
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
	return c
}

// Prerequisites reports why virt nodes cannot run on this machine, or nil.
func Prerequisites() error {
	if os.Geteuid() != 0 {
		return errors.New("virt nodes need root (network namespace, tap devices, 9p export of /)")
	}
	for _, b := range []string{"qemu-system-x86_64", "nsenter", "ip"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%s not found (apt-get install qemu-system-x86 util-linux iproute2)", b)
		}
	}
	if os.Getenv("HPCVM_VN_AGENT") == "" {
		if _, err := exec.LookPath("go"); err != nil {
			return errors.New("go not found (needed to build the node agent; or set HPCVM_VN_AGENT)")
		}
	}
	if _, err := FindAssets(); err != nil {
		return err
	}
	return nil
}

// Start boots cfg.Nodes nodes and waits until each one serves commands.
// On error everything already started is torn down.
func Start(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	cfg = cfg.withDefaults()
	if cfg.Nodes > 200 {
		return nil, errors.New("virtnode: at most 200 nodes")
	}
	var assets Assets
	if cfg.Assets != nil {
		assets = *cfg.Assets
	} else if assets, err = FindAssets(); err != nil {
		return nil, err
	}
	for _, s := range cfg.Shares {
		if !filepath.IsAbs(s) || strings.ContainsAny(s, " \t\n,=") {
			return nil, fmt.Errorf("virtnode: share path %q must be absolute, without whitespace, ',' or '='", s)
		}
	}
	c := &Cluster{cfg: cfg, dir: cfg.Dir}
	if c.dir == "" {
		if c.dir, err = os.MkdirTemp("", "hpcvm-vn-"); err != nil {
			return nil, err
		}
		// HPCVM_VN_KEEP=1 keeps node consoles and logs for a post-mortem.
		c.ownDir = os.Getenv("HPCVM_VN_KEEP") != "1"
		if !c.ownDir {
			cfg.Logf("virtnode: keeping %s (HPCVM_VN_KEEP=1)", c.dir)
		}
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()

	agent, err := buildAgent(ctx, c.dir)
	if err != nil {
		return nil, err
	}
	c.assets, c.agent = assets, agent
	if err := c.startNetwork(ctx); err != nil {
		return nil, err
	}

	var hosts strings.Builder
	hosts.WriteString("127.0.0.1 localhost\n" + BridgeIP + " host\n")
	for i := 1; i <= cfg.Nodes; i++ {
		fmt.Fprintf(&hosts, "%s n%d\n", nodeIP(i), i)
	}
	for i := 1; i <= cfg.Nodes; i++ {
		n := &Node{Name: fmt.Sprintf("n%d", i), IP: nodeIP(i), Index: i}
		n.dir = filepath.Join(c.dir, n.Name)
		n.ctl = filepath.Join(n.dir, "ctl")
		n.console = filepath.Join(n.dir, "console.log")
		if err := os.MkdirAll(n.ctl, 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(n.ctl, "hosts"), []byte(hosts.String()), 0o644); err != nil {
			return nil, err
		}
		if err := c.startNode(n); err != nil {
			return nil, err
		}
		c.Nodes = append(c.Nodes, n)
	}
	for _, n := range c.Nodes {
		if err := n.waitReady(ctx); err != nil {
			return nil, err
		}
		cfg.Logf("virtnode: %s (%s) ready after %v", n.Name, n.IP, n.BootTime.Round(time.Millisecond))
	}
	return c, nil
}

func nodeIP(i int) string { return fmt.Sprintf("10.77.0.%d", 10+i) }

// agentSource is the directory of the agent's source, next to this file.
func agentSource() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "agent")
}

func buildAgent(ctx context.Context, dir string) (string, error) {
	if p := os.Getenv("HPCVM_VN_AGENT"); p != "" {
		return p, nil
	}
	out := filepath.Join(dir, "vn-agent")
	if err := GoBuild(ctx, agentSource(), out); err != nil {
		return "", fmt.Errorf("virtnode: building the node agent: %w", err)
	}
	return out, nil
}

// GoBuild builds the main package in srcDir into a static binary at out
// (for helpers that run inside nodes; the node sees out through its host
// root).
func GoBuild(ctx context.Context, srcDir, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, ".")
	cmd.Dir = srcDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build in %s: %v\n%s", srcDir, err, b)
	}
	return nil
}

// startNetwork creates the cluster's network namespace (held by a sleeping
// process) with the bridge and one tap device per node.
func (c *Cluster) startNetwork(ctx context.Context) error {
	h := exec.Command("sleep", "infinity")
	h.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET,
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
	}
	if err := h.Start(); err != nil {
		return fmt.Errorf("virtnode: creating the network namespace: %w", err)
	}
	c.holder = h
	go h.Wait()
	script := fmt.Sprintf("set -e; ip link set lo up; ip link add br0 type bridge; ip addr add %s/%d dev br0; ip link set br0 up\n",
		BridgeIP, subnetBits)
	for i := 1; i <= c.cfg.Nodes; i++ {
		script += fmt.Sprintf("ip tuntap add dev tap%d mode tap; ip link set tap%d master br0; ip link set tap%d up\n", i, i, i)
	}
	if r, err := c.HostRun(ctx, script); err != nil || r.ExitCode != 0 {
		return fmt.Errorf("virtnode: network setup failed: %v %s", err, r)
	}
	return nil
}

// HostRun runs a shell command on the host inside the cluster's network
// namespace (where the bridge has address BridgeIP), e.g. to reach a
// service in a node from the host side.
func (c *Cluster) HostRun(ctx context.Context, script string) (Result, error) {
	cmd := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(c.holder.Process.Pid), "-n", "/bin/sh", "-c", script)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	r := Result{Stdout: o.String(), Stderr: e.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.ExitCode = ee.ExitCode()
		err = nil
	}
	return r, err
}

// NetNSPath is a path to the cluster's network namespace (for nsenter --net=).
func (c *Cluster) NetNSPath() string {
	return fmt.Sprintf("/proc/%d/ns/net", c.holder.Process.Pid)
}

// Dir is the cluster's host directory (node consoles, control dirs).
func (c *Cluster) Dir() string { return c.dir }

func (c *Cluster) startNode(n *Node) error {
	a, agent := c.assets, c.agent
	shares := []string{"vnctl=" + n.ctl}
	qargs := []string{
		"-t", strconv.Itoa(c.holder.Process.Pid), "-n", "--",
		cmp.Or(a.QEMU, "qemu-system-x86_64"),
		"-name", n.Name,
		"-accel", cmp.Or(c.cfg.Accel, accel()), "-machine", "q35", "-cpu", "EPYC,+svm,+npt",
		"-smp", strconv.Itoa(c.cfg.CPUs), "-m", strconv.Itoa(c.cfg.MemMiB),
		"-nographic", "-nodefaults", "-no-reboot",
		// A node that resets (a triple fault ends QEMU under -no-reboot)
		// leaves its CPU state in qemu.log: nodes have died silently while
		// Debian guests booted in them (docs/testing.md).
		"-d", "cpu_reset",
		"-kernel", a.Kernel, "-initrd", a.Initrd,
		"-chardev", "file,id=con,path=" + n.console, "-serial", "chardev:con",
		"-fsdev", "local,id=r,path=/,security_model=none,readonly=on",
		"-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
		"-fsdev", "local,id=ctl,path=" + n.ctl + ",security_model=none",
		"-device", "virtio-9p-pci,fsdev=ctl,mount_tag=vnctl",
		"-netdev", fmt.Sprintf("tap,id=net0,ifname=tap%d,script=no,downscript=no", n.Index),
		"-device", fmt.Sprintf("virtio-net-pci,netdev=net0,mac=52:54:00:77:00:%02x", n.Index),
	}
	if a.QEMUData != "" {
		// Its own ROMs first, then the host's firmware (SeaBIOS, iPXE).
		qargs = append(qargs, "-L", a.QEMUData, "-L", "/usr/share/qemu", "-L", "/usr/share/seabios")
	}
	for i, s := range c.cfg.Shares {
		tag := fmt.Sprintf("vs%d", i)
		shares = append(shares, tag+"="+s)
		qargs = append(qargs,
			"-fsdev", fmt.Sprintf("local,id=%s,path=%s,security_model=none", tag, s),
			"-device", fmt.Sprintf("virtio-9p-pci,fsdev=%s,mount_tag=%s", tag, tag))
	}
	appendLine := []string{"console=ttyS0", "panic=-1", "quiet",
		"vn.name=" + n.Name, fmt.Sprintf("vn.ip=%s/%d", n.IP, subnetBits),
		"vn.agent=" + agent, "vn.ctl=" + n.ctl, "vn.shares=" + strings.Join(shares, ",")}
	if khz := hostTSCkHz(); khz > 0 {
		// TCG's TSC runs at the host rate; calibrating it against the PIT
		// fails on a loaded host and the boot then crawls.
		appendLine = append(appendLine, fmt.Sprintf("tsc_early_khz=%d", khz))
	}
	if a.ModDir != "" {
		appendLine = append(appendLine, "vn.moddir="+a.ModDir)
	}
	if c.cfg.ExtraAppend != "" {
		appendLine = append(appendLine, c.cfg.ExtraAppend)
	}
	qargs = append(qargs, "-append", strings.Join(appendLine, " "))

	logf, err := os.Create(filepath.Join(n.dir, "qemu.log"))
	if err != nil {
		return err
	}
	cmd := exec.Command("nsenter", qargs...) // nsenter execs QEMU: same PID
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("virtnode: starting QEMU for %s: %w", n.Name, err)
	}
	r := &qemuRun{cmd: cmd, exited: make(chan struct{})}
	go func() {
		r.err = cmd.Wait()
		logf.Close()
		close(r.exited)
	}()
	n.run.Store(r)
	n.started = start
	return nil
}

// accel is QEMU's -accel value: tcg, or HPCVM_VN_ACCEL for experiments
// (e.g. tcg,thread=single).
func accel() string {
	if a := os.Getenv("HPCVM_VN_ACCEL"); a != "" {
		return a
	}
	return "tcg"
}

// hostTSCkHz is the host CPU clock from /proc/cpuinfo, or 0.
func hostTSCkHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil && mhz > 0 {
				return int(mhz * 1000)
			}
		}
	}
	return 0
}

func (n *Node) waitReady(ctx context.Context) error {
	r := n.current()
	ready := filepath.Join(n.ctl, "ready")
	for {
		if _, err := os.Stat(ready); err == nil {
			n.BootTime = time.Since(n.started)
			return nil
		}
		select {
		case <-r.exited:
			return fmt.Errorf("virtnode: %s: QEMU exited before the node was ready (%v)\nqemu: %s\nconsole tail:\n%s",
				n.Name, r.err, n.qemuLogTail(40), n.ConsoleTail(30))
		case <-ctx.Done():
			return fmt.Errorf("virtnode: %s not ready: %w\nconsole tail:\n%s", n.Name, ctx.Err(), n.ConsoleTail(30))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// qemuLogTail returns the last lines of QEMU's stderr and -d log.
func (n *Node) qemuLogTail(lines int) string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "qemu.log"))
	l := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}

// Console returns the node's serial console output so far.
func (n *Node) Console() string {
	b, _ := os.ReadFile(n.console)
	return string(b)
}

// ConsolePath is the host file the node's serial console is written to.
func (n *Node) ConsolePath() string { return n.console }

// ConsoleTail returns the last lines of the node's console.
func (n *Node) ConsoleTail(lines int) string {
	s := strings.TrimRight(n.Console(), "\n")
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// PID is the node's QEMU process id.
func (n *Node) PID() int { return n.current().cmd.Process.Pid }

// Alive reports whether the node's QEMU is still running.
func (n *Node) Alive() bool {
	r := n.current()
	if r == nil {
		return false
	}
	select {
	case <-r.exited:
		return false
	default:
		return true
	}
}

// HungAfter is how stale the node agent's heartbeat (ctl/alive, rewritten
// every 2 s) may get before the node counts as hung. Under TCG a node that
// runs KVM guests has stopped dead, silently, now and then
// (docs/testing.md); a node that is merely loaded still runs its agent.
var HungAfter = 90 * time.Second

// Hung reports whether the node's QEMU runs but its agent has not
// heartbeat for HungAfter, and how old the last heartbeat is.
func (n *Node) Hung() (bool, time.Duration) {
	if !n.Alive() {
		return false, 0
	}
	st, err := os.Stat(filepath.Join(n.ctl, "alive"))
	if err != nil {
		return false, 0 // not serving yet
	}
	age := time.Since(st.ModTime())
	return age > HungAfter, age
}

// Healthy reports whether the node runs and its agent is not hung, and if
// not, why.
func (n *Node) Healthy() (bool, string) {
	if !n.Alive() {
		err := error(nil)
		if r := n.current(); r != nil {
			err = r.err
		}
		return false, fmt.Sprintf("%s's QEMU exited (%v)", n.Name, err)
	}
	if hung, age := n.Hung(); hung {
		return false, fmt.Sprintf("%s hung: its agent's last heartbeat is %v old", n.Name, age.Round(time.Second))
	}
	if line := n.KernelCrash(); line != "" {
		return false, fmt.Sprintf("%s's kernel crashed: %s", n.Name, line)
	}
	return true, ""
}

// kernelCrashMarks start the lines a Linux kernel prints when it oopses or
// panics. A node whose own kernel did either is not to be trusted even
// while its QEMU still runs: the panic takes a moment to end QEMU, and a
// VMM's KVM_RUN may already have failed because of the oops.
var kernelCrashMarks = []string{"Kernel panic - not syncing", "Oops:", "BUG: ", "general protection fault"}

// KernelCrash returns the first console line of the node's current boot
// that reports a kernel oops or panic, or "".
func (n *Node) KernelCrash() string {
	for _, l := range strings.Split(n.Console(), "\n") {
		for _, m := range kernelCrashMarks {
			if i := strings.Index(l, m); i >= 0 {
				return strings.TrimSpace(l[i:])
			}
		}
	}
	return ""
}

// KernelCrashContext returns the node's console of the current boot from
// 5 lines before its kernel's first oops, panic or WARNING report to n
// lines after it, or "" if there is none: what a test logs when a command
// failed on a node whose kernel may have been the cause.
func (n *Node) KernelCrashContext(after int) string {
	lines := strings.Split(n.Console(), "\n")
	for i, l := range lines {
		for _, m := range append(kernelCrashMarks, "WARNING: ") {
			if strings.Contains(l, m) {
				return strings.Join(lines[max(0, i-5):min(len(lines), i+after)], "\n")
			}
		}
	}
	return ""
}

// ErrNodeHung is returned (wrapped) by Proc.Wait when the node hangs.
var ErrNodeHung = errors.New("virt node hung")

// Restart kills node n's QEMU if it still runs and boots the node afresh
// with the same configuration, waiting until it serves commands. Commands
// still running in it are lost. It is how tests get past a node that hung
// or died under a guest (docs/testing.md).
func (c *Cluster) Restart(ctx context.Context, n *Node) error {
	n.kill()
	if !n.waitExit(30 * time.Second) {
		return fmt.Errorf("virtnode: %s: QEMU did not die after SIGKILL", n.Name)
	}
	for _, f := range []string{"ready", "alive", "run", "new"} {
		if err := os.RemoveAll(filepath.Join(n.ctl, f)); err != nil {
			return err
		}
	}
	old := n.console + ".before-restart"
	os.Remove(old)
	os.Rename(n.console, old)
	if err := c.startNode(n); err != nil {
		return err
	}
	if err := n.waitReady(ctx); err != nil {
		return err
	}
	c.cfg.Logf("virtnode: %s restarted, ready after %v", n.Name, n.BootTime.Round(time.Millisecond))
	return nil
}

// Proc is a command started in a node by RunBackground.
type Proc struct {
	node *Node
	dir  string
	res  *Result
}

// RunBackground starts a shell command (run by /bin/sh in the node, cwd /,
// stdin /dev/null, its own process group) and returns without waiting.
func (n *Node) RunBackground(script string) (*Proc, error) {
	if !n.Alive() {
		return nil, fmt.Errorf("virtnode: %s is not running", n.Name)
	}
	id := strconv.FormatInt(n.seq.Add(1), 10)
	dir := filepath.Join(n.ctl, "run", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "cmd"), []byte(script+"\n"), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(n.ctl, "new", id), nil, 0o644); err != nil {
		return nil, err
	}
	return &Proc{node: n, dir: dir}, nil
}

// Node is the node the command runs in.
func (p *Proc) Node() *Node { return p.node }

// Stdout returns the command's standard output so far.
func (p *Proc) Stdout() string {
	if p.res != nil {
		return p.res.Stdout
	}
	b, _ := os.ReadFile(filepath.Join(p.dir, "stdout"))
	return string(b)
}

// Stderr returns the command's standard error so far.
func (p *Proc) Stderr() string {
	if p.res != nil {
		return p.res.Stderr
	}
	b, _ := os.ReadFile(filepath.Join(p.dir, "stderr"))
	return string(b)
}

// Kill sends SIGKILL to the command's process group.
func (p *Proc) Kill() {
	os.WriteFile(filepath.Join(p.dir, "kill"), nil, 0o644)
}

// Exited reports whether the command has finished.
func (p *Proc) Exited() bool {
	if p.res != nil {
		return true
	}
	_, err := os.Stat(filepath.Join(p.dir, "rc"))
	return err == nil
}

// Wait waits for the command to finish and returns its output and exit
// status. If ctx ends first, the command's process group is killed and
// ctx's error is returned with the output so far.
func (p *Proc) Wait(ctx context.Context) (Result, error) {
	if p.res != nil {
		return *p.res, nil
	}
	n := p.node
	run := n.current() // the QEMU this command was started in
	rcFile := filepath.Join(p.dir, "rc")
	delay := time.Millisecond
	var killedAt, checked time.Time
	for {
		if b, err := os.ReadFile(rcFile); err == nil {
			rc, perr := strconv.Atoi(strings.TrimSpace(string(b)))
			if perr != nil {
				return Result{}, fmt.Errorf("virtnode: %s: bad exit status file %q", n.Name, b)
			}
			r := Result{Stdout: p.Stdout(), Stderr: p.Stderr(), ExitCode: rc}
			p.res = &r
			os.RemoveAll(p.dir)
			if !killedAt.IsZero() {
				return r, ctx.Err()
			}
			return r, nil
		}
		if !killedAt.IsZero() && time.Since(killedAt) > 10*time.Second {
			return Result{Stdout: p.Stdout(), Stderr: p.Stderr(), ExitCode: -1}, ctx.Err()
		}
		if time.Since(checked) > 5*time.Second {
			checked = time.Now()
			if hung, age := n.Hung(); hung {
				return Result{Stdout: p.Stdout(), Stderr: p.Stderr(), ExitCode: -1},
					fmt.Errorf("virtnode: %s: %w (no agent heartbeat for %v) while running a command\nconsole tail:\n%s",
						n.Name, ErrNodeHung, age.Round(time.Second), n.ConsoleTail(30))
			}
		}
		select {
		case <-run.exited:
			return Result{Stdout: p.Stdout(), Stderr: p.Stderr(), ExitCode: -1},
				fmt.Errorf("virtnode: %s died while running a command (QEMU: %v)\nqemu.log tail:\n%s\nconsole tail:\n%s",
					n.Name, run.err, n.qemuLogTail(30), n.ConsoleTail(30))
		case <-ctx.Done():
			if killedAt.IsZero() {
				p.Kill()
				killedAt = time.Now()
			}
			delay = 20 * time.Millisecond
		case <-time.After(delay):
			if delay < 50*time.Millisecond {
				delay += delay / 2
				if delay < 2*time.Millisecond {
					delay = 2 * time.Millisecond
				}
			}
		}
	}
}

// Run runs a shell command in the node and waits for it. A non-zero exit
// status is not an error; err reports harness failures and ctx ending.
func (n *Node) Run(ctx context.Context, script string) (Result, error) {
	p, err := n.RunBackground(script)
	if err != nil {
		return Result{}, err
	}
	return p.Wait(ctx)
}

// Close kills every node's QEMU and the namespace holder (by process group)
// and removes the cluster directory if Start created it. Safe to call twice.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		for _, n := range c.Nodes {
			n.kill()
		}
		for _, n := range c.Nodes {
			n.waitExit(10 * time.Second)
		}
		if c.holder != nil && c.holder.Process != nil {
			syscall.Kill(-c.holder.Process.Pid, syscall.SIGKILL)
		}
		if c.ownDir {
			os.RemoveAll(c.dir)
		}
	})
	return nil
}

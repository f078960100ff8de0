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

	cgroups "github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// CgroupLimits are the VMM cgroup settings from the policy's effective
// settings (policies.CgroupSettings); zero means "leave the kernel's default".
type CgroupLimits struct {
	MemoryMax       int64 `json:"memory_max,omitempty"`
	MemoryHigh      int64 `json:"memory_high,omitempty"`
	CPUWeight       int   `json:"cpu_weight,omitempty"`
	CPUQuotaPercent int   `json:"cpu_quota_percent,omitempty"`
	PidsMax         int   `json:"pids_max,omitempty"`
	IOWeight        int   `json:"io_weight,omitempty"`
}

// Cgroup is the cgroup a slice's VMM runs in: a child of the slice's own
// cgroup (Slurm's job/step cgroup when Slurm uses one), so the VMM stays
// within the job's limits whatever this one says.
type Cgroup interface {
	// Add moves a process into the cgroup.
	Add(pid int) error
	// Start starts cmd inside the cgroup: its first instruction already
	// runs there (v2: clone3 CLONE_INTO_CGROUP; v1: the caller moves
	// itself in around the fork and back out).
	Start(cmd *exec.Cmd) error
	// Path is the cgroup's path (v2), or the memory controller's (v1).
	Path() string
	// Destroy kills whatever is left in the cgroup and removes it; again
	// after success, it does nothing.
	Destroy() error
}

const cpuPeriodUS = 100000

// NewCgroup creates the cgroup name below the calling process's cgroup on a
// v2 (unified) host, or in each v1 controller hierarchy on v1 and hybrid
// hosts (cgroups.Mode()).
func NewCgroup(name string, lim CgroupLimits) (Cgroup, error) {
	if strings.ContainsAny(name, "/") || name == "" || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroup name %q: must be one path element", name)
	}
	switch cgroups.Mode() {
	case cgroups.Unified:
		return newV2(name, lim)
	case cgroups.Legacy, cgroups.Hybrid:
		return newV1(name, lim)
	default:
		return nil, errors.New("no cgroup hierarchy is mounted")
	}
}

type v2Cgroup struct {
	m         *cgroup2.Manager
	path      string
	destroyed bool
	// leaf is set when this process moved itself out of its cgroup
	// (parent) into leaf, to be allowed to enable controllers in parent;
	// Destroy undoes it.
	parent, leaf string
	enabled      []string
}

const v2Mount = "/sys/fs/cgroup"

func v2Resources(lim CgroupLimits) *cgroup2.Resources {
	res := &cgroup2.Resources{}
	if lim.MemoryMax > 0 || lim.MemoryHigh > 0 {
		res.Memory = &cgroup2.Memory{}
		if lim.MemoryMax > 0 {
			res.Memory.Max = &lim.MemoryMax
		}
		if lim.MemoryHigh > 0 {
			res.Memory.High = &lim.MemoryHigh
		}
	}
	if lim.CPUWeight > 0 || lim.CPUQuotaPercent > 0 {
		res.CPU = &cgroup2.CPU{}
		if lim.CPUWeight > 0 {
			w := uint64(lim.CPUWeight)
			res.CPU.Weight = &w
		}
		if lim.CPUQuotaPercent > 0 {
			q, p := int64(lim.CPUQuotaPercent)*cpuPeriodUS/100, uint64(cpuPeriodUS)
			res.CPU.Max = cgroup2.NewCPUMax(&q, &p)
		}
	}
	if lim.PidsMax > 0 {
		res.Pids = &cgroup2.Pids{Max: int64(lim.PidsMax)}
	}
	if lim.IOWeight > 0 {
		res.IO = &cgroup2.IO{BFQ: cgroup2.BFQ{Weight: uint16(lim.IOWeight)}}
	}
	return res
}

// newV2 creates the cgroup below this process's own. cgroup v2 does not
// let a cgroup that holds processes enable controllers for its children
// (the "no internal processes" rule). When this process is alone in its
// cgroup (Slurm's task cgroup under proctrack/cgroup) it first moves itself
// into a leaf child. When others share it (Slurm does not confine the step
// in a cgroup of its own, so there are no job limits to stay within) the
// VMM cgroup goes to the root of the hierarchy.
func newV2(name string, lim CgroupLimits) (Cgroup, error) {
	parent, err := cgroup2.NestedGroupPath("")
	if err != nil {
		return nil, fmt.Errorf("cgroup v2: this process's cgroup: %w", err)
	}
	parent = "/" + strings.Trim(parent, "/")
	res := v2Resources(lim)
	c := &v2Cgroup{enabled: res.EnabledControllers()}
	try := func(dir string) error {
		group := strings.TrimSuffix(dir, "/") + "/" + name
		m, err := cgroup2.NewManager(v2Mount, group, res)
		if err == nil {
			c.m, c.path = m, v2Mount+group
		}
		return err
	}
	err = try(parent)
	if err == nil {
		return c, nil
	}
	if parent == "/" {
		return nil, fmt.Errorf("cgroup v2 /%s: %w", name, err)
	}
	procs, _ := os.ReadFile(v2Mount + parent + "/cgroup.procs")
	if strings.TrimSpace(string(procs)) == fmt.Sprint(os.Getpid()) {
		leaf := parent + "/" + name + "-launcher"
		if err := os.Mkdir(v2Mount+leaf, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("cgroup v2 %s: %w", leaf, err)
		}
		if err := os.WriteFile(v2Mount+leaf+"/cgroup.procs", []byte(fmt.Sprint(os.Getpid())), 0o644); err != nil {
			os.Remove(v2Mount + leaf)
			return nil, fmt.Errorf("cgroup v2: moving into %s: %w", leaf, err)
		}
		c.parent, c.leaf = parent, leaf
		if err := try(parent); err != nil {
			c.undoLeaf()
			return nil, fmt.Errorf("cgroup v2 %s/%s: %w", parent, name, err)
		}
		return c, nil
	}
	if err := try("/"); err != nil {
		return nil, fmt.Errorf("cgroup v2 /%s (%s is shared with other processes): %w", name, parent, err)
	}
	return c, nil
}

// undoLeaf moves this process back from its leaf into its original cgroup
// (first disabling the controllers enabled there for the VMM cgroup: a
// cgroup with enabled controllers may not hold processes) and removes the
// leaf.
func (c *v2Cgroup) undoLeaf() {
	if c.leaf == "" {
		return
	}
	var off []string
	for _, ctl := range c.enabled {
		off = append(off, "-"+ctl)
	}
	if len(off) > 0 {
		os.WriteFile(v2Mount+c.parent+"/cgroup.subtree_control", []byte(strings.Join(off, " ")), 0o644)
	}
	os.WriteFile(v2Mount+c.parent+"/cgroup.procs", []byte(fmt.Sprint(os.Getpid())), 0o644)
	os.Remove(v2Mount + c.leaf)
	c.leaf = ""
}

func (c *v2Cgroup) Add(pid int) error {
	if err := c.m.AddProc(uint64(pid)); err != nil {
		return fmt.Errorf("cgroup %s: adding pid %d: %w", c.path, pid, err)
	}
	return nil
}

func (c *v2Cgroup) Path() string { return c.path }

func (c *v2Cgroup) Start(cmd *exec.Cmd) error {
	fd, err := os.Open(c.path)
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", c.path, err)
	}
	defer fd.Close()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = int(fd.Fd())
	return cmd.Start()
}

func (c *v2Cgroup) Destroy() error {
	if c.destroyed {
		return nil
	}
	_ = c.m.Kill()
	err := retryBusy(func() error { return c.m.Delete() })
	c.destroyed = err == nil
	if err == nil {
		c.undoLeaf()
	}
	return err
}

type v1Cgroup struct {
	cg, parent cgroup1.Cgroup
	path       string
	destroyed  bool
}

// v1Hierarchy is the controllers the VMM cgroup uses on v1: only those, so
// that a host without (say) blkio still works.
func v1Hierarchy() ([]cgroup1.Subsystem, error) {
	all, err := cgroup1.Default()
	if err != nil {
		return nil, err
	}
	var out []cgroup1.Subsystem
	for _, s := range all {
		switch s.Name() {
		case cgroup1.Memory, cgroup1.Cpu, cgroup1.Pids, cgroup1.Blkio, cgroup1.Freezer:
			out = append(out, s)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no memory, cpu, pids, blkio or freezer controller mounted")
	}
	return out, nil
}

func newV1(name string, lim CgroupLimits) (Cgroup, error) {
	res := &specs.LinuxResources{}
	if lim.MemoryMax > 0 || lim.MemoryHigh > 0 {
		res.Memory = &specs.LinuxMemory{}
		if lim.MemoryMax > 0 {
			res.Memory.Limit = &lim.MemoryMax
		}
		if lim.MemoryHigh > 0 {
			res.Memory.Reservation = &lim.MemoryHigh // v1 has no memory.high; soft limit is the nearest
		}
	}
	if lim.CPUWeight > 0 || lim.CPUQuotaPercent > 0 {
		res.CPU = &specs.LinuxCPU{}
		if lim.CPUWeight > 0 {
			// cgroup v2 weight 1..10000 (default 100) to v1 shares 2..262144 (default 1024).
			shares := uint64(2 + ((lim.CPUWeight-1)*262142)/9999)
			res.CPU.Shares = &shares
		}
		if lim.CPUQuotaPercent > 0 {
			q, p := int64(lim.CPUQuotaPercent)*cpuPeriodUS/100, uint64(cpuPeriodUS)
			res.CPU.Quota, res.CPU.Period = &q, &p
		}
	}
	if lim.PidsMax > 0 {
		n := int64(lim.PidsMax)
		res.Pids = &specs.LinuxPids{Limit: &n}
	}
	if lim.IOWeight > 0 {
		w := uint16(10 + ((lim.IOWeight-1)*990)/9999) // v1 blkio.weight is 10..1000
		res.BlockIO = &specs.LinuxBlockIO{Weight: &w}
	}
	parent, err := cgroup1.Load(cgroup1.NestedPath(""), cgroup1.WithHierarchy(v1Hierarchy))
	if err != nil {
		return nil, fmt.Errorf("cgroup v1: this process's cgroup: %w", err)
	}
	cg, err := cgroup1.New(cgroup1.NestedPath(name), res, cgroup1.WithHierarchy(v1Hierarchy))
	if err != nil {
		return nil, fmt.Errorf("cgroup v1 %s: %w", name, err)
	}
	path := name
	if p, err := cgroup1.NestedPath(name)(cgroup1.Memory); err == nil {
		path = "/sys/fs/cgroup/memory" + p
	}
	return &v1Cgroup{cg: cg, parent: parent, path: path}, nil
}

func (c *v1Cgroup) Add(pid int) error {
	if err := c.cg.AddProc(uint64(pid)); err != nil {
		return fmt.Errorf("cgroup %s: adding pid %d: %w", c.path, pid, err)
	}
	return nil
}

func (c *v1Cgroup) Path() string { return c.path }

// Start moves this process (all its threads) into the cgroup, forks cmd
// there, and moves itself back.
func (c *v1Cgroup) Start(cmd *exec.Cmd) error {
	if err := c.Add(os.Getpid()); err != nil {
		return err
	}
	err := cmd.Start()
	if berr := c.parent.AddProc(uint64(os.Getpid())); berr != nil {
		if err == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		return fmt.Errorf("cgroup %s: moving back out: %w", c.path, berr)
	}
	return err
}

func (c *v1Cgroup) Destroy() error {
	if c.destroyed {
		return nil
	}
	if procs, err := c.cg.Processes(cgroup1.Memory, true); err == nil {
		for _, p := range procs {
			syscall.Kill(p.Pid, syscall.SIGKILL)
		}
	}
	err := retryBusy(func() error { return c.cg.Delete() })
	c.destroyed = err == nil
	return err
}

// retryBusy retries a cgroup removal while killed processes are still
// exiting (EBUSY), for at most 5 s.
func retryBusy(f func() error) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := f()
		if err == nil || errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ReapStaleCgroups removes empty VMM cgroups of this cluster
// ("hpcvm-<job>.<step>-<slice>-<cluster>", see Plan.CgroupName) whose jobs
// are no longer running: a slice killed with SIGKILL (Slurm's KillWait
// expired) cannot remove its own. running reports whether a job id is
// still running; errors count as running (keep the cgroup).
func ReapStaleCgroups(ctx context.Context, cluster string, running func(ctx context.Context, job string) (bool, error), log *slog.Logger) {
	var dirs []string
	filepath.WalkDir(v2Mount, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if strings.Count(strings.TrimPrefix(p, v2Mount), "/") > 8 {
			return fs.SkipDir
		}
		if strings.HasPrefix(d.Name(), "hpcvm-") && (cluster == "" || strings.HasSuffix(d.Name(), "-"+cluster)) {
			dirs = append(dirs, p)
			return fs.SkipDir
		}
		return nil
	})
	verdict := map[string]bool{}
	for _, dir := range dirs {
		job, _, ok := strings.Cut(strings.TrimPrefix(filepath.Base(dir), "hpcvm-"), ".")
		if !ok || job == "" {
			continue
		}
		if procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err != nil || len(strings.TrimSpace(string(procs))) > 0 {
			continue
		}
		alive, seen := verdict[job]
		if !seen {
			r, err := running(ctx, job)
			alive = r || err != nil
			verdict[job] = alive
		}
		if alive {
			continue
		}
		if err := os.Remove(dir); err != nil {
			log.Warn("removing a stale VMM cgroup", "path", dir, "err", err)
			continue
		}
		log.Info("removed a stale VMM cgroup", "path", dir)
	}
}

// SqueueRunning asks Slurm whether a job is still pending or running.
func SqueueRunning(ctx context.Context, job string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "squeue", "-h", "-j", job, "-o", "%T").Output()
	if err != nil {
		// squeue fails for a job the controller no longer knows.
		var ee *exec.ExitError
		if errors.As(err, &ee) && strings.Contains(string(ee.Stderr), "Invalid job id") {
			return false, nil
		}
		return false, err
	}
	st := strings.TrimSpace(string(out))
	return st != "" && st != "COMPLETED" && st != "CANCELLED" && st != "FAILED" && st != "TIMEOUT", nil
}

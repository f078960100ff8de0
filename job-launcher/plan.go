package launcher

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/hpcvm/hpcvm/policies"
)

// Plan is everything the VMM slices of one job step need. It is passed to
// every slice (`hpcvm launch slice --plan JSON`); each slice finds its own
// part by its index (SLURM_PROCID of the slice step).
type Plan struct {
	JobID string `json:"job_id"`
	// Cluster is SLURM_CLUSTER_NAME: job ids are unique only per cluster.
	Cluster string   `json:"cluster,omitempty"`
	StepID  string   `json:"step_id"`
	Nodes   []string `json:"nodes"` // slice i runs on Nodes[i]
	// RuntimeDir is a node-local directory, the same path on every node:
	// the vsock socket (slice 0), the console log, the disk overlay.
	RuntimeDir string `json:"runtime_dir"`
	// VM is the whole VM: run by slice 0 alone (the other slices hold
	// their node), or spread over every slice when Slices is set.
	VM     VMSpec       `json:"vm"`
	Cgroup CgroupLimits `json:"cgroup"`
	// VMM is the command slice 0 runs with `hpcvm vm run`'s flags
	// appended (VMMArgs): `hpcvm vm run` (tests use a fake). The flags
	// include --stop-signal=SIGUSR1: it must ignore SIGTERM and stop on
	// SIGUSR1 (see SliceTermDelay).
	VMM []string `json:"vmm"`
	// Slices, when set, makes the VM distributed (SpanNodes): every slice
	// runs SliceVMM with SliceArgs(index) instead of slice 0 running VMM.
	Slices   *Slices  `json:"slices,omitempty"`
	SliceVMM []string `json:"slice_vmm,omitempty"` // `hpcvm slice`
	// Secret is the distributed VM's secret: it reaches the slices in
	// the slice step's environment (SecretEnv), never in the encoded plan.
	Secret []byte `json:"-"`
}

// VMSpec is one VM.
type VMSpec struct {
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd,omitempty"`
	Disk   string `json:"disk,omitempty"` // the image's disk
	// DiskMode is DiskModeCopy (slice 0 boots a private writable
	// copy-on-write view: the image's disk with an overlay file) or
	// DiskModeShared (the image's disk itself, read-only; the guest root is
	// read-only and /tmp a tmpfs).
	DiskMode string `json:"disk_mode,omitempty"`
	Cmdline  string `json:"cmdline"`
	CPUs     int    `json:"cpus"`
	MemBytes int64  `json:"mem_bytes"`
	Console  string `json:"console,omitempty"` // default RuntimeDir/console.log
	// AgentPort is the guest agent's vsock port.
	AgentPort uint32 `json:"agent_port"`
}

// VsockPath is the hybrid vsock socket of the VM, on Nodes[0].
func (p *Plan) VsockPath() string { return filepath.Join(p.RuntimeDir, "vsock.sock") }

// ConsolePath is where slice 0 writes the guest's serial console.
func (p *Plan) ConsolePath() string {
	if p.VM.Console != "" {
		return p.VM.Console
	}
	return filepath.Join(p.RuntimeDir, "console.log")
}

// Disk modes (plugstack disk=, `hpcvm launch --disk-mode`). DiskModeCopy
// keeps its name from when it copied the whole disk: it is now a
// copy-on-write overlay (nothing is copied), private to the job all the
// same.
const (
	DiskModeCopy   = "copy"
	DiskModeShared = "ro"
)

// DiskOverlay is the file that holds the job's writes to its disk
// (DiskModeCopy): the VMM creates it, sparse; the image's disk is never
// written. Slice 0 removes it when the VMM has exited.
func (p *Plan) DiskOverlay() string { return filepath.Join(p.RuntimeDir, "disk.overlay") }

// VMMStopSignal is how slice 0 stops its VMM (--stop-signal).
const VMMStopSignal = syscall.SIGUSR1

// VMMArgs are the `hpcvm vm run` flags slice 0 runs its VMM with.
func (p *Plan) VMMArgs() []string {
	args := []string{"--kernel", p.VM.Kernel, "--cpus", strconv.Itoa(p.VM.CPUs),
		"--mem", fmt.Sprintf("%dMiB", p.VM.MemBytes>>20), "--cmdline", p.VM.Cmdline,
		"--vsock", p.VsockPath(), "--console", p.ConsolePath(), "--stop-signal=" + unix.SignalName(VMMStopSignal)}
	if p.VM.Initrd != "" {
		args = append(args, "--initrd", p.VM.Initrd)
	}
	switch {
	case p.VM.Disk == "":
	case p.VM.DiskMode == DiskModeShared:
		args = append(args, "--disk", p.VM.Disk+",ro")
	default:
		args = append(args, "--disk", p.VM.Disk+",overlay="+p.DiskOverlay())
	}
	return args
}

// CgroupName is slice i's cgroup name, unique per cluster, job step and
// node: hpcvm-<job>.<step>-<slice>[-<cluster>].
func (p *Plan) CgroupName(i int) string {
	n := fmt.Sprintf("hpcvm-%s.%s-%d", p.JobID, p.StepID, i)
	if p.Cluster != "" {
		n += "-" + p.Cluster
	}
	return n
}

// Encode is the plan as one command-line argument.
func (p *Plan) Encode() (string, error) {
	b, err := json.Marshal(p)
	return string(b), err
}

// DecodePlan reads Encode's output strictly.
func DecodePlan(s string) (*Plan, error) {
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	var p Plan
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("slice plan: %w", err)
	}
	if len(p.Nodes) == 0 || len(p.VMM) == 0 || p.RuntimeDir == "" || p.VM.Kernel == "" || p.VM.CPUs < 1 || p.VM.MemBytes <= 0 {
		return nil, fmt.Errorf("slice plan: incomplete (nodes %v, runtime dir %q, kernel %q, %d CPUs, %d bytes)",
			p.Nodes, p.RuntimeDir, p.VM.Kernel, p.VM.CPUs, p.VM.MemBytes)
	}
	return &p, nil
}

// Wish is what the user asked with --vm-* options (all optional).
type Wish struct {
	Image              string
	Mem                string // --vm-mem, e.g. 4GiB
	CPUs               int    // --vm-cpus: vCPUs of the whole VM
	CheckpointInterval string // --vm-checkpoint-interval
}

// builtinReserve is the policy's built-in VMM memory reserve per node
// (docs/policies.md: limits.vmm_mem_reserve_per_node).
const builtinReserve = 256 << 20

// Request is the policy request for a job step: Slurm's allocation plus the
// user's wishes. With no --vm-mem, the guest gets the node's allocated
// memory minus reserve; with no --vm-cpus, every allocated CPU.
func Request(env *SlurmEnv, w Wish, walltimeSecs int64, reserve int64) (policies.Request, error) {
	req := policies.Request{
		JobID: env.JobID, User: env.User, Partition: env.Partition, Account: env.Account, QOS: env.QOS,
		Image: w.Image, Nodes: len(env.Nodes), CPUs: w.CPUs,
	}
	if req.CPUs == 0 {
		req.CPUs = env.TotalCPUs()
	}
	if w.Mem != "" {
		m, err := policies.ParseSize(w.Mem)
		if err != nil {
			return req, fmt.Errorf("--vm-mem=%s: %w", w.Mem, err)
		}
		req.MemPerNode = m
	} else if env.MemPerNodeMiB > 0 {
		avail := env.MemPerNodeMiB << 20
		if avail-reserve < 64<<20 {
			return req, fmt.Errorf("the job has %d MiB per node, too little for a VM next to the VMM's reserve of %d MiB: ask for more with --mem", env.MemPerNodeMiB, reserve>>20)
		}
		req.MemPerNode = policies.Size((avail - reserve) &^ (1<<20 - 1))
	}
	if w.CheckpointInterval != "" {
		if err := req.CheckpointInterval.UnmarshalText([]byte(w.CheckpointInterval)); err != nil {
			return req, fmt.Errorf("--vm-checkpoint-interval=%s: %w", w.CheckpointInterval, err)
		}
	}
	if walltimeSecs > 0 {
		req.Walltime = policies.Duration(walltimeSecs * 1e9)
	}
	return req, nil
}

// Shape turns the effective settings into the VM. Until the distributed
// VMM, the whole VM (all vCPUs) runs on the first node with one node's
// memory.
func Shape(eff *policies.Effective, img Image, console, diskMode string) VMSpec {
	cpus := eff.VCPUs
	if cpus < 1 {
		cpus = max(eff.VCPUsPerNode, 1)
	}
	cmdline := img.Cmdline
	if diskMode == DiskModeShared {
		cmdline = readOnlyRoot(cmdline)
	}
	return VMSpec{
		Kernel: img.Kernel, Initrd: img.Initrd, Disk: img.Disk, DiskMode: diskMode, Cmdline: cmdline,
		CPUs: cpus, MemBytes: int64(eff.MemPerNode) &^ (1<<20 - 1), Console: console, AgentPort: img.AgentPort,
	}
}

// Limits converts the policy's cgroup settings.
func Limits(eff *policies.Effective) CgroupLimits {
	c := eff.Cgroup
	return CgroupLimits{
		MemoryMax: int64(c.MemoryMax), MemoryHigh: int64(c.MemoryHigh), CPUWeight: c.CPUWeight,
		CPUQuotaPercent: c.CPUQuotaPercent, PidsMax: c.PidsMax, IOWeight: c.IOWeight,
	}
}

// readOnlyRoot makes a kernel command line mount the root read-only.
func readOnlyRoot(cmdline string) string {
	var out []string
	for _, w := range strings.Fields(cmdline) {
		if w != "rw" && w != "ro" {
			out = append(out, w)
		}
	}
	return strings.Join(append(out, "ro"), " ")
}

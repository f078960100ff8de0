package launcher

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/hpcvm/hpcvm/vmm/dsm"
)

// Span modes (`hpcvm launch --span`, plugstack span=).
//
// SpanSingle runs the whole VM on the step's first node (the other nodes'
// slices hold them for the VM). SpanNodes runs one slice of a distributed
// VM on every node (docs/dsm.md): each node runs the vCPUs of the CPUs Slurm
// allocated there, guest memory is coherent across them. A step on one
// node always runs a single VM: no coherence overhead.
const (
	SpanSingle = "single"
	SpanNodes  = "nodes"
)

// SecretEnv carries the VM's shared secret (hex) from the launcher to the
// slice step: in srun's environment, never on a command line.
const SecretEnv = "HPCVM_VM_SECRET"

// Slices is a distributed VM's layout: slice i runs on Plan.Nodes[i].
type Slices struct {
	// Placement[i] are the vCPU ids slice i runs (vCPU 0 on slice 0).
	Placement [][]int `json:"placement"`
	// Addrs[i] is slice i's HOST:PORT on the nodes' network.
	Addrs []string `json:"addrs"`
	// VM is the VM's id in the mesh's authentication.
	VM string `json:"vm"`
}

// SlicePort is the TCP port a step's slices listen on: derived from the
// job and step, so two steps sharing a node do not collide (unless their
// ids hash alike: the slice then fails naming the address in use).
func SlicePort(jobID, step string) int {
	h := fnv.New32a()
	h.Write([]byte(jobID + "." + step))
	return 17000 + int(h.Sum32()%10000)
}

// PlaceVCPUs deals the VM's vCPUs to the nodes in order, each node taking
// as many as Slurm allocated CPUs there, until all are placed: vCPU 0 is
// on the first node (the home slice). cpus beyond the allocation is an
// error; fewer leave the last nodes' slices without vCPUs.
func PlaceVCPUs(cpus int, perNode []int) ([][]int, error) {
	total := 0
	for _, c := range perNode {
		total += c
	}
	if cpus < 1 || cpus > total {
		return nil, fmt.Errorf("%d vCPUs do not fit the %d CPUs allocated on %d node(s)", cpus, total, len(perNode))
	}
	out := make([][]int, len(perNode))
	next := 0
	for i, c := range perNode {
		for j := 0; j < c && next < cpus; j++ {
			out[i] = append(out[i], next)
			next++
		}
	}
	return out, nil
}

// newSecret is a fresh per-VM secret.
func newSecret() ([]byte, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	return b, nil
}

// SecretFile is where a slice keeps the VM secret for `hpcvm slice`.
func (p *Plan) SecretFile() string { return filepath.Join(p.RuntimeDir, "vm.key") }

// writeSecret takes the secret from the slice step's environment (SecretEnv)
// and writes it, mode 0600, where `hpcvm slice --secret-file` reads it.
func (p *Plan) writeSecret(getenv func(string) string) error {
	v := getenv(SecretEnv)
	if v == "" {
		return errors.New(SecretEnv + " is not set: the launcher hands the VM secret to the slice step in its environment")
	}
	b, err := hex.DecodeString(v)
	if err != nil || len(b) < 16 {
		return errors.New(SecretEnv + ": want at least 16 bytes in hex")
	}
	f, err := os.OpenFile(p.SecretFile(), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// SliceArgs are the `hpcvm slice` flags of slice i of a distributed VM
// (Plan.Slices): the guest options on every slice, as `hpcvm slice` wants
// (only slice 0 reads the kernel and disks and hosts the devices).
func (p *Plan) SliceArgs(i int) []string {
	s := p.Slices
	args := []string{"--id", strconv.Itoa(i), "--peers", strings.Join(s.Addrs, ","),
		"--listen", ":" + s.Addrs[i][strings.LastIndex(s.Addrs[i], ":")+1:],
		"--vm-id", s.VM, "--secret-file", p.SecretFile(), "--placement", dsm.FormatPlacement(s.Placement),
		"--mem", fmt.Sprintf("%dMiB", p.VM.MemBytes>>20), "--kernel", p.VM.Kernel, "--cmdline", p.VM.Cmdline,
		"--stop-signal=" + unix.SignalName(VMMStopSignal)}
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
	// Under nested paging every walk of a page table is a write: replicate
	// the kernel's tables rather than move them (docs/dsm.md).
	args = append(args, "--replicate-tables")
	if i == 0 {
		args = append(args, "--vsock", p.VsockPath(), "--console", p.ConsolePath())
	}
	return args
}

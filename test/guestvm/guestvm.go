// Package guestvm runs Linux guests inside a virt node (test/virtnode) under
// either hpcvm (`bin/hpcvm vm run`) or the reference VMM
// (`qemu-system-x86_64 -enable-kvm -M microvm`), through the vmtool helper
// (test/vmtool) that measures time to a console marker, exit status and the
// VMM's memory. Shared by the e2e tests (test/e2e) and the boot benchmark
// (test/bench).
package guestvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/hpcvm/hpcvm/test/virtnode"
)

// Artifacts are the guest files built by mk/guest.mk (docs/guest.md).
type Artifacts struct {
	Dir           string // $HPCVM_CACHE/guest
	BzImage       string // minimal kernel, bzImage
	Vmlinux       string // minimal kernel, PVH ELF
	CloudKernel   string // Debian cloud kernel (bzImage)
	CloudInitrd   string // its initramfs (modules + test init)
	TestInitramfs string // busybox test initramfs for the minimal kernel
}

// FindArtifacts returns the guest artifact paths under $HPCVM_CACHE/guest
// (override the directory with $HPCVM_GUEST_DIR). It does not check they
// exist; see Missing.
func FindArtifacts() Artifacts {
	dir := os.Getenv("HPCVM_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join(virtnode.CacheDir(), "guest")
	}
	return Artifacts{
		Dir:           dir,
		BzImage:       filepath.Join(dir, "bzImage"),
		Vmlinux:       filepath.Join(dir, "vmlinux"),
		CloudKernel:   filepath.Join(dir, "cloud", "vmlinuz"),
		CloudInitrd:   filepath.Join(dir, "cloud", "initramfs.cpio.gz"),
		TestInitramfs: filepath.Join(dir, "test-initramfs.cpio.gz"),
	}
}

// Need skips (or, with HPCVM_E2E_REQUIRE=1, fails) the test when one of the
// files is missing, naming the make target that builds it.
func Need(t testing.TB, files ...string) {
	t.Helper()
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			msg := fmt.Sprintf("%s missing (make guest-kernel guest-cloud-kernel guest-initramfs build; make build for bin/hpcvm): %v", f, err)
			if os.Getenv("HPCVM_E2E_REQUIRE") == "1" {
				t.Fatal(msg)
			}
			t.Skip("skipping: " + msg)
		}
	}
}

// The test initramfs protocol (guest/initramfs/init, docs/guest.md): /init
// reads hpcvm.KEY=VALUE from the kernel command line and prints
// "HPCVM key=value" lines on the console.
const (
	// UserspaceMarker is the first console line /init prints for every
	// guest kernel (the cloud kernel's initramfs prints "HPCVM modules=" first
	// only after inserting modules, so this line is comparable across VMMs).
	UserspaceMarker = "HPCVM kernel="
	// BaseCmdline goes first on every guest command line. quiet: in virt
	// nodes, guests that print the whole kernel log on the serial port
	// (two exits per byte) triple-fault or hang now and then, under QEMU
	// microvm as under hpcvm, and once took the node's own kernel down
	// (Debian cloud kernel, loglevel=7: 3-6 failed boots out of 8 for
	// each VMM; quiet: 0 of 10). See docs/testing.md.
	BaseCmdline = "console=ttyS0 panic=-1 quiet"
	// BenchCmdline boots, prints the facts and powers off at once.
	BenchCmdline = BaseCmdline + " hpcvm.disk=off"
)

// HPCVMBin is $HPCVM_BIN or <module root>/bin/hpcvm.
func HPCVMBin() string {
	if b := os.Getenv("HPCVM_BIN"); b != "" {
		return b
	}
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "bin", "hpcvm")
}

// BuildVMTool builds test/vmtool into dir and returns its path.
func BuildVMTool(ctx context.Context, dir string) (string, error) {
	_, file, _, _ := runtime.Caller(0)
	out := filepath.Join(dir, "vmtool")
	return out, virtnode.GoBuild(ctx, filepath.Join(filepath.Dir(file), "..", "vmtool"), out)
}

// VMM selects the monitor that runs the guest.
type VMM int

const (
	HPCVM   VMM = iota // bin/hpcvm vm run
	MicroVM            // qemu-system-x86_64 -enable-kvm -M microvm (reference)
)

func (v VMM) String() string {
	if v == MicroVM {
		return "qemu-microvm"
	}
	return "hpcvm"
}

// Disk is a raw disk image for the guest's virtio-blk.
type Disk struct {
	Path     string
	ReadOnly bool
}

// VM describes one guest run.
type VM struct {
	Kernel, Initrd string
	Disks          []Disk
	CPUs           int    // default 1
	MemMiB         int    // default 256
	Cmdline        string // full kernel command line (include console=ttyS0)
	Vsock          string // hybrid vsock socket path (hpcvm only)
	HPCVMBin       string // default HPCVMBin()
}

// Argv is the command line that runs vm under vmm.
func (vm VM) Argv(vmm VMM) []string {
	cpus, mem := vm.CPUs, vm.MemMiB
	if cpus <= 0 {
		cpus = 1
	}
	if mem <= 0 {
		mem = 256
	}
	if vmm == MicroVM {
		a := []string{"qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host",
			"-smp", strconv.Itoa(cpus), "-m", strconv.Itoa(mem),
			"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
			"-kernel", vm.Kernel}
		if vm.Initrd != "" {
			a = append(a, "-initrd", vm.Initrd)
		}
		for i, d := range vm.Disks {
			drive := fmt.Sprintf("id=d%d,file=%s,format=raw,if=none", i, d.Path)
			if d.ReadOnly {
				drive += ",readonly=on"
			}
			a = append(a, "-drive", drive, "-device", fmt.Sprintf("virtio-blk-device,drive=d%d", i))
		}
		return append(a, "-append", vm.Cmdline)
	}
	bin := vm.HPCVMBin
	if bin == "" {
		bin = HPCVMBin()
	}
	a := []string{bin, "vm", "run", "--kernel", vm.Kernel,
		"--cpus", strconv.Itoa(cpus), "--mem", fmt.Sprintf("%dMiB", mem), "--cmdline", vm.Cmdline}
	if vm.Initrd != "" {
		a = append(a, "--initrd", vm.Initrd)
	}
	for _, d := range vm.Disks {
		spec := d.Path
		if d.ReadOnly {
			spec += ",ro"
		}
		a = append(a, "--disk", spec)
	}
	if vm.Vsock != "" {
		a = append(a, "--vsock", vm.Vsock)
	}
	return a
}

// ToolResult is what vmtool reports about a run (see test/vmtool).
type ToolResult struct {
	MarkerMs   float64 `json:"marker_ms"`
	ExitMs     float64 `json:"exit_ms"`
	ExitCode   int     `json:"exit_code"`
	MaxRSSKiB  int64   `json:"maxrss_kib"`
	PeakRSSKiB int64   `json:"peak_rss_kib"`
	PeakOwnKiB int64   `json:"peak_own_kib"`
	Samples    int     `json:"samples"`
	// KilledAfterHalt: the guest halted/powered down but the VMM kept
	// running, so vmtool killed it (see vmtool -halt-grace).
	KilledAfterHalt bool `json:"killed_after_halt,omitempty"`
}

// Run is the outcome of one guest run.
type Run struct {
	Console  string // the VMM's stdout: the guest's serial console
	Stderr   string // the VMM's stderr (without vmtool's result line)
	ExitCode int    // the VMM's exit status
	Tool     ToolResult
}

// Runner runs guests in one node.
type Runner struct {
	Node   *virtnode.Node
	VMTool string // path of the vmtool binary (host path, seen by the node)
}

// Start runs vm under vmm in the node in the background; marker is the
// console text whose first appearance is timed (may be empty). Use
// (*virtnode.Proc).Wait and then Parse.
func (r Runner) Start(vm VM, vmm VMM, marker string) (*virtnode.Proc, error) {
	mem := vm.MemMiB
	if mem <= 0 {
		mem = 256
	}
	argv := append([]string{r.VMTool, "run", "-marker", marker, "-guest-mem-mib", strconv.Itoa(mem), "--"}, vm.Argv(vmm)...)
	return r.Node.RunBackground("exec " + Quote(argv) + " </dev/null")
}

// Run runs vm under vmm in the node and waits for the VMM to exit.
func (r Runner) Run(ctx context.Context, vm VM, vmm VMM, marker string) (Run, error) {
	p, err := r.Start(vm, vmm, marker)
	if err != nil {
		return Run{}, err
	}
	res, err := p.Wait(ctx)
	run, perr := Parse(res)
	if err != nil {
		return run, fmt.Errorf("%s: %w\nconsole:\n%s\nstderr:\n%s", vmm, err, Tail(run.Console, 40), Tail(run.Stderr, 20))
	}
	return run, perr
}

// Parse splits a vmtool command's result into console, VMM stderr and the
// tool's measurements.
func Parse(res virtnode.Result) (Run, error) {
	run := Run{Console: res.Stdout, ExitCode: res.ExitCode}
	var keep []string
	found := false
	for _, l := range strings.Split(res.Stderr, "\n") {
		if j, ok := strings.CutPrefix(l, "VMTOOL-RESULT "); ok {
			if err := json.Unmarshal([]byte(j), &run.Tool); err != nil {
				return run, fmt.Errorf("bad vmtool result %q: %v", j, err)
			}
			found = true
			continue
		}
		keep = append(keep, l)
	}
	run.Stderr = strings.Join(keep, "\n")
	if !found {
		return run, errors.New("vmtool printed no result (did it run?)\nstderr:\n" + res.Stderr)
	}
	return run, nil
}

func Tail(s string, lines int) string {
	parts := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// Quote joins args into a /bin/sh command line, single-quoting each.
func Quote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// PlatformReset reports whether hpcvm stopped because the guest
// triple-faulted. In virt nodes Debian kernels do this now and then under
// the reference QEMU microvm as under hpcvm (docs/testing.md), so tests may
// boot once more; a second reset is a failure.
func PlatformReset(r Run) bool {
	return TripleFaulted(r.Stderr)
}

// TripleFaulted reports whether hpcvm's stderr says the guest triple-faulted.
func TripleFaulted(stderr string) bool {
	return strings.Contains(stderr, "triple fault (KVM_EXIT_SHUTDOWN)")
}

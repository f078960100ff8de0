//go:build e2e && tfrate

package e2e

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
)

// TestGuestResetRate measures how often a 2-vCPU Linux guest fails to boot
// in a virt node, for hpcvm and for the reference VMM (QEMU's microvm with
// the node's KVM), booting them alternately in one node so both see the
// same platform: whether the guest triple faults that the e2e tests retry
// come from hpcvm or from the nested platform. HPCVM_TF_RUNS boots of each
// (default 10), `make e2e-reset-rate`. Every boot must end in a poweroff
// or a guest reset (triple fault); anything else fails the test.
func TestGuestResetRate(t *testing.T) {
	runs := 10
	if v := os.Getenv("HPCVM_TF_RUNS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("HPCVM_TF_RUNS=%q: want a count >= 1", v)
		}
		runs = n
	}
	// HPCVM_TF_KERNEL picks the guest: minimal (default) or cloud
	// (Debian's cloud kernel and its initramfs, the kernel most e2e
	// resets were seen with).
	kc := kernelCases(guestvm.FindArtifacts())[0]
	if os.Getenv("HPCVM_TF_KERNEL") == "cloud" {
		kc = kernelCases(guestvm.FindArtifacts())[2]
	}
	r := node(t)
	bin := mustHPCVM(t)
	guestvm.Need(t, kc.kernel, kc.initrd)
	disk := makeDisk(t)
	vm := guestvm.VM{Kernel: kc.kernel, Initrd: kc.initrd, CPUs: 2, MemMiB: kc.memMiB,
		Disks:    []guestvm.Disk{{Path: disk.path, ReadOnly: true}},
		Cmdline:  guestvm.BaseCmdline + " hpcvm.disk=ro hpcvm.test=/check.sh",
		HPCVMBin: bin}
	resets := map[guestvm.VMM]int{}
	for i := 0; i < runs; i++ {
		for _, vmm := range []guestvm.VMM{guestvm.HPCVM, guestvm.MicroVM} {
			healthyNode(t)
			ctx, cancel := context.WithTimeout(testCtx(t), 5*time.Minute)
			run, err := r.Run(ctx, vm, vmm, guestvm.UserspaceMarker)
			cancel()
			if err != nil {
				t.Fatalf("%v boot %d: %v", vmm, i+1, err)
			}
			powerOff := strings.Contains(run.Console, "reboot: Power down")
			// A guest reset: hpcvm reports the triple fault and exits
			// non-zero; QEMU with -no-reboot exits 0 without a poweroff.
			reset := guestvm.TripleFaulted(run.Stderr) || vmm == guestvm.MicroVM && run.ExitCode == 0 && !powerOff
			switch {
			case powerOff && run.ExitCode == 0:
			case reset:
				resets[vmm]++
				// The console's end tells a kernel panic (which resets
				// with panic=-1) from a silent triple fault.
				t.Logf("%v boot %d: guest reset\nstderr: %s\nconsole (tail):\n%s", vmm, i+1,
					guestvm.Tail(run.Stderr, 3), guestvm.Tail(run.Console, 5))
			default:
				t.Fatalf("%v boot %d: neither a poweroff nor a guest reset\n%s", vmm, i+1, dump(run))
			}
		}
	}
	t.Logf("guest resets in %d boots of a 2-vCPU %s kernel: hpcvm %d, qemu-microvm %d (node kernel %s)",
		runs, kc.name, resets[guestvm.HPCVM], resets[guestvm.MicroVM], strings.TrimSpace(r.Node.MustRun(t, testCtx(t), "uname -r")))
}

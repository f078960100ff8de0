//go:build e2e

// Package e2e boots real Linux guests under bin/hpcvm inside a virt node
// (test/virtnode) and checks them from the outside: CPU count, memory,
// virtio-blk, vsock, poweroff and exit status. See docs/testing.md.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
	"github.com/hpcvm/hpcvm/test/virtnode"
)

// One node for the whole package: booting a node costs several seconds and
// the tests only need an isolated KVM host, not a fresh one each.
var shared struct {
	once    sync.Once
	cluster *virtnode.Cluster
	runner  guestvm.Runner
	err     error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.cluster != nil {
		shared.cluster.Close()
	}
	if hpcvmCopy.dir != "" {
		os.RemoveAll(hpcvmCopy.dir)
	}
	os.Exit(code)
}

// node returns the shared node's guest runner, booting the node on first
// use. It skips (or fails, see virtnode.RequirePrereqs) when virt nodes
// cannot run, and logs the node console tail if the test fails.
func node(t *testing.T) guestvm.Runner {
	t.Helper()
	virtnode.RequirePrereqs(t)
	shared.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), virtnode.BootTimeout)
		defer cancel()
		c, err := virtnode.Start(ctx, virtnode.Config{Nodes: 1, CPUs: 2, MemMiB: 2048, Logf: t.Logf})
		if err != nil {
			shared.err = err
			return
		}
		shared.cluster = c
		tool, err := guestvm.BuildVMTool(ctx, c.Dir())
		if err != nil {
			shared.err = err
			return
		}
		shared.runner = guestvm.Runner{Node: c.Nodes[0], VMTool: tool}
		shared.err = reloadKVM(ctx, c.Nodes[0])
	})
	if shared.err != nil {
		t.Fatalf("virt node: %v", shared.err)
	}
	healthyNode(t)
	n := shared.runner.Node
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("virt node console (last lines):\n%s", n.ConsoleTail(20))
		}
	})
	return shared.runner
}

// healthyNode boots the shared node afresh if it died or hung, saying why.
// Under TCG a node running KVM guests has stopped dead now and then, and
// once hung it fails every later test (docs/testing.md, "Pitfalls").
func healthyNode(t *testing.T) {
	t.Helper()
	n := shared.runner.Node
	ok, why := n.Healthy()
	if ok {
		return
	}
	t.Logf("%s; restarting it (docs/testing.md: nodes that hang under KVM guests). Console tail:\n%s", why, n.ConsoleTail(20))
	ctx, cancel := context.WithTimeout(context.Background(), virtnode.BootTimeout)
	defer cancel()
	if err := shared.cluster.Restart(ctx, n); err != nil {
		t.Fatalf("restarting the virt node: %v", err)
	}
}

// testCtx bounds one guest run; generous, TCG is slow and the machine shared.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// mustHPCVM returns a private copy of bin/hpcvm (taken once per package
// run): other engineers rebuild bin/hpcvm in place while tests run, and a
// binary changing under a node's 9p mapping crashes the VMM.
func mustHPCVM(t *testing.T) string {
	t.Helper()
	b := guestvm.HPCVMBin()
	guestvm.Need(t, b)
	hpcvmCopy.once.Do(func() {
		// Nodes see the host's root: any host directory will do.
		dir, err := os.MkdirTemp("", "hpcvm-e2e-bin-")
		if err != nil {
			hpcvmCopy.err = err
			return
		}
		hpcvmCopy.dir = dir
		dst := filepath.Join(dir, "hpcvm")
		hpcvmCopy.path, hpcvmCopy.err = dst, copyFile(b, dst)
	})
	if hpcvmCopy.err != nil {
		t.Fatal(hpcvmCopy.err)
	}
	return hpcvmCopy.path
}

var hpcvmCopy struct {
	once      sync.Once
	dir, path string
	err       error
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}

func logRun(t *testing.T, name string, r guestvm.Run) {
	t.Helper()
	t.Logf("%s: exit %d, userspace marker after %.0f ms, exit after %.0f ms, VMM peak RSS %d KiB (own %d KiB)",
		name, r.ExitCode, r.Tool.MarkerMs, r.Tool.ExitMs, r.Tool.MaxRSSKiB, r.Tool.PeakOwnKiB)
	if r.Tool.KilledAfterHalt {
		t.Logf("%s: the guest kernel halted/powered down but the VMM did not exit; vmtool killed it", name)
	}
}

func dump(r guestvm.Run) string {
	return fmt.Sprintf("exit %d\n--- console ---\n%s\n--- VMM stderr ---\n%s", r.ExitCode, r.Console, r.Stderr)
}

// bootLimit bounds a guest boot that is not yet a failure: boots in a node
// take 3-70 s. Past it the guest is taken as hung.
const bootLimit = 4 * time.Minute

// runRetrying is Runner.Run for a short guest run (a minute at most when
// all is well). A run still going after bootLimit+1m is taken as hung, and
// one whose node hung or died as a platform failure: either way the guest
// boots once more (on a restarted node if need be), saying so in the log.
func runRetrying(t *testing.T, r guestvm.Runner, vm guestvm.VM, vmm guestvm.VMM, marker string) (guestvm.Run, error) {
	t.Helper()
	attempt := func() (guestvm.Run, error) {
		ctx, cancel := context.WithTimeout(testCtx(t), bootLimit+time.Minute)
		defer cancel()
		return r.Run(ctx, vm, vmm, marker)
	}
	run, err := attempt()
	healthy, _ := r.Node.Healthy()
	if err == nil || !(errors.Is(err, context.DeadlineExceeded) || errors.Is(err, virtnode.ErrNodeHung) || !healthy) {
		return run, err
	}
	t.Logf("attempt 1 failed; booting once more (docs/testing.md: failures seen in virt nodes)\n%v", err)
	healthyNode(t)
	return attempt()
}

// reloadKVM reloads the node's kvm_amd with the options in
// HPCVM_E2E_KVM_AMD, if set (e.g. npt=0: the node's KVM shadows its
// guests' page tables instead of nesting them; docs/dsm.md).
func reloadKVM(ctx context.Context, n *virtnode.Node) error {
	opts := os.Getenv("HPCVM_E2E_KVM_AMD")
	if opts == "" {
		return nil
	}
	r, err := n.Run(ctx, "set -e; rmmod kvm_amd; modprobe kvm_amd "+opts)
	if err == nil && r.ExitCode != 0 {
		err = fmt.Errorf("reloading kvm_amd %s: exit %d: %s", opts, r.ExitCode, r.Stderr)
	}
	return err
}

//go:build e2e

package lab

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/virtnode"
)

func startVirtT(t *testing.T, nodes int) *VirtCluster {
	t.Helper()
	return startVirtWith(t, VirtOptions{Nodes: nodes, ImageStore: imageStore()})
}

// startVirtWith starts a virt lab with o's node count, shape, image store
// and plugin arguments; the rest (directory, policy, binaries) is set here.
func startVirtWith(t *testing.T, o VirtOptions) *VirtCluster {
	t.Helper()
	RequireHost(t)
	if err := virtnode.Prerequisites(); err != nil {
		Require(t, err.Error())
	}
	dir, err := os.MkdirTemp("", "hpcvm-virt-lab-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := WritePolicy(filepath.Join(dir, "policy")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), virtnode.BootTimeout+2*time.Minute)
	defer cancel()
	o.Dir, o.Hpcvm, o.SpankSO, o.PolicyDir, o.Logf = dir, HpcvmBin(), SpankSO(), filepath.Join(dir, "policy"), t.Logf
	c, err := StartVirt(ctx, o)
	if err != nil {
		t.Fatalf("StartVirt: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("slurmctld log:\n%s", tail(c.ControllerLog(), 30))
			for _, n := range c.Nodes {
				t.Logf("slurmd %s log:\n%s", n.Name, tail(c.SlurmdLog(n.Name), 30))
			}
		}
		c.Close()
	})
	os.MkdirAll(filepath.Join(dir, "work"), 0o777)
	return c
}

func imageStore() string {
	if s := os.Getenv("HPCVM_IMAGE_STORE"); s != "" {
		return s
	}
	return "/var/lib/hpcvm/images"
}

// TestVirtLabUp brings up the lab in 2 virt nodes and runs plain jobs on
// both: slurmd and the plugin load inside the nodes, KVM is there for
// job steps, a job without --vm-image is untouched, and the plugin refuses
// a policy violation at submission.
func TestVirtLabUp(t *testing.T) {
	c := startVirtT(t, 2)
	ctx := testCtx(t, 3*time.Minute)
	// The task's parent is its slurmstepd, which has the plugin loaded.
	r, err := c.Client(ctx, "srun -N 2 -l sh -c 'hostname; test -c /dev/kvm && echo kvm-ok; grep -q hpcvm_spank /proc/$PPID/maps && echo plugin-loaded'")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"0: n1", "1: n2", "0: kvm-ok", "1: kvm-ok", "0: plugin-loaded", "1: plugin-loaded"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("srun output lacks %q: %s", want, r)
		}
	}
	// Accounting: slurmdbd next to slurmctld records the job for sacct.
	id, _, err := Submit(ctx, c, "sbatch -N 2 -o /dev/null --wrap 'exit 3'")
	if err != nil {
		t.Fatal(err)
	}
	if j, err := WaitJob(ctx, c, id); err != nil || j.State != "FAILED" || j.ExitCode != "3:0" {
		t.Errorf("plain job %s: %s %s, %v; want FAILED 3:0", id, j.State, j.ExitCode, err)
	}
	wantAcct(t, ctx, c, id, "FAILED", "3:0")
	r, err = c.Client(ctx, "sbatch -N 1 --vm-image=forbidden-os --wrap true; echo rc=$?")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Stdout, "rc=1") || !strings.Contains(r.Stderr, `refused by rule "no-forbidden"`) {
		t.Errorf("policy violation not refused by sbatch: %s", r)
	}
}

// noHpcvmLeft checks that no hpcvm process (launcher, slice, VMM) is left
// on any node once a job has ended.
func noHpcvmLeft(t *testing.T, ctx context.Context, c *VirtCluster) {
	t.Helper()
	for i := range c.Nodes {
		var left string
		// Slurm reaps the step's processes right after the job state
		// changes: give it a few seconds.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Second) {
			r, err := c.NodeRun(ctx, i, "ps -eo args | grep -E '^(/[^ ]*/)?hpcvm ' || true")
			if err != nil {
				t.Errorf("node %d: %v", i+1, err)
				return
			}
			if left = strings.TrimSpace(r.Stdout); left == "" || time.Now().After(deadline) {
				break
			}
		}
		if left != "" {
			t.Errorf("node %d: hpcvm processes left: %q", i+1, left)
		}
	}
}

//go:build e2e

package lab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/virtnode"
)

func startVirtT(t *testing.T, nodes int) *VirtCluster {
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
	c, err := StartVirt(ctx, VirtOptions{Nodes: nodes, Dir: dir, Hpcvm: HpcvmBin(), SpankSO: SpankSO(),
		PolicyDir: filepath.Join(dir, "policy"), ImageStore: imageStore(), Logf: t.Logf})
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
	r, err = c.Client(ctx, "sbatch -N 1 --vm-image=forbidden-os --wrap true; echo rc=$?")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(r.Stdout, "rc=1") || !strings.Contains(r.Stderr, `refused by rule "no-forbidden"`) {
		t.Errorf("policy violation not refused by sbatch: %s", r)
	}
}

// TestVirtLabDebian12Job runs a real VM job: sbatch -N 2 --vm-image=debian12
// boots the image under hpcvm's VMM inside the virt nodes and runs the
// script in the guest. The boot of a systemd guest under nested
// virtualization in TCG takes minutes, so this test is opt-in
// (HPCVM_SLURM_VM_TEST=1, make e2e-slurm-vm) and needs the image (make
// image-debian12).
func TestVirtLabDebian12Job(t *testing.T) {
	if os.Getenv("HPCVM_SLURM_VM_TEST") != "1" {
		t.Skip("skipping: set HPCVM_SLURM_VM_TEST=1 (make e2e-slurm-vm) to boot debian12 in the lab")
	}
	if _, err := os.Stat(filepath.Join(imageStore(), "debian12", "manifest.json")); err != nil {
		t.Fatalf("the debian12 image is missing (make image-debian12): %v", err)
	}
	c := startVirtT(t, 2)
	ctx := testCtx(t, 25*time.Minute)
	work := filepath.Join(c.Dir, "work")
	script := filepath.Join(work, "job.sh")
	os.WriteFile(script, []byte("#!/bin/sh\n#SBATCH --exclusive\ngrep PRETTY_NAME /etc/os-release\necho cpus=$(nproc) job=$SLURM_JOB_ID\necho err-line >&2\nexit 3\n"), 0o755)
	out, errf := filepath.Join(work, "job.out"), filepath.Join(work, "job.err")
	id, _, err := Submit(ctx, c, fmt.Sprintf("sbatch -N 2 --vm-image=debian12 --vm-console=%s/console.log -o %s -e %s %s", work, out, errf, script))
	if err != nil {
		t.Fatal(err)
	}
	j, err := WaitJob(ctx, c, id)
	if err != nil {
		t.Fatal(err)
	}
	o, _ := os.ReadFile(out)
	e, _ := os.ReadFile(errf)
	if j.State != "FAILED" || j.ExitCode != "3:0" {
		t.Errorf("job %s: %s ExitCode=%s, want FAILED 3:0\nstdout:\n%s\nstderr:\n%s", id, j.State, j.ExitCode, o, e)
	}
	if want := fmt.Sprintf("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\ncpus=4 job=%s\n", id); string(o) != want {
		t.Errorf("stdout = %q, want %q", o, want)
	}
	if string(e) != "err-line\n" {
		t.Errorf("stderr = %q", e)
	}
	for i := range c.Nodes {
		r, err := c.NodeRun(ctx, i, "ps -eo args | grep -E '^(/[^ ]*/)?hpcvm ' || true")
		if err != nil || strings.TrimSpace(r.Stdout) != "" {
			t.Errorf("node %d: hpcvm processes left: %q %v", i+1, r.Stdout, err)
		}
	}
}

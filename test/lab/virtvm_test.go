//go:build e2e && slurmvm

package lab

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
)

// TestVirtLabDebian12Job runs a real VM job: sbatch -N 2 --vm-image=debian12
// boots the image under hpcvm's VMM inside the virt nodes and runs the
// script in the guest. The boot of a systemd guest under nested
// virtualization in TCG takes minutes, so this test has its own build tag
// (slurmvm: make e2e-slurm-vm) and needs the image (make image-debian12).
func TestVirtLabDebian12Job(t *testing.T) {
	if _, err := os.Stat(filepath.Join(imageStore(), "debian12", "manifest.json")); err != nil {
		t.Fatalf("the debian12 image is missing (make image-debian12): %v", err)
	}
	c := startVirtT(t, 2)
	ctx := testCtx(t, 25*time.Minute)
	work := filepath.Join(c.Dir, "work")
	script := filepath.Join(work, "job.sh")
	os.WriteFile(script, []byte("#!/bin/sh\n#SBATCH --exclusive\ngrep PRETTY_NAME /etc/os-release\necho cpus=$(nproc) job=$SLURM_JOB_ID\necho err-line >&2\nexit 3\n"), 0o755)
	out, errf := filepath.Join(work, "job.out"), filepath.Join(work, "job.err")
	run := func() (string, Job) {
		id, _, err := Submit(ctx, c, fmt.Sprintf("sbatch -N 2 --vm-image=debian12 --vm-console=%s/console.log -o %s -e %s %s", work, out, errf, script))
		if err != nil {
			t.Fatal(err)
		}
		j, err := WaitJob(ctx, c, id)
		if err != nil {
			t.Fatal(err)
		}
		return id, j
	}
	id, j := run()
	if e, _ := os.ReadFile(errf); j.ExitCode != "3:0" && guestvm.TripleFaulted(string(e)) {
		// A known failure of Debian guests in virt nodes (docs/testing.md,
		// guestvm.PlatformReset); a VMM bug would reset again.
		t.Logf("job %s: the guest triple-faulted (%s %s); submitting once more", id, j.State, j.ExitCode)
		id, j = run()
	}
	o, _ := os.ReadFile(out)
	e, _ := os.ReadFile(errf)
	if j.State != "FAILED" || j.ExitCode != "3:0" {
		t.Logf("guest console, last lines:\n%s", tail(filepath.Join(work, "console.log"), 40))
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

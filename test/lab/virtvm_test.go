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

// TestVirtLabDebian12Job runs real VM jobs: sbatch -N 2 --vm-image=debian12
// boots the image under hpcvm's VMM inside the virt nodes and runs the
// script in the guest: exit 3 (FAILED 3:0, output files), srun on one node
// (output, exit 5), scancel during the boot and while the script runs, and
// a time limit (CANCELLED, TIMEOUT; sacct agrees; nothing left on the
// nodes). The boot of a systemd guest under nested
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
	wantAcct(t, ctx, c, id, "FAILED", "3:0")
	noHpcvmLeft(t, ctx, c)

	// srun on one node: output and exit status come back through srun.
	t.Run("srun-1-node", func(t *testing.T) {
		cmd := "srun -N 1 --vm-image=debian12 sh -c 'echo hi-from-$(grep -o bookworm /etc/os-release | head -1); echo to-err >&2; exit 5'"
		r, err := c.Client(ctx, cmd)
		if err == nil && r.ExitCode != 5 && guestvm.TripleFaulted(r.Stderr) {
			t.Logf("the guest triple-faulted while booting; running once more")
			r, err = c.Client(ctx, cmd)
		}
		if err != nil || r.ExitCode != 5 || r.Stdout != "hi-from-bookworm\n" || !strings.Contains(r.Stderr, "to-err") {
			t.Errorf("srun: %v, %s; want stdout hi-from-bookworm, to-err on stderr, exit 5", err, r)
		}
		noHpcvmLeft(t, ctx, c)
	})

	// scancel while the VM boots: CANCELLED, nothing left.
	t.Run("scancel-during-boot", func(t *testing.T) {
		out := filepath.Join(work, "boot-cancel.out")
		id, _, err := Submit(ctx, c, fmt.Sprintf("sbatch -N 2 --vm-image=debian12 -o %s -e %s.err --wrap 'echo started; sleep 600'", out, out))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := WaitState(ctx, c, id, "RUNNING"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Second) // the VMM is starting; the guest boots for tens of seconds
		if r, err := c.Client(ctx, "scancel "+id); err != nil || r.ExitCode != 0 {
			t.Fatalf("scancel %s: %v %s", id, err, r)
		}
		j, err := WaitJob(ctx, c, id)
		if err != nil {
			t.Fatal(err)
		}
		if o, _ := os.ReadFile(out); j.State != "CANCELLED" || strings.Contains(string(o), "started") {
			t.Errorf("job %s: %s, stdout %q; want CANCELLED before the script started", id, j.State, o)
		}
		wantAcct(t, ctx, c, id, "CANCELLED", "")
		noHpcvmLeft(t, ctx, c)
	})

	// scancel while the script runs in the guest, and a time limit: the
	// guest command gets SIGTERM, the job ends CANCELLED / TIMEOUT in
	// scontrol and sacct, and no hpcvm process is left on either node.
	for _, tc := range []struct {
		name, sbatch, state string
		cancel              bool
	}{
		{"scancel", "", "CANCELLED", true},
		{"time-limit", "--time=1", "TIMEOUT", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			script := filepath.Join(work, tc.name+".sh")
			os.WriteFile(script, []byte("#!/bin/sh\ntrap 'echo got-TERM; exit 143' TERM\necho started\nsleep 600 & wait\n"), 0o755)
			out, errf := filepath.Join(work, tc.name+".out"), filepath.Join(work, tc.name+".err")
			var id string
			var j Job
			for attempt := 1; attempt <= 2; attempt++ {
				os.Remove(out)
				var err error
				id, _, err = Submit(ctx, c, fmt.Sprintf("sbatch -N 2 %s --vm-image=debian12 -o %s -e %s %s", tc.sbatch, out, errf, script))
				if err != nil {
					t.Fatal(err)
				}
				// Wait until the script runs in the guest.
				for {
					if b, _ := os.ReadFile(out); strings.Contains(string(b), "started") {
						break
					}
					if j, _ = ShowJob(ctx, c, id); Finished(j.State) {
						break
					}
					select {
					case <-ctx.Done():
						t.Fatalf("job %s: the script did not start: %v", id, ctx.Err())
					case <-time.After(time.Second):
					}
				}
				if e, _ := os.ReadFile(errf); attempt == 1 && Finished(j.State) && guestvm.TripleFaulted(string(e)) {
					t.Logf("job %s: the guest triple-faulted while booting; submitting once more", id)
					continue
				}
				break
			}
			if tc.cancel {
				if r, err := c.Client(ctx, "scancel "+id); err != nil || r.ExitCode != 0 {
					t.Fatalf("scancel %s: %v %s", id, err, r)
				}
			}
			j, err := WaitJob(ctx, c, id)
			if err != nil {
				t.Fatal(err)
			}
			o, _ := os.ReadFile(out)
			if j.State != tc.state || !strings.Contains(string(o), "got-TERM") {
				e, _ := os.ReadFile(errf)
				t.Errorf("job %s: %s, stdout %q (want %s and the guest command's got-TERM)\nstderr:\n%s", id, j.State, o, tc.state, e)
			}
			wantAcct(t, ctx, c, id, tc.state, "")
			noHpcvmLeft(t, ctx, c)
		})
	}
}

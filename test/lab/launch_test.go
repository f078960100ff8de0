//go:build e2e

package lab

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// launchLab is a 2-node host lab with the real plugin, the real hpcvm
// (policy, image store, launcher, slices through srun, cgroups, agent
// protocol) and the fake VMM in place of `hpcvm vm run`: everything but
// the guest is real, and a job takes about a second.
type launchLab struct {
	*HostCluster
	root, work, consoles string
}

var (
	launchOnce sync.Once
	launchL    *launchLab
	launchErr  error
)

func startLaunchLab(t *testing.T) *launchLab {
	t.Helper()
	RequireHost(t)
	if _, err := os.Stat(HpcvmBin()); err != nil {
		Require(t, "bin/hpcvm is not built (make build): "+err.Error())
	}
	launchOnce.Do(func() {
		launchErr = func() error {
			root, err := os.MkdirTemp("", "hpcvm-launch-lab-")
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			fake, err := BuildFakeVMM(ctx, root)
			if err != nil {
				return err
			}
			store := filepath.Join(root, "store")
			for name, cmdline := range map[string]string{"fake": "console=ttyS0", "fake-slow": "console=ttyS0 fakevmm.boot_delay=600"} {
				if err := WriteFakeImage(store, name, cmdline); err != nil {
					return err
				}
			}
			if err := WritePolicy(filepath.Join(root, "policy")); err != nil {
				return err
			}
			// Job ids restart at 1 in every lab: VMM cgroups left by an
			// earlier run (a killed test) must not be mistaken for this one's.
			labDir := filepath.Join(root, "lab")
			removeEmptyVMMCgroups((&Config{Dir: labDir}).ClusterName())
			c, err := StartHost(ctx, HostOptions{Nodes: 2, CPUs: 2, MemMiB: 1000, Dir: filepath.Join(root, "lab"), SpankSO: SpankSO(),
				Plugstack: []string{"hpcvm=" + HpcvmBin(), "policy_dir=" + root + "/policy", "image_store=" + store,
					"runtime_dir=" + root + "/run", "vmm=" + fake}})
			if err != nil {
				return err
			}
			l := &launchLab{HostCluster: c, root: root, work: filepath.Join(root, "work"), consoles: filepath.Join(root, "consoles")}
			os.MkdirAll(l.work, 0o777)
			os.MkdirAll(l.consoles, 0o777)
			launchL = l
			return nil
		}()
	})
	if launchErr != nil {
		t.Fatalf("starting the launch lab: %v", launchErr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("slurmctld log:\n%s", tail(launchL.ControllerLog(), 20))
			for _, n := range launchL.Nodes {
				t.Logf("slurmd %s log:\n%s", n.Name, tail(launchL.SlurmdLog(n.Name), 20))
			}
		}
	})
	return launchL
}

func closeLaunchLab() {
	if launchL != nil {
		launchL.Close()
		os.RemoveAll(launchL.root)
	}
}

// vmProcs lists hpcvm and VMM processes left on node i.
func (l *launchLab) vmProcs(i int) []string {
	var out []string
	for _, p := range l.NodeProcs(i) {
		f := strings.Fields(p)
		if len(f) < 2 {
			continue
		}
		base := filepath.Base(f[1])
		if base == "hpcvm" || base == "fakevmm" || strings.Contains(p, "sleep 3000") {
			out = append(out, p)
		}
	}
	return out
}

// vmmCgroups lists the VMM cgroups of job id of this lab on this machine
// (the host lab's nodes share its cgroup tree).
func (l *launchLab) vmmCgroups(id string) []string {
	var out []string
	filepath.WalkDir("/sys/fs/cgroup", func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if strings.HasPrefix(d.Name(), "hpcvm-"+id+".") && strings.HasSuffix(d.Name(), "-"+l.ClusterName()) {
			out = append(out, p)
			return fs.SkipDir
		}
		return nil
	})
	return out
}

func removeEmptyVMMCgroups(cluster string) {
	var dirs []string
	filepath.WalkDir("/sys/fs/cgroup", func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && strings.HasPrefix(d.Name(), "hpcvm-") && strings.HasSuffix(d.Name(), "-"+cluster) {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		os.Remove(dirs[i]) // fails for a cgroup with processes: kept
	}
}

// waitNoVMProcs waits (bounded) until no node has hpcvm/VMM processes left
// and job id's VMM cgroups are gone.
func (l *launchLab) waitNoVMProcs(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	for {
		var left []string
		for i := range l.Nodes {
			left = append(left, l.vmProcs(i)...)
		}
		left = append(left, l.vmmCgroups(id)...)
		if len(left) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("processes or cgroups left: %v", left)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (l *launchLab) script(t *testing.T, name, body string) string {
	p := filepath.Join(l.work, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func readFile(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return string(b)
}

var consoleRE = regexp.MustCompile(`fakevmm: cpus=(\d+) mem=(\S+) disk=(\S*) cgroup=(\S+) memory_limit=(\S+)`)

func TestLaunchBatchExitStatusAndOutput(t *testing.T) {
	l := startLaunchLab(t)
	ctx := testCtx(t, 3*time.Minute)
	script := l.script(t, "batch.sh", `echo "in-guest=$HPCVM_GUEST job=$SLURM_JOB_ID nodes=$SLURM_JOB_NODELIST pwd=$(pwd) args=$*"
echo "to-stderr" >&2
exit $1
`)
	for _, tc := range []struct {
		nodes, exit int
		state, ec   string
	}{{1, 0, "COMPLETED", "0:0"}, {2, 0, "COMPLETED", "0:0"}, {2, 3, "FAILED", "3:0"}} {
		t.Run(fmt.Sprintf("N%d-exit%d", tc.nodes, tc.exit), func(t *testing.T) {
			name := fmt.Sprintf("b-%d-%d", tc.nodes, tc.exit)
			out, errf, con := filepath.Join(l.work, name+".out"), filepath.Join(l.work, name+".err"), filepath.Join(l.consoles, name+".log")
			id, _, err := Submit(ctx, l, fmt.Sprintf("sbatch -N %d --vm-image=fake --vm-console=%s -o %s -e %s %s %d 'a 2'",
				tc.nodes, con, out, errf, script, tc.exit))
			if err != nil {
				t.Fatal(err)
			}
			j, err := WaitJob(ctx, l, id)
			if err != nil {
				t.Fatal(err)
			}
			if j.State != tc.state || j.ExitCode != tc.ec {
				t.Errorf("job %s: %s ExitCode=%s, want %s %s\nstderr: %s", id, j.State, j.ExitCode, tc.state, tc.ec, readFile(t, errf))
			}
			wantAcct(t, ctx, l, id, tc.state, tc.ec)
			nodelist := "n1"
			if tc.nodes == 2 {
				nodelist = "n[1-2]"
			}
			wantOut := fmt.Sprintf("in-guest=1 job=%s nodes=%s pwd=/tmp/hpcvm-job args=%d a 2\n", id, nodelist, tc.exit)
			if got := readFile(t, out); got != wantOut {
				t.Errorf("stdout file = %q, want %q", got, wantOut)
			}
			if got := readFile(t, errf); got != "to-stderr\n" {
				t.Errorf("stderr file = %q, want only the script's stderr", got)
			}
			m := consoleRE.FindStringSubmatch(readFile(t, con))
			if m == nil {
				t.Fatalf("no fakevmm facts on the console:\n%s", readFile(t, con))
			}
			// Default shape: every allocated CPU (1 per node: one task per
			// node), memory per node (1000 MiB) minus the 128 MiB reserve.
			if m[1] != fmt.Sprint(tc.nodes) || m[2] != "872MiB" {
				t.Errorf("VM shape cpus=%s mem=%s, want cpus=%d mem=872MiB", m[1], m[2], tc.nodes)
			}
			if base, overlay, _ := strings.Cut(m[3], ",overlay="); !strings.HasSuffix(base, "/fake/disk.raw") || !strings.HasSuffix(overlay, "/"+id+".batch/disk.overlay") {
				t.Errorf("the VM did not boot the image's disk with a private overlay: %s", m[3])
			}
			if !strings.Contains(m[4], "hpcvm-"+id+".batch-0-"+l.ClusterName()) || m[5] != fmt.Sprint(1000<<20) {
				t.Errorf("VMM cgroup %s with memory limit %s, want hpcvm-%s.batch-0 limited to %d", m[4], m[5], id, 1000<<20)
			}
			l.waitNoVMProcs(t, ctx, id)
			if _, err := os.Stat(filepath.Join(l.root, "run", id+".batch")); err == nil {
				t.Errorf("runtime directory of job %s left behind", id)
			}
		})
	}
}

func TestLaunchSrun(t *testing.T) {
	l := startLaunchLab(t)
	ctx := testCtx(t, 2*time.Minute)
	r, err := l.Client(ctx, "srun -N 2 --vm-image=fake sh -c 'echo in-guest=$HPCVM_GUEST step=$SLURM_STEP_ID job=$SLURM_JOB_ID; echo err-line >&2; exit 5'")
	if err != nil {
		t.Fatal(err)
	}
	if r.ExitCode != 5 {
		t.Errorf("srun exit status %d, want the guest command's 5: %s", r.ExitCode, r)
	}
	m := regexp.MustCompile(`^in-guest=1 step=0 job=(\d+)\n$`).FindStringSubmatch(r.Stdout)
	// srun's own "task 0: Exited" line may come before or after the task's
	// forwarded stderr: only the task's line and the absence of hpcvm's
	// messages are checked.
	if m == nil || !strings.Contains("\n"+r.Stderr, "\nerr-line\n") || strings.Contains(r.Stderr, "hpcvm") {
		t.Fatalf("want the command once in the VM (task 0), stdout and stderr apart: %s", r)
	}
	l.waitNoVMProcs(t, ctx, m[1])
}

func TestLaunchScancelDuringBoot(t *testing.T) {
	l := startLaunchLab(t)
	ctx := testCtx(t, 3*time.Minute)
	out := filepath.Join(l.work, "cancel-boot.out")
	con := filepath.Join(l.consoles, "cancel-boot.log")
	id, _, err := Submit(ctx, l, fmt.Sprintf("sbatch -N 2 --vm-image=fake-slow --vm-console=%s -o %s --wrap 'echo never'", con, out))
	if err != nil {
		t.Fatal(err)
	}
	// The VMM is up (console written) but the guest never answers.
	waitFileContains(t, ctx, con, "fakevmm: cpus=", "the VMM did not start")
	l.scancelWait(t, ctx, id)
	if b, _ := os.ReadFile(out); strings.Contains(string(b), "never") {
		t.Errorf("the job ran after scancel: %s", b)
	}
}

func TestLaunchScancelDuringScript(t *testing.T) {
	l := startLaunchLab(t)
	ctx := testCtx(t, 3*time.Minute)
	out := filepath.Join(l.work, "cancel-run.out")
	// A loop of short sleeps, not one long one: in this lab the "guest"
	// runs on the node, so slurmstepd signals the script's children
	// itself, and a lone `sleep` killed first would let the script end
	// before its own SIGTERM arrived (seen once under load). Only the
	// trap can end this script.
	script := l.script(t, "trap.sh", `trap 'echo got-SIGTERM; exit 9' TERM
echo started
while :; do sleep 1 & wait; done
`)
	id, _, err := Submit(ctx, l, fmt.Sprintf("sbatch -N 2 --vm-image=fake -o %s %s", out, script))
	if err != nil {
		t.Fatal(err)
	}
	waitFileContains(t, ctx, out, "started", "the script did not start")
	l.scancelWait(t, ctx, id)
	if b := readFile(t, out); !strings.Contains(b, "got-SIGTERM") {
		t.Errorf("SIGTERM did not reach the guest command; output:\n%s", b)
	}
}

func TestLaunchTimeLimit(t *testing.T) {
	l := startLaunchLab(t)
	ctx := testCtx(t, 5*time.Minute)
	out := filepath.Join(l.work, "timeout.out")
	id, _, err := Submit(ctx, l, fmt.Sprintf("sbatch -N 1 -t 1 --vm-image=fake -o %s --wrap 'echo running; sleep 3000'", out))
	if err != nil {
		t.Fatal(err)
	}
	l.waitEnded(t, ctx, id, "TIMEOUT")
	if b := readFile(t, out); !strings.Contains(b, "running") {
		t.Errorf("the job never ran:\n%s", b)
	}
}

func TestLaunchRefusedAtSubmission(t *testing.T) {
	l := startLaunchLab(t)
	ctx := testCtx(t, time.Minute)
	for _, tc := range []struct{ image, want string }{
		{"forbidden-os", `refused by rule "no-forbidden"`},
		{"fake-missing", "--vm-image=fake-missing: no such image"},
		{"nosuchimage", "--vm-image=nosuchimage is not allowed"},
	} {
		r, err := l.Client(ctx, "sbatch -N 1 --vm-image="+tc.image+" --wrap true; echo rc=$?; squeue -h | wc -l")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(r.Stdout, "rc=1") || !strings.Contains(r.Stderr, tc.want) {
			t.Errorf("%s: want sbatch refused with %q: %s", tc.image, tc.want, r)
		}
		if f := strings.Fields(r.Stdout); f[len(f)-1] != "0" {
			t.Errorf("%s: a job was queued: %s", tc.image, r)
		}
	}
}

// wantAcct checks that sacct (slurmdbd's record) reports the job's final
// state and, unless ec is empty, its exit code.
func wantAcct(t *testing.T, ctx context.Context, c Clienter, id, state, ec string) {
	t.Helper()
	a, err := WaitAcct(ctx, c, id)
	if err != nil {
		t.Error(err)
		return
	}
	if a.State != state || ec != "" && a.ExitCode != ec {
		t.Errorf("sacct: job %s %s ExitCode=%s, want %s %s", id, a.State, a.ExitCode, state, ec)
	}
}

// waitFileContains waits until the file at path contains text; it fails
// the test with why when ctx ends first.
func waitFileContains(t *testing.T, ctx context.Context, path, text, why string) {
	t.Helper()
	for {
		if b, _ := os.ReadFile(path); strings.Contains(string(b), text) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: %v", why, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// scancelWait cancels job id and checks that it ends CANCELLED.
func (l *launchLab) scancelWait(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	if r, err := l.Client(ctx, "scancel "+id); err != nil || r.ExitCode != 0 {
		t.Fatalf("scancel: %v %s", err, r)
	}
	l.waitEnded(t, ctx, id, "CANCELLED")
}

// waitEnded waits for job id to end and checks that it ended in state
// (in Slurm and in accounting) and left no VMM process behind.
func (l *launchLab) waitEnded(t *testing.T, ctx context.Context, id, state string) {
	t.Helper()
	j, err := WaitJob(ctx, l, id)
	if err != nil {
		t.Fatal(err)
	}
	wantAcct(t, ctx, l, id, state, "")
	if j.State != state {
		t.Errorf("job %s: %s, want %s", id, j.State, state)
	}
	l.waitNoVMProcs(t, ctx, id)
}

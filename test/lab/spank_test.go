//go:build e2e

package lab

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeHpcvm stands in for the hpcvm binary: it logs every call, refuses
// the image "forbidden" like a policy rule would, knows no image "missing",
// and for `launch` prints what it was given and execs the original argv
// (so the job runs as without the plugin, through the wrapper).
const fakeHpcvm = `#!/bin/sh
log=%[1]s/calls.log
echo "$*" >>"$log"
case "$1 $2" in
"policy admit")
	for a in "$@"; do
		case "$a" in --image=forbidden)
			echo 'hpcvm: request refused by rule "no-forbidden" (/etc/hpcvm/policy.d/10.toml:3): --vm-image=forbidden is denied' >&2
			exit 1 ;;
		esac
	done
	echo "hpcvm: admitted" ; exit 0 ;;
"image inspect")
	for a in "$@"; do :; done
	if [ "$a" = missing ]; then echo "hpcvm image: missing in /store: image not found" >&2; exit 1; fi
	exit 0 ;;
esac
if [ "$1" = launch ]; then
	shift
	while [ "$1" != -- ]; do opts="$opts $1"; shift; done
	shift
	echo "FAKE-LAUNCH host=$(hostname) job=$SLURM_JOB_ID step=$SLURM_STEP_ID procid=$SLURM_PROCID opts=$opts argv=$*"
	exec "$@"
fi
echo "fake hpcvm: unexpected call: $*" >&2
exit 2
`

type spankLab struct {
	*HostCluster
	calls string // the fake's call log
	work  string
}

var (
	sharedOnce sync.Once
	shared     *spankLab
	sharedErr  error
)

// spankCluster starts (once per test binary) a 2-node host lab with the
// real plugin and the fake hpcvm.
func spankCluster(t *testing.T) *spankLab {
	t.Helper()
	RequireHost(t)
	sharedOnce.Do(func() {
		dir, err := os.MkdirTemp("", "hpcvm-spank-lab-")
		if err != nil {
			sharedErr = err
			return
		}
		fake := filepath.Join(dir, "hpcvm")
		if err := os.WriteFile(fake, []byte(fmt.Sprintf(fakeHpcvm, dir)), 0o755); err != nil {
			sharedErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := StartHost(ctx, HostOptions{Nodes: 2, Dir: filepath.Join(dir, "lab"), SpankSO: SpankSO(),
			Plugstack: []string{"hpcvm=" + fake, "policy_dir=" + dir + "/policy", "image_store=" + dir + "/store", "runtime_dir=" + dir + "/run"}})
		if err != nil {
			sharedErr = err
			return
		}
		work := filepath.Join(dir, "work")
		os.MkdirAll(work, 0o777)
		shared = &spankLab{HostCluster: c, calls: filepath.Join(dir, "calls.log"), work: work}
	})
	if sharedErr != nil {
		t.Fatalf("starting the lab: %v", sharedErr)
	}
	return shared
}

func TestMain(m *testing.M) {
	code := m.Run()
	closeLaunchLab()
	if shared != nil {
		shared.Close()
		os.RemoveAll(filepath.Dir(shared.Dir))
	}
	os.Exit(code)
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// callsSince returns the fake's calls logged after mark (a byte offset).
func (l *spankLab) callsSince(mark int) string {
	b, _ := os.ReadFile(l.calls)
	if mark > len(b) {
		return ""
	}
	return string(b[mark:])
}

func (l *spankLab) mark() int {
	b, _ := os.ReadFile(l.calls)
	return len(b)
}

func (l *spankLab) mustClient(t *testing.T, ctx context.Context, script string) Result {
	t.Helper()
	r, err := l.Client(ctx, script)
	if err != nil {
		t.Fatalf("%s: %v", script, err)
	}
	return r
}

func TestSpankOptionsInHelp(t *testing.T) {
	l := spankCluster(t)
	ctx := testCtx(t, time.Minute)
	for _, cmd := range []string{"sbatch --help", "srun --help", "salloc --help"} {
		r := l.mustClient(t, ctx, cmd)
		out := strings.Join(strings.Fields(r.Stdout+r.Stderr), " ") // help text is wrapped
		for _, want := range []string{
			"--vm-image=NAME", "run the job in a virtual machine booted from image NAME",
			"--vm-mem=SIZE", "guest memory per node",
			"--vm-checkpoint-interval=DURATION", "--vm-cpus=N", "--vm-console=FILE",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: missing %q in:\n%s", cmd, want, out)
			}
		}
	}
}

func TestSpankPolicyRefusalBeforeQueueing(t *testing.T) {
	l := spankCluster(t)
	ctx := testCtx(t, time.Minute)
	mark := l.mark()
	r := l.mustClient(t, ctx, "sbatch --vm-image=forbidden --vm-mem=2GiB --vm-checkpoint-interval=30m --wrap true; echo rc=$?; squeue -h -o %i | wc -l")
	if !strings.Contains(r.Stdout, "rc=1") || strings.Contains(r.Stdout, "Submitted") {
		t.Fatalf("sbatch was not refused: %s", r)
	}
	if !strings.Contains(r.Stderr, `refused by rule "no-forbidden"`) || !strings.Contains(r.Stderr, "--vm-image=forbidden is denied") {
		t.Errorf("refusal message not shown to the user: %s", r)
	}
	if lines := strings.Fields(r.Stdout); lines[len(lines)-1] != "0" {
		t.Errorf("a job was queued: %s", r)
	}
	calls := l.callsSince(mark)
	for _, want := range []string{"policy admit", "--user=root", "--image=forbidden", "--mem=2GiB", "--checkpoint-interval=30m", "--policy-dir="} {
		if !strings.Contains(calls, want) {
			t.Errorf("admit call lacks %q: %q", want, calls)
		}
	}
	if strings.Contains(calls, "launch") {
		t.Errorf("a refused job reached the launcher: %q", calls)
	}
}

func TestSpankUnknownImageRefused(t *testing.T) {
	l := spankCluster(t)
	ctx := testCtx(t, time.Minute)
	r := l.mustClient(t, ctx, "sbatch --vm-image=missing --wrap true; echo rc=$?; squeue -h -o %i | wc -l")
	if !strings.Contains(r.Stdout, "rc=1") || strings.Contains(r.Stdout, "Submitted") {
		t.Fatalf("sbatch was not refused: %s", r)
	}
	if !strings.Contains(r.Stderr, "--vm-image=missing: no such image") {
		t.Errorf("no message naming the image: %s", r)
	}
	if lines := strings.Fields(r.Stdout); lines[len(lines)-1] != "0" {
		t.Errorf("a job was queued: %s", r)
	}
	// srun refuses the same way, before any step starts.
	r = l.mustClient(t, ctx, "srun --vm-image=missing true; echo rc=$?")
	if strings.Contains(r.Stdout, "rc=0") || !strings.Contains(r.Stderr, "no such image") {
		t.Errorf("srun was not refused: %s", r)
	}
}

func TestSpankBatchRunsThroughLauncher(t *testing.T) {
	l := spankCluster(t)
	ctx := testCtx(t, 2*time.Minute)
	script := filepath.Join(l.work, "args.sh")
	os.WriteFile(script, []byte("#!/bin/sh\necho \"script args: $*\"\necho to-stderr >&2\nexit ${EXIT:-0}\n"), 0o755)
	for _, tc := range []struct {
		exit      int
		state, ec string
	}{{0, "COMPLETED", "0:0"}, {3, "FAILED", "3:0"}} {
		out := filepath.Join(l.work, fmt.Sprintf("batch-%d.out", tc.exit))
		errf := filepath.Join(l.work, fmt.Sprintf("batch-%d.err", tc.exit))
		id, _, err := Submit(ctx, l, fmt.Sprintf("EXIT=%d sbatch -N 2 --vm-image=debian12 --vm-mem=1GiB -o %s -e %s %s 'one two' three",
			tc.exit, out, errf, script))
		if err != nil {
			t.Fatal(err)
		}
		j, err := WaitJob(ctx, l, id)
		if err != nil {
			t.Fatal(err)
		}
		if j.State != tc.state || j.ExitCode != tc.ec {
			t.Errorf("exit %d: job %s is %s ExitCode=%s, want %s %s", tc.exit, id, j.State, j.ExitCode, tc.state, tc.ec)
		}
		o, _ := os.ReadFile(out)
		e, _ := os.ReadFile(errf)
		if !strings.Contains(string(o), "FAKE-LAUNCH host=n1 job="+id) ||
			!strings.Contains(string(o), "--image=debian12") || !strings.Contains(string(o), "--mem=1GiB") {
			t.Errorf("the batch step did not go through the launcher with its options:\n%s", o)
		}
		if !strings.Contains(string(o), "script args: one two three") || !strings.Contains(string(o), "/slurm_script one two three") {
			t.Errorf("original argv not passed through:\n%s", o)
		}
		if string(e) != "to-stderr\n" {
			t.Errorf("stderr file = %q", e)
		}
	}
}

func TestSpankSrunRunsThroughLauncher(t *testing.T) {
	l := spankCluster(t)
	ctx := testCtx(t, time.Minute)
	mark := l.mark()
	r := l.mustClient(t, ctx, "srun -N 2 -l --vm-image=debian12 sh -c 'echo task-on-$(hostname)'")
	if r.ExitCode != 0 {
		t.Fatalf("srun: %s", r)
	}
	for _, want := range []string{"FAKE-LAUNCH host=n1", "FAKE-LAUNCH host=n2", "task-on-n1", "task-on-n2", "argv=sh -c echo task-on-$(hostname)"} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("srun output lacks %q:\n%s", want, r.Stdout)
		}
	}
	if calls := l.callsSince(mark); !strings.Contains(calls, "policy admit") {
		t.Errorf("srun did not ask the policy: %q", calls)
	}
	r = l.mustClient(t, ctx, "srun -N 1 --vm-image=debian12 sh -c 'exit 7'")
	if r.ExitCode != 7 {
		t.Errorf("srun exit status = %d, want 7: %s", r.ExitCode, r)
	}
}

func TestSpankJobWithoutVMImageUntouched(t *testing.T) {
	l := spankCluster(t)
	ctx := testCtx(t, time.Minute)
	mark := l.mark()
	out := filepath.Join(l.work, "plain.out")
	id, _, err := Submit(ctx, l, "sbatch -N 2 -o "+out+" --wrap 'echo plain-$(hostname); srun -l hostname'")
	if err != nil {
		t.Fatal(err)
	}
	j, err := WaitJob(ctx, l, id)
	if err != nil {
		t.Fatal(err)
	}
	o, _ := os.ReadFile(out)
	if j.State != "COMPLETED" || !strings.Contains(string(o), "plain-n1") || !strings.Contains(string(o), "1: n2") {
		t.Errorf("plain job: %s %s:\n%s", j.State, j.ExitCode, o)
	}
	if strings.Contains(string(o), "FAKE-LAUNCH") {
		t.Errorf("a job without --vm-image went through the launcher:\n%s", o)
	}
	if calls := l.callsSince(mark); calls != "" {
		t.Errorf("a job without --vm-image called hpcvm: %q", calls)
	}
}

func TestSpankUnknownPlugstackArgument(t *testing.T) {
	l := spankCluster(t)
	ctx := testCtx(t, time.Minute)
	dir := t.TempDir()
	bad := filepath.Join(dir, "plugstack.conf")
	os.WriteFile(bad, []byte("required "+SpankSO()+" hpcvm=/bin/true polcy_dir=/etc\n"), 0o644)
	conf, _ := os.ReadFile(l.SlurmConf())
	badConf := strings.ReplaceAll(string(conf), "PlugStackConfig="+l.PlugstackConf(), "PlugStackConfig="+bad)
	os.WriteFile(filepath.Join(dir, "slurm.conf"), []byte(badConf), 0o644)
	r, err := l.ClientEnv(ctx, []string{"SLURM_CONF=" + filepath.Join(dir, "slurm.conf")}, "sbatch --wrap true; echo rc=$?")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(r.Stdout, "rc=0") || strings.Contains(r.Stdout, "Submitted") {
		t.Fatalf("sbatch accepted a plugstack.conf with an unknown argument: %s", r)
	}
	if !strings.Contains(r.Stderr, `unknown plugstack argument "polcy_dir=/etc"`) {
		t.Errorf("error does not name the argument: %s", r)
	}
}

// TestSpankExportsOnlyPluginSymbols checks the linker version script: the
// plugin exports the SPANK interface and nothing else.
func TestSpankExportsOnlyPluginSymbols(t *testing.T) {
	RequireHost(t)
	out, err := exec.Command("nm", "-D", "--defined-only", SpankSO()).Output()
	if err != nil {
		Require(t, fmt.Sprintf("nm (binutils): %v", err))
	}
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) == 3 {
			got = append(got, f[2])
		}
	}
	sort.Strings(got)
	want := []string{"plugin_name", "plugin_type", "plugin_version", "slurm_spank_exit", "slurm_spank_init",
		"slurm_spank_init_post_opt", "slurm_spank_task_init", "spank_plugin_version"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("exported symbols %v, want %v", got, want)
	}
}

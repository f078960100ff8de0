//go:build e2e && slurmspan

package lab

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
)

// TestVirtLabSpanJob is the promise of a spread VM, end to end through
// Slurm (docs/dsm.md, docs/slurm.md): with the plugin's span=nodes,
// `sbatch -N M --vm-image=tiny` on M one-CPU virt nodes boots ONE guest
// whose vCPUs are the CPUs of all M nodes (one slice per node, started by
// srun). The job script, run inside it, prints nproc and /proc/cpuinfo's
// count (= M) and runs guest/parsum, a pthreads program with one thread
// per vCPU, twice: placed by the guest's scheduler alone (the sum must be
// exact; where the threads ran is logged: Linux does not always spread
// them, docs/dsm.md) and with each thread bound to a vCPU of its own (-b,
// as OMP_PROC_BIND=spread): exact sum and, seen from inside the guest,
// threads on the vCPUs of every slice. Then scancel while the script
// runs, and a slice killed on the last node: the job ends (CANCELLED,
// FAILED naming the slice) and no hpcvm process is left on any node.
// The image is the tiny one (test kernel and busybox with the real agent),
// which boots in seconds, or with HPCVM_E2E_SPAN_IMAGE=debian12 the
// default image (make image-debian12; its own Debian kernel and systemd).
// parsum (static) travels inside the job script, as a user's own program
// would. Everything across the nodes is slow in virt nodes (docs/dsm.md,
// "Status"). Opt-in: make e2e-slurm-span.
func TestVirtLabSpanJob(t *testing.T) {
	image := os.Getenv("HPCVM_E2E_SPAN_IMAGE")
	var store string
	switch image {
	case "", "tiny":
		image = "tiny"
		store = guestvm.TinyStore(t, nil)
		if out, err := exec.Command("chmod", "-R", "a+rX", filepath.Dir(store)).CombinedOutput(); err != nil {
			t.Fatalf("chmod: %v %s", err, out)
		}
	default:
		store = imageStore()
		if _, err := os.Stat(filepath.Join(store, image, "manifest.json")); err != nil {
			t.Fatalf("HPCVM_E2E_SPAN_IMAGE=%s: the image is not in %s (make image-%s): %v", image, store, image, err)
		}
	}
	parsum := guestvm.Parsum(t)
	counts := []int{2, 3}
	if v := os.Getenv("HPCVM_E2E_SPAN_NODES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 2 {
			t.Fatalf("HPCVM_E2E_SPAN_NODES=%q: want a node count >= 2", v)
		}
		counts = []int{n}
	}
	cases := spanCases(t)
	for _, nodes := range counts {
		t.Run(fmt.Sprintf("%dnodes", nodes), func(t *testing.T) {
			c := startVirtWith(t, VirtOptions{Nodes: nodes, CPUs: 1, MemMiB: 1536, ImageStore: store,
				Plugstack: []string{"span=nodes"}})
			// 3 one-CPU nodes on a 2-core machine took 34 min for the
			// tiny job alone; debian12's job took 29 min on 2 nodes, and
			// its guest needs ~5 min to run a script at all.
			per := 25 * time.Minute
			if image != "tiny" {
				per = 45 * time.Minute
			}
			ctx := testCtx(t, time.Duration(nodes)*per)
			work := filepath.Join(c.Dir, "work")
			if cases["job"] {
				spread, boot := spanJob(t, ctx, c, work, image, parsum, nodes)
				if cases["ref"] {
					spanReference(t, ctx, c, work, image, parsum, nodes, spread, boot)
				}
			}
			if nodes == 2 || len(counts) == 1 {
				if cases["cancel"] {
					spanCancel(t, ctx, c, work, image)
				}
				if cases["killed"] {
					spanSliceKilled(t, ctx, c, work, image, nodes)
				}
			}
		})
	}
}

// spanCases is the set of cases to run: HPCVM_E2E_SPAN_CASES, a comma
// list of job (the parsum job), ref (its 1-node reference; needs job),
// cancel and killed; all of them by default. A spread debian12 job takes
// half an hour here, so the cancel and killed cases can be run alone.
func spanCases(t *testing.T) map[string]bool {
	all := map[string]bool{"job": true, "ref": true, "cancel": true, "killed": true}
	v := os.Getenv("HPCVM_E2E_SPAN_CASES")
	if v == "" {
		return all
	}
	cases := map[string]bool{}
	for _, c := range strings.Split(v, ",") {
		c = strings.TrimSpace(c)
		if !all[c] {
			t.Fatalf("HPCVM_E2E_SPAN_CASES=%q: unknown case %q (want job, ref, cancel, killed)", v, c)
		}
		cases[c] = true
	}
	if cases["ref"] && !cases["job"] {
		t.Fatalf("HPCVM_E2E_SPAN_CASES=%q: ref compares against job; list job too", v)
	}
	return cases
}

// spanScript is the job script: it unpacks parsum (base64 in the script
// itself) into a temporary directory of the guest and runs it twice.
func spanScript(parsum []byte, n, args string) string {
	var b strings.Builder
	b.WriteString("#!/bin/sh\nset -e\necho nproc=$(nproc) cpuinfo=$(grep -c ^processor /proc/cpuinfo)\n")
	// What the guest's clock runs on, and what the kernel said of it (the
	// job runs as root in the lab; as another user dmesg may be refused).
	b.WriteString("echo clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\n")
	b.WriteString("dmesg 2>/dev/null | grep -i -E 'clocksource|tsc|sched_clock|soft lockup|dynticks|nohz|housekeeping' | sed 's/^/dmesg: /' || true\n")
	// stamp lines (guest clock) split the script's time (scriptStamps).
	b.WriteString("echo stamp=start $(date +%s.%N)\n")
	b.WriteString("d=$(mktemp -d)\nbase64 -d >$d/parsum <<'PARSUM'\n")
	enc := base64.StdEncoding.EncodeToString(parsum)
	for len(enc) > 76 {
		b.WriteString(enc[:76] + "\n")
		enc = enc[76:]
	}
	b.WriteString(enc + "\nPARSUM\nchmod +x $d/parsum\necho stamp=unpacked $(date +%s.%N)\n")
	if args != "" {
		args += " "
	}
	b.WriteString("$d/parsum " + args + "-n " + n + "\n$d/parsum " + args + "-b -n " + n + "\nrm -rf $d\n")
	return b.String()
}

// parsumN is parsum's iteration count (HPCVM_E2E_PARSUM_N, default 1e8).
func parsumN() string {
	if n := os.Getenv("HPCVM_E2E_PARSUM_N"); n != "" {
		return n
	}
	return "100000000"
}

// spanRun writes script as work/NAME.sh, submits it with the sbatch
// options opts (output in work/NAME.out and NAME.err), waits for the job
// to end and returns its id, final state, stdout and stderr. The job runs
// with HPCVM_LAUNCH_DEBUG=1: the launcher logs its progress (agent ready,
// vCPUs online, the job's end) to the job's stderr, shown on failure.
func spanRun(t *testing.T, ctx context.Context, c *VirtCluster, work, name, script, opts string) (string, Job, []byte, []byte) {
	t.Helper()
	path := filepath.Join(work, name+".sh")
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	out, errf := filepath.Join(work, name+".out"), filepath.Join(work, name+".err")
	id, _, err := Submit(ctx, c, fmt.Sprintf("%s sbatch %s -o %s -e %s %s", spanEnv(work, name), opts, out, errf, path))
	if err != nil {
		t.Fatal(err)
	}
	j, err := WaitJob(ctx, c, id)
	if err != nil {
		t.Fatal(err)
	}
	keepSliceFiles(t, work, name)
	o, _ := os.ReadFile(out)
	e, _ := os.ReadFile(errf)
	return id, j, o, e
}

// spanEnv is the environment words for a spread job named name: the
// launcher's debug log (HPCVM_LAUNCH_DEBUG=1), HPCVM_E2E_JOB_ENV, the
// slices' counters every 5 s into work/NAME-vmm.log, and with
// HPCVM_E2E_SLICE_CPUPROFILE_DIR each slice's Go CPU profile.
func spanEnv(work, name string) string {
	env := "HPCVM_LAUNCH_DEBUG=1"
	// HPCVM_E2E_JOB_ENV: extra VAR=VALUE words for the job's environment
	// (which the launcher and the slices inherit), e.g. GOMAXPROCS=2.
	if extra := strings.Fields(os.Getenv("HPCVM_E2E_JOB_ENV")); len(extra) > 0 {
		env += " " + strings.Join(extra, " ")
	}
	// Every slice samples its counters every 5 s into the job's VMM log,
	// kept in the work directory (trafficByPhase).
	env += " HPCVM_SLICE_STATS_EVERY=5s HPCVM_VMM_LOG=" + filepath.Join(work, name+"-vmm.log")
	if os.Getenv("HPCVM_E2E_SLICE_CPUPROFILE_DIR") != "" {
		// Each slice's Go CPU profile (cmd/hpcvm/profile.go), passed in
		// the job's environment, written into the lab's work directory
		// (which the nodes share) and copied out after the job.
		env += " HPCVM_SLICE_CPUPROFILE=" + filepath.Join(work, name+"-slice-%d.pprof")
	}
	return env
}

// keepSliceFiles copies a job's slice profiles, VMM log and guest console
// out of the lab (which is removed) into HPCVM_E2E_SLICE_CPUPROFILE_DIR.
func keepSliceFiles(t *testing.T, work, name string) {
	profDir := os.Getenv("HPCVM_E2E_SLICE_CPUPROFILE_DIR")
	if profDir != "" {
		// The slices' profiles, and their log (RIP profiles, counters)
		// and the guest console, which go with the lab directory.
		profs, _ := filepath.Glob(filepath.Join(work, name+"-slice-*.pprof"))
		profs = append(profs, filepath.Join(work, name+"-vmm.log"), filepath.Join(work, name+"-console.log"))
		for _, p := range profs {
			if b, err := os.ReadFile(p); err == nil && os.WriteFile(filepath.Join(profDir, filepath.Base(p)), b, 0o644) == nil {
				t.Logf("kept: %s", filepath.Join(profDir, filepath.Base(p)))
			}
		}
	}
}

// spanJob runs the parsum job across all nodes, checks its output and
// returns the bound run's time in seconds and the guest's boot time (the
// launcher's start to its agent's answer).
func spanJob(t *testing.T, ctx context.Context, c *VirtCluster, work, image string, parsum []byte, nodes int) (float64, time.Duration) {
	start := time.Now()
	id, j, o, e := spanRun(t, ctx, c, work, "span", spanScript(parsum, parsumN(), ""),
		fmt.Sprintf("-N %d --vm-image=%s --vm-console=%s/span-console.log", nodes, image, work))
	t.Logf("job %s: %s %s after %v\nstdout:\n%s", id, j.State, j.ExitCode, time.Since(start).Round(time.Second), o)
	boot, online := launchPhases(e)
	t.Logf("spread guest: agent ready %v after the launcher started the VM; vCPUs online %v later", boot, online)
	trafficByPhase(t, e, o, filepath.Join(work, "span-vmm.log"))
	if j.State != "COMPLETED" || j.ExitCode != "0:0" {
		t.Logf("guest console, last lines:\n%s", tail(filepath.Join(work, "span-console.log"), 40))
		t.Fatalf("job %s: %s %s, want COMPLETED 0:0\nstderr:\n%s", id, j.State, j.ExitCode, e)
	}
	if want := fmt.Sprintf("nproc=%d cpuinfo=%d\n", nodes, nodes); !strings.HasPrefix(string(o), want) {
		t.Errorf("stdout starts %q, want %q", o, want)
	}
	if m := regexp.MustCompile(`PARSUM threads=\d+ bind=0 .* ok=(\d) cpus=(\S+) seconds=(\S+)`).FindStringSubmatch(string(o)); m == nil || m[1] != "1" {
		t.Errorf("parsum with its threads placed by the guest: no line with the exact sum")
	} else {
		t.Logf("parsum, threads placed by the guest's scheduler: CPUs %s, %s s", m[2], m[3])
	}
	m := regexp.MustCompile(`PARSUM threads=(\d+) bind=1 .* ok=1 cpus=(\S+) seconds=(\S+)`).FindStringSubmatch(string(o))
	if m == nil {
		t.Fatalf("no PARSUM line of the bound run with ok=1 in the job's output")
	}
	// One vCPU per node: vCPU i runs on slice i, i.e. on node i+1.
	if m[1] != strconv.Itoa(nodes) || m[2] != cpuList(nodes) {
		t.Errorf("parsum: %s threads on CPUs %s; want %d threads and every vCPU (%s), one per slice", m[1], m[2], nodes, cpuList(nodes))
	}
	t.Logf("parsum, threads bound, across %d nodes: %s s", nodes, m[3])
	noHpcvmLeft(t, ctx, c)
	secs, _ := strconv.ParseFloat(m[3], 64)
	return secs, boot
}

// statsSample is one "slice stats" line of a slice (HPCVM_SLICE_STATS_EVERY).
type statsSample struct {
	at              time.Time
	requests, bytes float64 // cumulative: pages requested, bytes sent
}

// sliceSamples reads each slice's "slice stats" lines from a VMM log.
func sliceSamples(log []byte) map[int][]statsSample {
	re := regexp.MustCompile(`time=(\S+) level=INFO msg="slice stats" slice=(\d+) .*requests=(\d+) .*bytes_sent=(\d+)`)
	out := map[int][]statsSample{}
	for _, m := range re.FindAllSubmatch(log, -1) {
		at, err := time.Parse(time.RFC3339Nano, string(m[1]))
		if err != nil {
			continue
		}
		id, _ := strconv.Atoi(string(m[2]))
		req, _ := strconv.ParseFloat(string(m[3]), 64)
		b, _ := strconv.ParseFloat(string(m[4]), 64)
		out[id] = append(out[id], statsSample{at, req, b})
	}
	return out
}

// cumulativeAt interpolates a slice's counters at t (nothing before its
// first sample: the slice had just started; its last sample after).
func cumulativeAt(s []statsSample, t time.Time) (req, bytes float64) {
	if len(s) == 0 || t.Before(s[0].at) {
		return 0, 0
	}
	for i := 1; i < len(s); i++ {
		if !t.After(s[i].at) {
			f := t.Sub(s[i-1].at).Seconds() / s[i].at.Sub(s[i-1].at).Seconds()
			return s[i-1].requests + f*(s[i].requests-s[i-1].requests), s[i-1].bytes + f*(s[i].bytes-s[i-1].bytes)
		}
	}
	last := s[len(s)-1]
	return last.requests, last.bytes
}

// trafficByPhase logs the page requests and bytes the slices moved per
// second in each phase of the spread job: boot (on the home slice alone),
// bringing the other vCPUs online, the script up to parsum, and the two
// parsum runs. The phases come from the launcher's log (stderr) and, for
// parsum, from its own times counted back from the command's end (it is
// the script's last program; what follows it is an rm).
func trafficByPhase(t *testing.T, stderr, stdout []byte, vmmLog string) {
	b, err := os.ReadFile(vmmLog)
	if err != nil {
		t.Logf("page traffic by phase: no VMM log: %v", err)
		return
	}
	samples := sliceSamples(b)
	at := func(msg string) time.Time {
		m := regexp.MustCompile(`time=(\S+) level=\S+ msg="` + msg + `"`).FindSubmatch(stderr)
		if m == nil {
			return time.Time{}
		}
		ts, _ := time.Parse(time.RFC3339Nano, string(m[1]))
		return ts
	}
	start, agent, online, end := at("starting VM"), at("guest agent ready"), at("vCPUs online"), at("guest command ended")
	started := at("guest command started")
	if started.IsZero() {
		started = online // a launcher from before that line
	}
	secs := func(re string) time.Duration {
		m := regexp.MustCompile(re).FindSubmatch(stdout)
		if m == nil {
			return 0
		}
		f, _ := strconv.ParseFloat(string(m[1]), 64)
		return time.Duration(f * float64(time.Second))
	}
	bound, unbound := secs(`bind=1 .* seconds=(\S+)`), secs(`bind=0 .* seconds=(\S+)`)
	if len(samples) == 0 || start.IsZero() || agent.IsZero() || online.IsZero() || end.IsZero() {
		t.Logf("page traffic by phase: %d slices sampled; launcher times start %v agent %v online %v end %v: not enough to split",
			len(samples), start, agent, online, end)
		return
	}
	phases := []struct {
		name   string
		t0, t1 time.Time
	}{
		{"boot (home slice alone)", start, agent},
		{"other vCPUs brought online", agent, online},
		{"job staged (script copied in)", online, started},
		{"script before parsum", started, end.Add(-bound - unbound)},
		{"parsum, placed by Linux", end.Add(-bound - unbound), end.Add(-bound)},
		{"parsum, bound one thread per vCPU", end.Add(-bound), end},
	}
	var tb strings.Builder
	fmt.Fprintf(&tb, "%-36s %10s %14s %14s\n", "phase", "seconds", "requests/s", "KiB sent/s")
	for _, ph := range phases {
		d := ph.t1.Sub(ph.t0).Seconds()
		if d <= 0 {
			continue
		}
		var req, by float64
		for _, s := range samples {
			r0, b0 := cumulativeAt(s, ph.t0)
			r1, b1 := cumulativeAt(s, ph.t1)
			req, by = req+r1-r0, by+b1-b0
		}
		fmt.Fprintf(&tb, "%-36s %10.1f %14.1f %14.1f\n", ph.name, d, req/d, by/d/1024)
	}
	t.Logf("page traffic by phase, all slices (5 s samples, interpolated):\n%s", tb.String())
	scriptStamps(t, stdout)
}

// scriptStamps logs how long the script's steps took by the guest's clock,
// from its "stamp=NAME SECONDS" lines: nproc and mktemp before the first,
// then unpacking parsum (a shell heredoc through base64).
func scriptStamps(t *testing.T, stdout []byte) {
	var names []string
	var at []float64
	for _, m := range regexp.MustCompile(`(?m)^stamp=(\S+) (\d+\.\d+)$`).FindAllSubmatch(stdout, -1) {
		f, err := strconv.ParseFloat(string(m[2]), 64)
		if err != nil {
			continue
		}
		names, at = append(names, string(m[1])), append(at, f)
	}
	for i := 1; i < len(at); i++ {
		t.Logf("script, guest clock: %s to %s: %.1f s", names[i-1], names[i], at[i]-at[i-1])
	}
}

// launchPhases reads the launcher's debug log (HPCVM_LAUNCH_DEBUG=1, the
// job's stderr): the time from "starting VM" to "guest agent ready", and
// the onlining's own duration ("vCPUs online" took=; 0 on one node).
func launchPhases(stderr []byte) (boot, online time.Duration) {
	at := func(msg string) time.Time {
		m := regexp.MustCompile(`time=(\S+) level=\S+ msg="` + msg + `"`).FindSubmatch(stderr)
		if m == nil {
			return time.Time{}
		}
		ts, _ := time.Parse(time.RFC3339Nano, string(m[1]))
		return ts
	}
	if s, a := at("starting VM"), at("guest agent ready"); !s.IsZero() && !a.IsZero() {
		boot = a.Sub(s)
	}
	if m := regexp.MustCompile(`msg="vCPUs online" .*took=(\S+)`).FindSubmatch(stderr); m != nil {
		online, _ = time.ParseDuration(string(m[1]))
	}
	return boot, online
}

// spanReference runs the same program, with as many threads, in a VM on
// one node (sbatch -N 1: a single VM, one vCPU), in the same lab, and logs
// the spread run's time against it. The sum must be exact here too.
func spanReference(t *testing.T, ctx context.Context, c *VirtCluster, work, image string, parsum []byte, nodes int, spread float64, spreadBoot time.Duration) {
	id, j, o, e := spanRun(t, ctx, c, work, "ref", spanScript(parsum, parsumN(), fmt.Sprintf("-t %d", nodes)),
		"-N 1 --vm-image="+image)
	m := regexp.MustCompile(`PARSUM threads=(\d+) bind=1 .* ok=1 cpus=\S+ seconds=(\S+)`).FindStringSubmatch(string(o))
	if j.State != "COMPLETED" || m == nil {
		t.Fatalf("reference job %s on 1 node: %s %s, stdout %q; want COMPLETED and parsum's exact sum\nstderr:\n%s", id, j.State, j.ExitCode, o, e)
	}
	one, _ := strconv.ParseFloat(m[2], 64)
	t.Logf("parsum (%s threads, bound) in a VM on 1 node: %s s; across %d nodes: %.3f s (%.1fx the 1-node time)", m[1], m[2], nodes, spread, spread/one)
	if boot, _ := launchPhases(e); boot > 0 && spreadBoot > 0 {
		t.Logf("boot to the guest agent: on 1 node %v; across %d nodes %v (%.1fx)", boot, nodes, spreadBoot, spreadBoot.Seconds()/boot.Seconds())
	}
	noHpcvmLeft(t, ctx, c)
}

func cpuList(n int) string {
	var l []string
	for i := range n {
		l = append(l, strconv.Itoa(i))
	}
	return strings.Join(l, ",")
}

// spanStarted submits a spanning job that prints "started" and sleeps, and
// waits until the script runs in the guest.
func spanStarted(t *testing.T, ctx context.Context, c *VirtCluster, work, image, name string, nodes int) (id, out, errf string) {
	t.Helper()
	script := filepath.Join(work, name+".sh")
	os.WriteFile(script, []byte("#!/bin/sh\ntrap 'echo got-TERM; exit 143' TERM\necho started\nsleep 600 & wait\n"), 0o755)
	out, errf = filepath.Join(work, name+".out"), filepath.Join(work, name+".err")
	id, _, err := Submit(ctx, c, fmt.Sprintf("%s sbatch -N %d --vm-image=%s --vm-console=%s -o %s -e %s %s",
		spanEnv(work, name), nodes, image, filepath.Join(work, name+"-console.log"), out, errf, script))
	if err != nil {
		t.Fatal(err)
	}
	for {
		if b, _ := os.ReadFile(out); strings.Contains(string(b), "started") {
			return id, out, errf
		}
		if j, _ := ShowJob(ctx, c, id); Finished(j.State) {
			e, _ := os.ReadFile(errf)
			t.Fatalf("job %s ended (%s %s) before its script started\nstderr:\n%s", id, j.State, j.ExitCode, e)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("job %s: the script did not start: %v", id, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// spanCancel: scancel while the script runs in the spread guest.
func spanCancel(t *testing.T, ctx context.Context, c *VirtCluster, work, image string) {
	id, out, errf := spanStarted(t, ctx, c, work, image, "span-cancel", len(c.Nodes))
	cancelled := time.Now()
	if r, err := c.Client(ctx, "scancel "+id); err != nil || r.ExitCode != 0 {
		t.Fatalf("scancel %s: %v %s", id, err, r)
	}
	j, err := WaitJob(ctx, c, id)
	if err != nil {
		t.Fatal(err)
	}
	e, _ := os.ReadFile(errf)
	t.Logf("scancel: job %s %s %v later; launcher log:\n%s", id, j.State, time.Since(cancelled).Round(time.Second), e)
	keepSliceFiles(t, work, "span-cancel")
	if o, _ := os.ReadFile(out); j.State != "CANCELLED" || !strings.Contains(string(o), "got-TERM") {
		t.Errorf("job %s: %s, stdout %q; want CANCELLED and the guest command's got-TERM\nstderr:\n%s", id, j.State, o, e)
	}
	noHpcvmLeft(t, ctx, c)
}

// spanSliceKilled: the slice on the last node is killed (SIGKILL) while
// the script runs; the job fails with an error naming the slice, and
// nothing is left on any node.
func spanSliceKilled(t *testing.T, ctx context.Context, c *VirtCluster, work, image string, nodes int) {
	id, _, errf := spanStarted(t, ctx, c, work, image, "span-killed", nodes)
	if r, err := c.NodeRun(ctx, nodes-1, "pkill -KILL -f 'hpcvm slice'"); err != nil || r.ExitCode != 0 {
		t.Fatalf("killing the slice on node %d: %v %s", nodes, err, r)
	}
	j, err := WaitJob(ctx, c, id)
	if err != nil {
		t.Fatal(err)
	}
	e, _ := os.ReadFile(errf)
	if j.State != "FAILED" || !strings.Contains(string(e), fmt.Sprintf("slice %d", nodes-1)) {
		t.Errorf("job %s: %s %s, stderr %q; want FAILED with an error naming slice %d", id, j.State, j.ExitCode, e, nodes-1)
	}
	noHpcvmLeft(t, ctx, c)
}

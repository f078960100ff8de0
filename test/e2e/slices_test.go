//go:build e2e && dsmlinux

package e2e

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
	"github.com/hpcvm/hpcvm/test/virtnode"
	"github.com/hpcvm/hpcvm/vmm/dsm"
)

// TestLinuxAcrossSlices boots the minimal test kernel as `hpcvm slice`
// processes in one virt node, over loopback TCP (issue 7's first step;
// docs/dsm.md, "Linux guests"). Cases go from least to most distributed so
// a failure says which part broke:
//
//   - 1 slice, 1 and 2 vCPUs: the VMM's own local APICs and IOAPIC (no
//     in-kernel irqchip) with no remote memory at all;
//   - 2 slices x 1 vCPU: vCPU 1's pages, IPIs and device accesses cross
//     slices.
//
// Each case wants the guest's userspace to report every vCPU online, the
// disk checksum to match, a poweroff, and every slice to exit 0.
//
// Opt-in (make e2e-dsm-linux) until it passes reliably.
func TestLinuxAcrossSlices(t *testing.T) {
	r := node(t)
	bin := mustHPCVM(t)
	art := guestvm.FindArtifacts()
	guestvm.Need(t, art.Vmlinux, art.TestInitramfs)
	disk := makeDisk(t)
	for _, tc := range []struct {
		name      string
		placement string
	}{
		{"1slice-1cpu", "0"},
		{"1slice-2cpu", "0-1"},
		{"2slices-1cpu", "0/1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			healthyNode(t)
			runSlices(t, []*virtnode.Node{r.Node}, bin, art, disk, tc.placement, 4*time.Minute, "/check.sh")
		})
	}
}

// holdArgs passes HPCVM_E2E_SLICE_HOLD (e.g. 20ms) as every slice's
// --hold, to measure the hold window's effect.
func holdArgs() []string {
	if v := os.Getenv("HPCVM_E2E_SLICE_HOLD"); v != "" {
		return []string{"--hold", v}
	}
	return nil
}

// runSlices runs the test Linux guest as one slice per placement group,
// slice i on nodes[i%len(nodes)]; slice 0's node keeps the console.
// runSlices runs the test Linux guest as the slices of placement on nodes
// (round robin) and checks what it printed; it returns the guest's console.
func runSlices(t *testing.T, nodes []*virtnode.Node, bin string, art guestvm.Artifacts, disk testDisk, placement string, limit time.Duration, script string) string {
	// HPCVM_E2E_SLICE_TIMEOUT overrides limit, which bounds each case:
	// across slices in virt nodes every page hand-off costs milliseconds
	// (docs/dsm.md).
	if v := os.Getenv("HPCVM_E2E_SLICE_TIMEOUT"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("HPCVM_E2E_SLICE_TIMEOUT: %v", err)
		}
		limit = d
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit+2*time.Minute)
	defer cancel()
	groups, err := dsm.ParsePlacement(placement)
	if err != nil {
		t.Fatal(err)
	}
	cpus, err := dsm.CheckPlacement(groups, len(groups))
	if err != nil {
		t.Fatal(err)
	}
	dir := sliceDir(t, ctx, nodes...)
	peers := slicePeers(nodes, len(groups), 7600)
	cmdline := guestvm.BaseCmdline + " hpcvm.disk=ro hpcvm.test=" + script
	if extra := os.Getenv("HPCVM_E2E_CMDLINE_EXTRA"); extra != "" {
		cmdline += " " + extra // e.g. loglevel=7 when debugging
	}
	var procs []*virtnode.Proc
	for id := range groups {
		argv := []string{bin, "slice", "--id", strconv.Itoa(id), "--peers", peers,
			"--vm-id", "e2e-slices", "--secret-file", dir + "/key", "--placement", placement,
			"--mem", "256MiB", "--timeout", limit.String(),
			// The same guest options on every slice, as a launcher gives
			// them; only slice 0 reads the files.
			"--kernel", art.Vmlinux, "--initrd", art.TestInitramfs, "--cmdline", cmdline,
			"--disk", disk.path + ",ro", "--console", fmt.Sprintf("%s/console.%d", dir, id)}
		argv = append(argv, holdArgs()...)
		if os.Getenv("HPCVM_E2E_REPLICATE_TABLES") == "1" {
			argv = append(argv, "--replicate-tables")
		}
		if every := os.Getenv("HPCVM_E2E_PROFILE"); every != "" {
			argv = append(argv, "--profile", every) // RIP samples in the slice's JSON
		}
		if cpus := os.Getenv("HPCVM_E2E_SLICE_TASKSET"); cpus != "" {
			// e.g. 0: every slice on one node CPU, so the node's kernel,
			// not TCG's round robin, switches between them (docs/dsm.md).
			argv = append([]string{"taskset", "-c", cpus}, argv...)
		}
		p, err := nodes[id%len(nodes)].RunBackground(guestvm.Quote(argv) + " </dev/null")
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, p)
	}
	results := make([]virtnode.Result, len(procs))
	failed := false
	for id, p := range procs {
		res, err := p.Wait(ctx)
		results[id] = res
		if err != nil || res.ExitCode != 0 {
			failed = true
			t.Errorf("slice %d: exit %d, %v\nstdout: %s\nstderr (tail):\n%s", id, res.ExitCode, err,
				strings.TrimSpace(res.Stdout), guestvm.Tail(res.Stderr, 15))
		} else {
			t.Logf("slice %d: %s", id, strings.TrimSpace(res.Stdout))
		}
	}
	cres, _ := nodes[0].Run(ctx, "cat "+dir+"/console.0")
	console := cres.Stdout
	nproc, _ := hpcvmLine(console, "nproc")
	online, _ := hpcvmLine(console, "cpus_online")
	wantOnline := "0"
	if cpus > 1 {
		wantOnline = fmt.Sprintf("0-%d", cpus-1)
	}
	if nproc != strconv.Itoa(cpus) || online != wantOnline {
		failed = true
		t.Errorf("guest reports nproc=%q cpus_online=%q, want %d and %q", nproc, online, cpus, wantOnline)
	}
	if !strings.Contains(console, "SHA256 "+disk.sha256) {
		failed = true
		t.Errorf("the guest did not print the disk checksum (virtio-blk on the home slice)")
	}
	if script == spreadScript && !checkParsum(t, console, groups) {
		failed = true
	}
	if !strings.Contains(console, "reboot: Power down") {
		failed = true
		t.Errorf("the guest did not power off")
	}
	if failed {
		t.Logf("guest console (tail):\n%s", guestvm.Tail(console, 60))
	}
	return console
}

// TestMicroGuestsAcrossSlices runs the DSM's memory-model micro-guests
// (vmm/dsm, the fast tier's coherence cases) as 2 slice processes in a
// virt node: the same protocol under the node's real KVM with nested
// paging, where every dropped page must also leave KVM's nested page
// tables and the TLB. A wrong sum or a stale read here and not on the
// host points at the platform, not at the protocol.
func TestMicroGuestsAcrossSlices(t *testing.T) {
	r := node(t)
	bin := mustHPCVM(t)
	n := r.Node
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	for _, tc := range []struct {
		prog, want string
		iters      int
	}{
		{"lockinc", `"value":20000}`, 10000},
		{"mp", `"reports":[0]`, 200},
		{"spinlock", `"value":10000},{"addr":"0x100008","value":10000}`, 5000},
	} {
		t.Run(tc.prog, func(t *testing.T) {
			healthyNode(t) // mp hung nodes under QEMU 7.2
			dir := sliceDir(t, ctx, n)
			var procs []*virtnode.Proc
			for id := 0; id < 2; id++ {
				argv := []string{bin, "slice", "--id", strconv.Itoa(id), "--peers", "127.0.0.1:7700,127.0.0.1:7701",
					"--vm-id", "e2e-mg", "--secret-file", dir + "/key", "--placement", "0/1",
					"--builtin", tc.prog, "--iters", strconv.Itoa(tc.iters), "--timeout", "3m"}
				argv = append(argv, holdArgs()...)
				if os.Getenv("HPCVM_E2E_REPLICATE_TABLES") == "1" {
					argv = append(argv, "--replicate-tables")
				}
				p, err := n.RunBackground(guestvm.Quote(argv) + " </dev/null")
				if err != nil {
					t.Fatal(err)
				}
				procs = append(procs, p)
			}
			for id, p := range procs {
				res, err := p.Wait(ctx)
				if err != nil || res.ExitCode != 0 {
					t.Fatalf("slice %d: exit %d %v\n%s", id, res.ExitCode, err, res)
				}
				if id == 0 {
					t.Logf("slice 0: %s", strings.TrimSpace(res.Stdout))
					if !strings.Contains(res.Stdout, tc.want) {
						t.Errorf("slice 0 result lacks %s", tc.want)
					}
				}
			}
		})
	}
}

// TestSlicesAcrossNodes runs 2 slices on 2 virt nodes of one CPU each, over
// the cluster bridge, as a 2-node job places them: the micro-guests'
// message passing with the page tables replicated, then the test Linux
// guest. A node with one CPU has nothing for TCG to round-robin between, so
// a page request wakes the serving slice at once, where 2 slices in one
// 2-CPU node wait for TCG's turn (docs/dsm.md, "Status").
func TestSlicesAcrossNodes(t *testing.T) {
	virtnode.RequirePrereqs(t)
	bin := mustHPCVM(t)
	art := guestvm.FindArtifacts()
	guestvm.Need(t, art.Vmlinux, art.TestInitramfs)
	disk := makeDiskWith(t, spreadFiles(t))
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Minute)
	defer cancel()
	c, err := virtnode.Start(ctx, virtnode.Config{Nodes: 2, CPUs: 1, MemMiB: 1024, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var rttMicros int64
	var spread string // the spread guest's console
	t.Run("rtt", func(t *testing.T) {
		rttMicros = nodeRTT(t, ctx, c)
	})
	t.Run("mp", func(t *testing.T) {
		start := time.Now()
		out := runMicroSlices(t, ctx, c.Nodes, bin, "mp", 200, "--replicate-tables")
		wall := time.Since(start)
		if len(out[0].Reports) != 1 || out[0].Reports[0] != 0 {
			t.Errorf("mp reports %v, want [0] (no stale read)", out[0].Reports)
		}
		// mp's vCPUs take turns, so its requests are served one at a time.
		reqs := out[0].Stats.Requests + out[1].Stats.Requests
		t.Logf("mp: 200 hand-offs in %v; requests %d + %d", wall.Round(time.Millisecond),
			out[0].Stats.Requests, out[1].Stats.Requests)
		if reqs > 0 && rttMicros > 0 {
			per := wall.Microseconds() / reqs
			t.Logf("mp: %d µs of wall time per request, %.1fx the nodes' 4 KiB TCP round trip (%d µs)",
				per, float64(per)/float64(rttMicros), rttMicros)
		}
	})
	t.Run("linux", func(t *testing.T) {
		spread = runSlices(t, c.Nodes, bin, art, disk, "0/1", 30*time.Minute, spreadScript)
	})
	// The reference: the same guest and program on one of the nodes, as a
	// single slice with one vCPU (both threads on it).
	t.Run("linux-1node", func(t *testing.T) {
		one := runSlices(t, c.Nodes[:1], bin, art, disk, "0", 30*time.Minute, spreadScript)
		s2, ok2 := parsumSeconds(spread)
		s1, ok1 := parsumSeconds(one)
		if ok1 && ok2 {
			t.Logf("parsum, 2 threads: %.1f s on 2 nodes x 1 vCPU, %.1f s on 1 node x 1 vCPU: 2 nodes are %.2fx the speed of 1", s2, s1, s1/s2)
		}
	})
}

// nodeRTT measures the median TCP round trip of a 4 KiB message from the
// first node to the second (test/e2e/rttprobe), in µs.
func nodeRTT(t *testing.T, ctx context.Context, c *virtnode.Cluster) int64 {
	_, file, _, _ := runtime.Caller(0)
	probe := filepath.Join(c.Dir(), "rttprobe")
	if err := virtnode.GoBuild(ctx, filepath.Join(filepath.Dir(file), "rttprobe"), probe); err != nil {
		t.Fatal(err)
	}
	srv, err := c.Nodes[1].RunBackground(probe + " -listen :7800 </dev/null")
	if err != nil {
		t.Fatal(err)
	}
	out := c.Nodes[0].MustRun(t, ctx, fmt.Sprintf("%s -connect %s:7800 -n 500", probe, c.Nodes[1].IP))
	if _, err := srv.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	var r struct {
		MedianUS int64 `json:"median_us"`
		P99US    int64 `json:"p99_us"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("rttprobe printed %q: %v", out, err)
	}
	t.Logf("4 KiB TCP round trip between the nodes: median %d µs, p99 %d µs", r.MedianUS, r.P99US)
	return r.MedianUS
}

// spreadScript is the test script of a guest spread over nodes: the disk
// checksum, then guest/parsum, a pthreads program with parsumThreads
// threads (HPCVM_E2E_PARSUM_N iterations in all, default 2e8), allowed on
// every vCPU (/init pins itself to the boot vCPUs): once placed by the
// guest's scheduler alone (where they ran is logged), once with each
// thread bound to a vCPU of its own (-b, as OMP_PROC_BIND=spread; checked).
const spreadScript = "/spread.sh"

// spreadFiles returns guest/parsum and spreadScript for the guest's disk.
func spreadFiles(t *testing.T) map[string][]byte {
	t.Helper()
	n := cmp.Or(os.Getenv("HPCVM_E2E_PARSUM_N"), "200000000")
	script := "set -e\nsum=$(sha256sum /disk/data.bin)\necho \"SHA256 ${sum%% *}\"\nall=0-$(($(nproc --all)-1))\n" +
		"taskset -c $all /disk/parsum -t " + strconv.Itoa(parsumThreads) + " -n " + n + "\n" +
		"taskset -c $all /disk/parsum -b -t " + strconv.Itoa(parsumThreads) + " -n " + n + "\n"
	return map[string][]byte{"parsum": guestvm.Parsum(t), strings.TrimPrefix(spreadScript, "/"): []byte(script)}
}

// parsumThreads is how many threads the spread script's parsum starts:
// the vCPUs of TestSlicesAcrossNodes' spread guest, also on the 1-vCPU
// reference, so both runs do the same work.
const parsumThreads = 2

// parsumSeconds is the bound parsum's run time on the console.
func parsumSeconds(console string) (float64, bool) {
	m := regexp.MustCompile(`PARSUM threads=\d+ bind=1 .* seconds=(\S+)`).FindStringSubmatch(console)
	if m == nil {
		return 0, false
	}
	f, err := strconv.ParseFloat(m[1], 64)
	return f, err == nil
}

// checkParsum checks parsum's line on the console: the exact sum,
// parsumThreads threads, and threads seen on the vCPUs of every slice that
// runs any (from inside the guest: sched_getcpu). It logs the run time.
func checkParsum(t *testing.T, console string, groups [][]int) bool {
	t.Helper()
	if m := regexp.MustCompile(`PARSUM threads=\d+ bind=0 .* ok=(\d) cpus=(\S+) seconds=(\S+)`).FindStringSubmatch(console); m != nil {
		t.Logf("parsum, threads placed by the guest's scheduler: ok=%s, on CPUs %s, %s s", m[1], m[2], m[3])
	}
	m := regexp.MustCompile(`PARSUM threads=(\d+) bind=1 .* ok=(\d) cpus=(\S+) seconds=(\S+)`).FindStringSubmatch(console)
	if m == nil {
		t.Errorf("the guest printed no PARSUM line of the bound run")
		return false
	}
	seen := map[int]bool{}
	for i, g := range groups {
		for _, c := range strings.Split(m[3], ",") {
			if n, err := strconv.Atoi(c); err == nil && slices.Contains(g, n) {
				seen[i] = true
			}
		}
	}
	want := 0
	for _, g := range groups {
		if len(g) > 0 {
			want++
		}
	}
	ok := true
	if m[1] != strconv.Itoa(parsumThreads) || m[2] != "1" {
		t.Errorf("parsum: %s threads, ok=%s; want %d threads and the exact sum", m[1], m[2], parsumThreads)
		ok = false
	}
	if len(seen) != want {
		t.Errorf("parsum's threads ran on CPUs %s: slices %v of %d", m[3], seen, want)
		ok = false
	}
	t.Logf("parsum, threads bound: %s threads on CPUs %s (slices %v) in %s s", m[1], m[3], seen, m[4])
	return ok
}

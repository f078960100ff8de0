//go:build bench

package lab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"
)

// TestSlurmBench measures submit-to-first-output latency of a batch job
// with and without --vm-image in the same 2-node virt-node lab: from
// starting sbatch until the job's output file has its first byte. With
// HPCVM_BENCH_DOC set it rewrites the "## Slurm" section of that file.
// Not a test of speed: nothing is asserted about the times.
func TestSlurmBench(t *testing.T) {
	if err := VirtPrerequisites(); err != nil {
		Require(t, err.Error())
	}
	store := os.Getenv("HPCVM_IMAGE_STORE")
	if store == "" {
		store = "/var/lib/hpcvm/images"
	}
	if _, err := os.Stat(filepath.Join(store, "debian12", "manifest.json")); err != nil {
		Require(t, "the debian12 image is missing (make image-debian12): "+err.Error())
	}
	plainRuns, vmRuns := envInt("HPCVM_BENCH_PLAIN_RUNS", 5), envInt("HPCVM_BENCH_VM_RUNS", 2)
	dir, err := os.MkdirTemp("", "hpcvm-bench-lab-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	WritePolicy(filepath.Join(dir, "policy"))
	ctx, cancel := context.WithTimeout(context.Background(), 55*time.Minute)
	defer cancel()
	c, err := StartVirt(ctx, VirtOptions{Nodes: 2, Dir: dir, Hpcvm: HpcvmBin(), SpankSO: SpankSO(),
		PolicyDir: filepath.Join(dir, "policy"), ImageStore: store, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	work := filepath.Join(dir, "work")
	os.MkdirAll(work, 0o777)
	script := filepath.Join(work, "first.sh")
	os.WriteFile(script, []byte("#!/bin/sh\n#SBATCH --exclusive\necho first\n"), 0o755)
	// A warm-up job: the first scheduling pass after slurmctld starts is slow.
	if id, _, err := Submit(ctx, c, "sbatch -N 2 -o /dev/null --wrap true"); err == nil {
		WaitJob(ctx, c, id)
	}

	measure := func(kind, opts string, n int) []time.Duration {
		var ds []time.Duration
		for i := range n {
			out := filepath.Join(work, fmt.Sprintf("%s-%d.out", kind, i))
			start := time.Now()
			id, _, err := Submit(ctx, c, fmt.Sprintf("sbatch -N 2 %s -o %s %s", opts, out, script))
			if err != nil {
				t.Fatal(err)
			}
			for {
				if st, err := os.Stat(out); err == nil && st.Size() > 0 {
					break
				}
				if ctx.Err() != nil {
					t.Fatalf("%s job %s: no output: %v", kind, id, ctx.Err())
				}
				time.Sleep(20 * time.Millisecond)
			}
			d := time.Since(start)
			j, err := WaitJob(ctx, c, id)
			if err != nil || j.State != "COMPLETED" {
				t.Fatalf("%s job %s: %s %v", kind, id, j.State, err)
			}
			t.Logf("%s job %s: first output after %v", kind, id, d.Round(time.Millisecond))
			ds = append(ds, d)
		}
		return ds
	}
	plain := measure("plain", "", plainRuns)
	vm := measure("vm", "--vm-image=debian12", vmRuns)

	load, _ := os.ReadFile("/proc/loadavg")
	section := fmt.Sprintf(`## Slurm

Submit-to-first-output latency: from starting `+"`sbatch -N 2`"+` until the job's output file has its first byte
(`+"`echo first`"+` as the script's first line), in one 2-node lab of virt nodes (test/lab: slurmctld on the host side,
slurmd + the hpcvm plugin in each QEMU TCG node, 2 vCPUs and 2560 MiB per node). With `+"`--vm-image=debian12`"+` this
includes the policy check at submission, scheduling, the VMM slices started with srun, the boot of the Debian 12
image (cloud kernel, initramfs, systemd) under hpcvm's VMM with nested KVM inside TCG, the agent handshake, and
staging the script. Measured by `+"`make bench-slurm`"+` (test/lab/bench_test.go); timings in virt nodes compare
only with each other (docs/testing.md).

| job | runs | min | median | max |
| --- | ---: | ---: | ---: | ---: |
| plain (no --vm-image) | %d | %s | %s | %s |
| --vm-image=debian12 | %d | %s | %s | %s |

**A VM job's first output comes %.0fx as late as a plain job's** (medians, same lab, same run).

Measured on %s (%d plain runs, %d VM run(s), one after the other). The VM had the default shape: all 4
allocated CPUs (2 per node, `+"`--exclusive`"+`) on the first node, i.e. 4 vCPUs on a 2-vCPU virt node, and 1920 MiB; the
guest's boot (kernel, systemd, agent) is most of the VM row: compare "## hpcvm run" above for a 1-vCPU guest booted in
one node without Slurm. Machine: %d cores, load average at the end %s (shared with other work: absolute numbers vary with load; the
gap between the rows is the VM's cost).
`, len(plain), stat(plain, 0), stat(plain, 1), stat(plain, 2), len(vm), stat(vm, 0), stat(vm, 1), stat(vm, 2),
		float64(median(vm))/float64(median(plain)), time.Now().Format("2006-01-02"), len(plain), len(vm), runtime.NumCPU(), strings.Join(strings.Fields(string(load))[:3], " "))
	t.Log("\n" + section)
	if doc := os.Getenv("HPCVM_BENCH_DOC"); doc != "" {
		if err := replaceSection(doc, "## Slurm", section); err != nil {
			t.Fatal(err)
		}
	}
}

func envInt(k string, def int) int {
	var n int
	if _, err := fmt.Sscan(os.Getenv(k), &n); err == nil && n > 0 {
		return n
	}
	return def
}

// median is the median of ds (the upper one for an even count, as stat).
func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// stat returns min (0), median (1) or max (2).
func stat(ds []time.Duration, which int) string {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	var d time.Duration
	switch which {
	case 0:
		d = s[0]
	case 1:
		d = s[len(s)/2]
	default:
		d = s[len(s)-1]
	}
	if d < 10*time.Second {
		return d.Round(10 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

// replaceSection replaces the markdown section starting with heading (up to
// the next "## " heading) in path, or appends it.
func replaceSection(path, heading, section string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(b)
	re := regexp.MustCompile(`(?ms)^` + regexp.QuoteMeta(heading) + `\n.*?(\n## |\z)`)
	if loc := re.FindStringIndex(s); loc != nil {
		end := loc[1]
		if strings.HasSuffix(s[loc[0]:end], "\n## ") {
			end -= len("## ")
		}
		s = s[:loc[0]] + section + "\n" + s[end:]
	} else {
		s = strings.TrimRight(s, "\n") + "\n\n" + section
	}
	return os.WriteFile(path, []byte(s), 0o644)
}

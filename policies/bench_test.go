package policies

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// genPolicy builds a large site: [defaults] plus nRules rules spread over
// nFiles files, matching on partitions, accounts, users, groups and QoS
// the way a big centre's policy.d would.
func genPolicy(nRules, nFiles int) []File {
	rng := rand.New(rand.NewPCG(1, 2))
	files := make([]File, nFiles)
	var b strings.Builder
	b.WriteString(`[defaults]
images.allow = ["rocky9*", "ubuntu-2?.04", "site/*"]
images.deny = ["*-debug"]
limits = { max_nodes = 64, max_cpus_per_node = 128, max_mem_per_node = "512GiB", default_mem_per_node = "4GiB" }
checkpoint = { interval = "2h", min_interval = "5m", before_walltime = "10m", dir = "/ckpt/%a/%u/%j", keep = 2 }
migration = { enabled = true, predictors = ["mce", "smart"], risk_threshold = 0.8 }
cgroup = { cpu_weight = 100, pids_max = 8192 }
`)
	perFile := nRules / nFiles
	for f := range nFiles {
		if f > 0 {
			b.Reset()
		}
		for i := range perFile {
			n := f*perFile + i
			fmt.Fprintf(&b, "\n[[rule]]\nname = \"r%d\"\n", n)
			switch n % 5 {
			case 0:
				fmt.Fprintf(&b, "match.partition = \"p%d\"\n", rng.IntN(20))
			case 1:
				fmt.Fprintf(&b, "match.account = [\"a%d\", \"a%d\"]\n", rng.IntN(500), rng.IntN(500))
			case 2:
				fmt.Fprintf(&b, "match = { account = \"a%d\", partition = \"p%d\" }\n", rng.IntN(500), rng.IntN(20))
			case 3:
				fmt.Fprintf(&b, "match.user = \"u%d*\"\nexcept.qos = \"debug\"\n", rng.IntN(1000))
			case 4:
				fmt.Fprintf(&b, "match.group = \"g%d\"\nuser_may_override = [\"checkpoint.interval\"]\n", rng.IntN(200))
			}
			switch n % 4 {
			case 0:
				fmt.Fprintf(&b, "limits.max_mem_per_node = \"%dGiB\"\n", 64<<rng.IntN(4))
			case 1:
				fmt.Fprintf(&b, "checkpoint.interval = \"%dm\"\n", 30+rng.IntN(90))
			case 2:
				fmt.Fprintf(&b, "images.allow = [\"rocky9-cuda*\", \"site/gpu-*\"]\nimages.deny = \"site/gpu-old*\"\n")
			case 3:
				fmt.Fprintf(&b, "migration.spare_nodes = %d\ncgroup.cpu_quota_percent = %d\n", rng.IntN(3), 100*(1+rng.IntN(8)))
			}
		}
		files[f] = File{Name: fmt.Sprintf("/etc/hpcvm/policy.d/%02d-gen.toml", f), Data: []byte(b.String())}
	}
	return files
}

// genRequests makes n plausible requests against genPolicy's names.
func genRequests(n int) []Request {
	rng := rand.New(rand.NewPCG(3, 4))
	images := []string{"rocky9", "rocky9-cuda12", "ubuntu-22.04", "site/gpu-a100", "site/gpu-old1", "centos7", "rocky9-debug"}
	reqs := make([]Request, n)
	for i := range reqs {
		reqs[i] = Request{
			User: fmt.Sprintf("u%d", rng.IntN(2000)), Groups: []string{fmt.Sprintf("g%d", rng.IntN(400)), "users"},
			Account: fmt.Sprintf("a%d", rng.IntN(600)), Partition: fmt.Sprintf("p%d", rng.IntN(24)), QOS: []string{"normal", "debug", "high"}[rng.IntN(3)],
			Image: images[rng.IntN(len(images))], Nodes: 1 + rng.IntN(32), CPUsPerNode: 1 + rng.IntN(64),
			MemPerNode: Size(1+rng.IntN(256)) << 30, Walltime: Duration(rng.IntN(48)+1) * 3600e9,
		}
		if rng.IntN(3) == 0 {
			reqs[i].CheckpointInterval = OptDuration{Set: true, Value: Duration(10+rng.IntN(200)) * 60e9}
		}
	}
	return reqs
}

func TestGeneratedPolicyLoads(t *testing.T) {
	p, err := Parse(genPolicy(1000, 10)...)
	if err != nil {
		t.Fatal(err)
	}
	if p.NumRules() != 1001 {
		t.Fatalf("NumRules = %d, want 1001", p.NumRules())
	}
	var admitted, refused int
	for _, r := range genRequests(500) {
		if _, err := p.Admit(r); err != nil {
			refused++
		} else {
			admitted++
		}
	}
	// The generator is meant to exercise both outcomes.
	if admitted == 0 || refused == 0 {
		t.Errorf("admitted %d, refused %d: want some of each", admitted, refused)
	}
}

// BenchmarkLoad1000Rules measures parsing and checking a 1,000-rule policy
// in 10 files.
func BenchmarkLoad1000Rules(b *testing.B) {
	files := genPolicy(1000, 10)
	var size int
	for _, f := range files {
		size += len(f.Data)
	}
	b.SetBytes(int64(size))
	start := cpuTime()
	for b.Loop() {
		if _, err := Parse(files...); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
}

// BenchmarkAdmit10000 measures admitting 10,000 requests against the
// 1,000-rule policy; one op is the whole batch.
func BenchmarkAdmit10000(b *testing.B) {
	p, err := Parse(genPolicy(1000, 10)...)
	if err != nil {
		b.Fatal(err)
	}
	reqs := genRequests(10000)
	start := cpuTime()
	for b.Loop() {
		for _, r := range reqs {
			_, _ = p.Admit(r)
		}
	}
	cpu := float64(cpuTime() - start)
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(reqs)), "ns/admit")
	b.ReportMetric(cpu/float64(b.N), "cpu-ns/op")
	b.ReportMetric(cpu/float64(b.N*len(reqs)), "cpu-ns/admit")
}

// cpuTime is the CPU time this process has used. On a shared machine it
// is a steadier measure than wall-clock ns/op, which includes waiting for
// a core.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestIndexAgreesWithScan checks that the rule index finds exactly the rules
// that trying every rule in precedence order finds.
func TestIndexAgreesWithScan(t *testing.T) {
	p, err := Parse(genPolicy(1000, 10)...)
	if err != nil {
		t.Fatal(err)
	}
	reqs := genRequests(2000)
	reqs = append(reqs, Request{User: "u1", Groups: []string{"g1", "g2", "g1"}}, Request{})
	for _, req := range reqs {
		var want []string
		for _, r := range p.rules {
			if r.matches(&req) {
				want = append(want, r.name)
			}
		}
		var got []string
		for _, r := range p.matching(&req) {
			got = append(got, r.name)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("request %+v: index found %v, scan %v", req, got, want)
		}
	}
}

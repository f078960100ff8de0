package launcher

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestExpandHostlist(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		err  string
	}{
		{in: "n1", want: []string{"n1"}},
		{in: "n[1-3,5]", want: []string{"n1", "n2", "n3", "n5"}},
		{in: "n[1-2],gpu7", want: []string{"n1", "n2", "gpu7"}},
		{in: "node[08-10]", want: []string{"node08", "node09", "node10"}},
		{in: "r[1-2]n[1-2]", want: []string{"r1n1", "r1n2", "r2n1", "r2n2"}},
		{in: "a[1]-ib", want: []string{"a1-ib"}},
		{in: "n[3-1]", err: "bad range"},
		{in: "n[1-", err: "missing ']'"},
		{in: "n1]", err: "unbalanced"},
		{in: "n[a-b]", err: "bad range"},
		{in: "n[1-2],,n3", err: "empty host name"},
		{in: "", err: "empty host name"},
		{in: "n[0-99999999]", err: "more than"},
		{in: "n[[1]]", err: "nested"},
	} {
		got, err := ExpandHostlist(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ExpandHostlist(%q) = %v, %v; want error containing %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ExpandHostlist(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

func FuzzExpandHostlist(f *testing.F) {
	for _, s := range []string{"n1", "n[1-3,5]", "r[1-2]n[01-02],x", "n[", "a]b", "n[1-2]]", "[0-5]"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		hosts, err := ExpandHostlist(s)
		if err != nil {
			return
		}
		if len(hosts) == 0 || len(hosts) > maxHosts {
			t.Fatalf("%q: %d hosts", s, len(hosts))
		}
		for _, h := range hosts {
			if h == "" || strings.ContainsAny(h, "[],") {
				t.Fatalf("%q: bad host %q", s, h)
			}
		}
		// A list without brackets is its own expansion.
		if !strings.ContainsAny(s, "[]") && strings.Join(hosts, ",") != s {
			t.Fatalf("%q expanded to %v", s, hosts)
		}
	})
}

func TestParseCPUsPerNode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []int
		bad  bool
	}{
		{in: "4", want: []int{4}},
		{in: "2(x3),1", want: []int{2, 2, 2, 1}},
		{in: "1(x2)", want: []int{1, 1}},
		{in: "2(3)", bad: true},
		{in: "x", bad: true},
		{in: "2(x0)", bad: true},
		{in: "", bad: true},
	} {
		got, err := ParseCPUsPerNode(tc.in)
		if tc.bad != (err != nil) || (!tc.bad && !reflect.DeepEqual(got, tc.want)) {
			t.Errorf("ParseCPUsPerNode(%q) = %v, %v", tc.in, got, err)
		}
	}
}

func TestParseEnv(t *testing.T) {
	base := []string{"SLURM_JOB_ID=42", "SLURM_JOB_NODELIST=n[1-2]", "SLURM_JOB_CPUS_PER_NODE=2(x2)",
		"SLURM_MEM_PER_NODE=1500", "SLURM_JOB_USER=alice", "SLURM_JOB_UID=1000", "SLURM_JOB_GID=100",
		"SLURM_JOB_PARTITION=lab", "SLURM_PROCID=0", "SLURMD_NODENAME=n1", "OTHER=x=y"}
	for _, tc := range []struct {
		name  string
		extra []string
		drop  string
		check func(*SlurmEnv) bool
		err   string
	}{
		{name: "batch", check: func(e *SlurmEnv) bool {
			return e.JobID == "42" && e.StepID == "" && reflect.DeepEqual(e.Nodes, []string{"n1", "n2"}) &&
				e.TotalCPUs() == 4 && e.MemPerNodeMiB == 1500 && e.User == "alice" && e.UID == 1000 && e.GID == 100 &&
				e.Partition == "lab" && e.NodeName == "n1"
		}},
		{name: "step nodelist wins", extra: []string{"SLURM_STEP_ID=3", "SLURM_STEP_NODELIST=n2"}, check: func(e *SlurmEnv) bool {
			return e.StepID == "3" && reflect.DeepEqual(e.Nodes, []string{"n2"}) && e.TotalCPUs() == 2
		}},
		{name: "mem per cpu", drop: "SLURM_MEM_PER_NODE", extra: []string{"SLURM_MEM_PER_CPU=300"}, check: func(e *SlurmEnv) bool {
			return e.MemPerNodeMiB == 600
		}},
		{name: "no memory", drop: "SLURM_MEM_PER_NODE", check: func(e *SlurmEnv) bool { return e.MemPerNodeMiB == 0 }},
		{name: "no job", drop: "SLURM_JOB_ID", err: "SLURM_JOB_ID is not set"},
		{name: "no nodes", drop: "SLURM_JOB_NODELIST", err: "NODELIST"},
		{name: "bad nodes", drop: "SLURM_JOB_NODELIST", extra: []string{"SLURM_JOB_NODELIST=n[2-1]"}, err: "node list"},
		{name: "cpus short", drop: "SLURM_JOB_CPUS_PER_NODE", extra: []string{"SLURM_JOB_CPUS_PER_NODE=2"}, err: "covers 1 node"},
		{name: "bad mem", drop: "SLURM_MEM_PER_NODE", extra: []string{"SLURM_MEM_PER_NODE=lots"}, err: "SLURM_MEM_PER_NODE"},
		{name: "bad procid", extra: []string{"SLURM_PROCID=x"}, err: "SLURM_PROCID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var env []string
			for _, kv := range base {
				if tc.drop == "" || !strings.HasPrefix(kv, tc.drop+"=") {
					env = append(env, kv)
				}
			}
			env = append(env, tc.extra...)
			e, err := ParseEnv(env)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || !tc.check(e) {
				t.Fatalf("ParseEnv = %+v, %v", e, err)
			}
		})
	}
}

func TestParseTimeLimit(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		bad  bool
	}{
		{in: "UNLIMITED"}, {in: "Partition_Limit"},
		{in: "5", want: 5 * time.Minute},
		{in: "05:30", want: 5*time.Minute + 30*time.Second},
		{in: "01:02:03", want: time.Hour + 2*time.Minute + 3*time.Second},
		{in: "1-00:00:00", want: 24 * time.Hour},
		{in: "2-3", want: 51 * time.Hour},
		{in: "1-2:30", want: 26*time.Hour + 30*time.Minute},
		{in: "1:2:3:4", bad: true}, {in: "x", bad: true}, {in: "-1", bad: true}, {in: "1-", bad: true},
	} {
		got, err := ParseTimeLimit(tc.in)
		if tc.bad != (err != nil) || got != tc.want {
			t.Errorf("ParseTimeLimit(%q) = %v, %v", tc.in, got, err)
		}
	}
}

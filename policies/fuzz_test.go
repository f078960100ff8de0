package policies

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// FuzzCompile feeds arbitrary files to the loader. It must never panic, every
// problem must name its file, and a policy that loads must answer Admit.
func FuzzCompile(f *testing.F) {
	f.Add("[defaults]\nimages.allow = [\"*\"]\nlimits.max_mem_per_node = \"16GiB\"\n")
	f.Add("[[rule]]\nname = \"gpu\"\nmatch = { partition = \"gpu\" }\n[rule.checkpoint]\ninterval = \"30m\"\nmin_interval = \"off\"\n")
	f.Add("[[rule]]\n[rule.limts]\nx = 1\n[[rule]]\nname = 3\nuser_may_override = [\"checkpoint.interval\"]\n")
	f.Add("[site]\npartitions = [\"a\"]\n[[rule]]\nname='x'\nexcept.user='*'\nmatch.user=['a']\n")
	f.Add("a = \"\"\"\n[[rule]]\n\"\"\"\nb = { c = [1, {d = 2}] }\n")
	f.Fuzz(func(t *testing.T, src string) {
		if len(src) > 4096 {
			return
		}
		const name = "fuzz.toml"
		_ = keyLines(src)
		p, problems := Compile(File{Name: name, Data: []byte(src)})
		for _, pr := range problems {
			if pr.File != name || !strings.HasPrefix(pr.Error(), name) {
				t.Fatalf("problem does not name its file: %v", pr)
			}
		}
		if p == nil {
			return
		}
		x := p.Explain(Request{User: "alice", Groups: []string{"users"}, Partition: "a", Image: "rocky9", Nodes: 2, CPUs: 8, MemPerNode: 1 << 30,
			CheckpointInterval: OptDuration{Set: true, Value: Duration(time.Hour)}, Migration: WishNo})
		for _, err := range x.Refusals {
			if !strings.HasPrefix(err.Error(), "hpcvm: ") {
				t.Fatalf("refusal not addressed to the user: %v", err)
			}
		}
		if _, err := json.Marshal(x.Effective); err != nil {
			t.Fatalf("effective settings do not marshal: %v", err)
		}
	})
}

package policies

import (
	"errors"
	"testing"
)

// The shipped examples must load cleanly and decide as their comments say.
func TestExamples(t *testing.T) {
	tests := []struct {
		name, path string
		req        Request
		refusedBy  string // "" when admitted
		check      func(t *testing.T, e *Effective)
	}{
		{"small: batch job", "../examples/policies/small-site.toml",
			Request{User: "alice", Account: "chem", Partition: "batch", QOS: "normal", Image: "rocky9", Nodes: 4, MemPerNode: 32 << 30}, "",
			func(t *testing.T, e *Effective) {
				if e.Checkpoint.Interval.String() != "1h" || e.Checkpoint.Dir != "/scratch/hpcvm-ckpt/alice/%j" {
					t.Errorf("checkpoint = %+v", e.Checkpoint)
				}
			}},
		{"small: gpu needs a cuda image", "../examples/policies/small-site.toml",
			Request{User: "alice", Partition: "gpu", Image: "rocky9", MemPerNode: 32 << 30}, "gpu", nil},
		{"small: debug may skip the walltime checkpoint", "../examples/policies/small-site.toml",
			Request{User: "alice", Partition: "batch", QOS: "debug", Image: "rocky9", CheckpointAtWalltime: WalltimeCheckpoint{Wish: WishNo}}, "",
			func(t *testing.T, e *Effective) {
				if e.Checkpoint.Enabled() {
					t.Errorf("checkpoint = %+v, want none", e.Checkpoint)
				}
			}},
		{"large: climate may stretch the interval", "../examples/policies/large-site",
			Request{User: "carol", Account: "climate", Partition: "cpu", QOS: "long", Image: "site/rocky9", Nodes: 256, CPUsPerNode: 64, MemPerNode: 200 << 30,
				CheckpointInterval: OptDuration{Set: true, Value: dur("3h")}}, "",
			func(t *testing.T, e *Effective) {
				if e.Checkpoint.Interval.String() != "3h" || e.Checkpoint.Keep != 3 {
					t.Errorf("checkpoint = %+v", e.Checkpoint)
				}
			}},
		{"large: hardware caps beat grants", "../examples/policies/large-site",
			Request{User: "carol", Account: "climate", Partition: "gpu", Image: "site/rocky9-cuda12", Nodes: 64, MemPerNode: 64 << 30}, "gpu-nodes", nil},
		{"large: centos7 never runs", "../examples/policies/large-site",
			Request{User: "dave", Account: "bio-x", Partition: "cpu", Image: "site/centos7"}, "defaults", nil},
		{"large: urgent jobs migrate but never pause", "../examples/policies/large-site",
			Request{User: "erin", Account: "meteo", Partition: "cpu", QOS: "urgent", Image: "site/rocky9"}, "",
			func(t *testing.T, e *Effective) {
				if e.Checkpoint.Enabled() || !e.Migration.Enabled || e.Migration.SpareNodes != 2 {
					t.Errorf("checkpoint %+v, migration %+v", e.Checkpoint, e.Migration)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files, err := ReadFiles(tt.path)
			if err != nil {
				t.Fatal(err)
			}
			p, problems := Compile(files...)
			if len(problems) > 0 {
				t.Fatalf("example has problems: %v", problems)
			}
			e, err := p.Admit(tt.req)
			if tt.refusedBy == "" {
				if err != nil {
					t.Fatalf("Admit: %v", err)
				}
				tt.check(t, e)
				return
			}
			var re *RefusedError
			if !errors.As(err, &re) || re.By.Rule != tt.refusedBy {
				t.Errorf("Admit error = %v; want a refusal by %q", err, tt.refusedBy)
			}
		})
	}
}

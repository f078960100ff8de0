package policies

import (
	"errors"
	"strings"
	"testing"
)

func TestCompileProblems(t *testing.T) {
	tests := []struct {
		name string
		src  string
		// Expected problem: line, rule, key, message fragment, severity.
		line int
		rule string
		key  string
		msg  string
		sev  Severity
	}{
		{"syntax", "[defaults]\nlimits.max_nodes = = 1\n", 2, "", "defaults.limits.max_nodes", "TOML syntax", SevError},
		{"unknown site key", "[site]\npartitions = [\"cpu\"]\ncolour = 1\n", 3, "", "site.colour", `unknown key "colour"`, SevError},
		{"unknown top key", "[sites]\npartitions = [\"cpu\"]\n", 1, "", "sites", `did you mean "site"`, SevError},
		{"unknown table with hint", "[[rule]]\nname = \"a\"\n[rule.limts]\nmax_nodes = 1\n", 3, "a", "limts", `did you mean "limits"`, SevError},
		{"unknown dotted leaf", "[[rule]]\nname = \"a\"\nlimits.max_node = 4\n", 3, "a", "limits.max_node", `did you mean "max_nodes"`, SevError},
		{"key case", "[defaults]\nlimits.Max_Nodes = 4\n", 2, "defaults", "limits.Max_Nodes", `unknown key "Max_Nodes"`, SevError},
		{"int as string", "[[rule]]\nname = \"a\"\n[rule.limits]\nmax_nodes = \"4\"\n", 4, "a", "limits.max_nodes", `want an integer, got string "4"`, SevError},
		{"ambiguous size", "[defaults]\n[defaults.limits]\nmax_mem_per_node = \"32GB\"\n", 3, "defaults", "limits.max_mem_per_node", "ambiguous", SevError},
		{"bare size", "[defaults]\nlimits.max_mem_per_node = 32\n", 2, "defaults", "limits.max_mem_per_node", `want a size in quotes`, SevError},
		{"bad duration", "[defaults]\ncheckpoint.interval = \"1.5h\"\n", 2, "defaults", "checkpoint.interval", `duration "1.5h"`, SevError},
		{"min above interval", "[defaults]\n[defaults.checkpoint]\ninterval = \"5m\"\nmin_interval = \"10m\"\n", 3, "defaults", "checkpoint.interval", "below checkpoint.min_interval = 10m", SevError},
		{"default above max", "[[rule]]\nname = \"r\"\nlimits = { max_cpus_per_node = 8, default_cpus_per_node = 16 }\n", 3, "r", "limits.default_cpus_per_node", "16 is above limits.max_cpus_per_node = 8", SevError},
		{"keep zero", "[defaults]\n\n\ncheckpoint.keep = 0\n", 4, "defaults", "checkpoint.keep", "at least 1", SevError},
		{"risk", "[defaults]\nmigration.risk_threshold = 1.5\n", 2, "defaults", "migration.risk_threshold", "probability", SevError},
		{"no name", "[[rule]]\nmatch.user = \"bob\"\n", 1, "#1", "name", "missing", SevError},
		{"reserved name", "[[rule]]\nname = \"defaults\"\n", 2, "defaults", "name", "reserved", SevError},
		{"override limit", "[defaults]\nuser_may_override = [\"limits.max_nodes\"]\n", 2, "defaults", "user_may_override", "cannot be overridden", SevError},
		{"override unknown", "[defaults]\nuser_may_override = [\"checkpoint.intervl\"]\n", 2, "defaults", "user_may_override", "unknown setting", SevError},
		{"relative dir", "[defaults]\ncheckpoint.dir = \"ckpt/%u\"\n", 2, "defaults", "checkpoint.dir", "absolute", SevError},
		{"dir escape", "[defaults]\ncheckpoint.dir = \"/ckpt/%x\"\n", 2, "defaults", "checkpoint.dir", `unknown escape "%x"`, SevError},
		{"memory high above max", "[defaults]\ncgroup.memory_max = \"1GiB\"\ncgroup.memory_high = \"2GiB\"\n", 3, "defaults", "cgroup.memory_high", "above cgroup.memory_max", SevError},
		{"cpu weight", "[defaults]\ncgroup.cpu_weight = 0\n", 2, "defaults", "cgroup.cpu_weight", "between 1 and 10000", SevError},
		{"predictors empty", "[defaults]\nmigration = { enabled = true, predictors = [] }\n", 2, "defaults", "migration.predictors", "nothing would trigger", SevError},
		{"bad glob", "[[rule]]\nname = \"g\"\nmatch.user = [\"al ice\"]\n", 3, "g", "match.user", "space", SevError},
		{"table expected", "[[rule]]\nname = \"t\"\nimages = 3\n", 3, "", "rule.images", "want a table, got integer", SevError},
		{"element type", "[defaults]\nimages.allow = [\"a\", 2]\n", 2, "defaults", "images.allow", "element 2: want a string, got integer 2", SevError},
		{"empty matcher", "[[rule]]\nname = \"e\"\nmatch.partition = []\n", 3, "e", "match.partition", "never match", SevWarning},
		{"match excluded", "[[rule]]\nname = \"x\"\n[rule.match]\nuser = [\"alice\", \"al*\"]\n[rule.except]\nuser = \"a*\"\n", 6, "x", "except.user", "never match", SevWarning},
		{"unknown partition", "[site]\npartitions = [\"cpu\", \"gpu\"]\n[[rule]]\nname = \"p\"\nmatch.partition = \"bigmem*\"\n", 5, "p", "match.partition", "matches no partition listed in site.partitions", SevWarning},
		{"allow all denied", "[[rule]]\nname = \"i\"\nimages.allow = [\"rocky9-*\", \"rocky8\"]\nimages.deny = [\"rocky*\"]\n", 3, "i", "images.allow", "every allowed image is denied", SevWarning},
		{"empty allow", "[defaults]\nimages.allow = []\n", 2, "defaults", "images.allow", "no image can run", SevWarning},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const file = "/etc/hpcvm/policy.d/10-test.toml"
			_, problems := Compile(File{Name: file, Data: []byte(tt.src)})
			var found *Problem
			for _, p := range problems {
				if strings.Contains(p.Msg, tt.msg) {
					found = p
					break
				}
			}
			if found == nil {
				t.Fatalf("no problem mentioning %q; got %v", tt.msg, problems)
			}
			if found.File != file || found.Line != tt.line || found.Rule != tt.rule || found.Key != tt.key || found.Severity != tt.sev {
				t.Errorf("problem = %+v; want line %d rule %q key %q severity %v", *found, tt.line, tt.rule, tt.key, tt.sev)
			}
			// The rendered message must name the file (with line) and key.
			if tt.key == "" {
				t.Fatal("every case must expect a key")
			}
			s := found.Error()
			if !strings.Contains(s, file+":") || !strings.Contains(s, tt.key) {
				t.Errorf("message %q does not name file and key %q", s, tt.key)
			}
		})
	}
}

func TestCompileCrossFile(t *testing.T) {
	site := File{Name: "00-site.toml", Data: []byte("[defaults]\nimages.deny = [\"*-debug\"]\n[[rule]]\nname = \"gpu\"\nmatch.partition = \"gpu\"\n")}
	tests := []struct {
		name string
		file File
		line int
		key  string
		msg  string
		sev  Severity
	}{
		{"duplicate name", File{"20-more.toml", []byte("\n[[rule]]\nname = \"gpu\"\n")}, 3, "name", "duplicate rule name; also used at 00-site.toml:3", SevError},
		{"denied by global rule", File{"20-more.toml", []byte("[[rule]]\nname = \"dbg\"\nimages.allow = \"rocky-debug\"\n")}, 3, "images.allow", `denied (images.deny of rule "defaults" (00-site.toml:2))`, SevWarning},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, problems := Compile(site, tt.file)
			if len(problems) != 1 {
				t.Fatalf("got %d problems, want 1: %v", len(problems), problems)
			}
			p := problems[0]
			if p.File != tt.file.Name || p.Line != tt.line || p.Key != tt.key || p.Severity != tt.sev || !strings.Contains(p.Msg, tt.msg) {
				t.Errorf("problem = %+v; want %s:%d key %q %q (%v)", *p, tt.file.Name, tt.line, tt.key, tt.msg, tt.sev)
			}
		})
	}
}

func TestParseErrorsAreTyped(t *testing.T) {
	_, err := Parse(File{Name: "a.toml", Data: []byte("[defaults]\nlimits.max_nodes = -1\ncheckpoint.keep = 0\n")})
	var le *LoadError
	if !errors.As(err, &le) {
		t.Fatalf("err = %v, want *LoadError", err)
	}
	if len(le.Problems) != 2 {
		t.Fatalf("got %d problems, want 2: %v", len(le.Problems), err)
	}
	var p *Problem
	if !errors.As(err, &p) || p.Key != "limits.max_nodes" || p.Line != 2 {
		t.Errorf("errors.As(*Problem) = %+v, want limits.max_nodes at line 2", p)
	}
}

func TestWarningsDoNotStopLoading(t *testing.T) {
	p, err := Parse(File{Name: "w.toml", Data: []byte("[[rule]]\nname = \"never\"\nmatch.user = []\n")})
	if err != nil {
		t.Fatal(err)
	}
	if w := p.Warnings(); len(w) != 1 || w[0].Rule != "never" {
		t.Errorf("warnings = %v, want one about rule never", w)
	}
}

func TestKeyLines(t *testing.T) {
	src := `# comment [not a table]
title = """
[[rule]]
name = "fake"
"""
[[rule]]
name = 'first' # trailing
match = { user = ["a", "b"], "quoted key" = 1 }
list = [
  "x", # comment ]
  [1, 2],
]
[rule.limits]
max_nodes = 4
[[rule]]
a.b . c = 1
[[rule.sub]]
x = 'y'
[other]
"k.e.y" = true
`
	want := map[string]int{
		"title": 2, "rule": 15, "rule.0": 6, "rule.0.name": 7, "rule.0.match": 8,
		"rule.0.match.user": 8, "rule.0.match.quoted key": 8, "rule.0.list": 9,
		"rule.0.limits": 13, "rule.0.limits.max_nodes": 14, "rule.1": 15,
		"rule.1.a.b.c": 16, "rule.1.sub.0": 17, "rule.1.sub.0.x": 18, "other.k.e.y": 20,
	}
	got := keyLines(src)
	for k, line := range want {
		if got[k] != line {
			t.Errorf("line of %q = %d, want %d", k, got[k], line)
		}
	}
	if _, ok := got["rule.2"]; ok {
		t.Errorf("a [[rule]] inside a multi-line string was counted: %v", got)
	}
}

package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hpcvm/hpcvm/policies"
)

// writePolicy lays out a policy directory and returns its path.
func writePolicy(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, src := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

const sitePolicy = `[defaults]
images.allow = ["rocky9*"]
limits = { max_mem_per_node = "64GiB", default_mem_per_node = "4GiB" }
checkpoint = { interval = "1h", dir = "/ckpt/%u/%j" }

[[rule]]
name = "gpu-partition"
match.partition = "gpu"
limits.max_mem_per_node = "32GiB"
`

func TestPolicyCLI(t *testing.T) {
	good := writePolicy(t, map[string]string{"10-site.toml": sitePolicy})
	bad := writePolicy(t, map[string]string{
		"10-a.toml": "[defaults]\nlimits.max_nodes = \"4\"\n",
		"20-b.toml": "[[rule]]\nname = \"x\"\nmatch.user = []\nimages.alow = [\"*\"]\n",
	})
	tests := []struct {
		name     string
		args     []string
		stdin    string
		code     int
		stdout   []string // fragments expected on stdout
		stderr   []string // fragments expected on stderr
		noStdout bool
	}{
		{name: "check ok", args: []string{"check", good}, code: 0, stdout: []string{"ok: 1 file(s), 2 rule(s)"}},
		{name: "check problems", args: []string{"check", bad}, code: 1,
			stdout: []string{
				filepath.Join(bad, "10-a.toml") + `:2: rule "defaults": limits.max_nodes: want an integer, got string "4"`,
				filepath.Join(bad, "20-b.toml") + `:3: warning: rule "x": match.user: empty list`,
				filepath.Join(bad, "20-b.toml") + `:4: rule "x": images.alow: unknown key "alow" (did you mean "allow"?)`,
			},
			stderr: []string{"2 error(s), 1 warning(s) in 2 file(s)"}},
		{name: "check missing", args: []string{"check", "/nonexistent/policy.d"}, code: 2, stderr: []string{"no such file"}},
		{name: "admit flags", args: []string{"admit", "--policy-dir", good, "--user", "bob", "--image", "rocky9", "--mem", "16G"}, code: 0,
			stdout: []string{"hpcvm: admitted: image rocky9", "16GiB per node", "checkpoint every 1h"}},
		{name: "admit refused", args: []string{"admit", "--policy-dir", good, "--user", "bob", "--partition", "gpu", "--image", "rocky9", "--mem", "64GiB"}, code: 1,
			stderr:   []string{`hpcvm: request refused by rule "gpu-partition" (` + filepath.Join(good, "10-site.toml") + `:9): --vm-mem=64GiB exceeds limits.max_mem_per_node = 32GiB`},
			noStdout: true},
		{name: "admit json stdin", args: []string{"admit", "--policy-dir", good, "--json"},
			stdin: `{"user":"bob","image":"rocky9","job_id":"7","checkpoint_interval":"20m"}`, code: 0,
			stdout: []string{`"schema": 1`, `"interval_seconds": 1200`, `"dir": "/ckpt/bob/7"`, `"mem_per_node_bytes": 4294967296`}},
		{name: "admit json refused", args: []string{"admit", "--policy-dir", good, "--json"},
			stdin: `{"user":"bob","image":"rocky9","checkpoint_interval":"2h"}`, code: 1,
			stderr: []string{`--vm-checkpoint-interval=2h is longer than checkpoint.interval = 1h`}, noStdout: true},
		{name: "flags override json", args: []string{"admit", "--policy-dir", good, "--request", "-", "--image", "rocky9-cuda"},
			stdin: `{"user":"bob","image":"centos7"}`, code: 0, stdout: []string{"image rocky9-cuda"}},
		{name: "unknown json field", args: []string{"admit", "--policy-dir", good}, stdin: `{"user":"bob","mem":"1G"}`, code: 2,
			stderr: []string{`unknown field "mem"`}},
		{name: "bad size flag", args: []string{"admit", "--policy-dir", good, "--user", "bob", "--image", "rocky9", "--mem", "16GB"}, code: 2,
			stderr: []string{"--mem", "ambiguous"}},
		{name: "broken policy", args: []string{"admit", "--policy-dir", bad, "--user", "bob", "--image", "rocky9"}, code: 2,
			stderr: []string{"please tell your administrators", "10-a.toml:2"}},
		{name: "explain", args: []string{"explain", "--policy-dir", good, "--user", "bob", "--partition", "gpu", "--image", "rocky9", "--checkpoint-interval", "30m"}, code: 0,
			stdout: []string{`rule "gpu-partition"`, "checkpoint.interval", "30m", "your request", "limits.max_mem_per_node = 32GiB", "result: admitted"}},
		{name: "explain refused", args: []string{"explain", "--policy-dir", good, "--user", "bob", "--image", "centos7"}, code: 1,
			stdout: []string{"result: REFUSED", "images.allow"}},
		{name: "explain json", args: []string{"explain", "--policy-dir", good, "--user", "bob", "--image", "rocky9", "--json"}, code: 0,
			stdout: []string{`"admitted": true`, `"effective": {`}},
		{name: "unknown subcommand", args: []string{"apply"}, code: 2, stderr: []string{`unknown subcommand "apply"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := runPolicy(tt.args, strings.NewReader(tt.stdin), &out, &errOut)
			if code != tt.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tt.code, out.String(), errOut.String())
			}
			for _, s := range tt.stdout {
				if !strings.Contains(out.String(), s) {
					t.Errorf("stdout lacks %q:\n%s", s, out.String())
				}
			}
			for _, s := range tt.stderr {
				if !strings.Contains(errOut.String(), s) {
					t.Errorf("stderr lacks %q:\n%s", s, errOut.String())
				}
			}
			if tt.noStdout && out.Len() > 0 {
				t.Errorf("stdout should be empty, got:\n%s", out.String())
			}
		})
	}
}

// TestAdmitJSONIsConsumable checks that what admit --json prints decodes
// back into the launcher's Go type.
func TestAdmitJSONIsConsumable(t *testing.T) {
	dir := writePolicy(t, map[string]string{"10-site.toml": sitePolicy})
	var out, errOut bytes.Buffer
	if code := runPolicy([]string{"admit", "--policy-dir", dir, "--json", "--user", "bob", "--image", "rocky9", "--nodes", "2"}, strings.NewReader(""), &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	var eff policies.Effective
	if err := json.Unmarshal(out.Bytes(), &eff); err != nil || eff.Nodes != 2 || eff.Image != "rocky9" || eff.MemPerNode != 4<<30 {
		t.Errorf("decoded %+v, %v from %s", eff, err, out.String())
	}
}

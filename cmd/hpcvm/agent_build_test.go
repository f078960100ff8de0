package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/buildinfo"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestBuildAgentReproducible checks that buildAgent (what `hpcvm image
// build` and `make agent` do) gives the same bytes, and so the same image
// build key, across commits that leave guest/agent alone, and other bytes
// when the agent changes. It builds a copy of the agent's sources in a
// throwaway git repository.
func TestBuildAgentReproducible(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the agent 3 times")
	}
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("no git")
	}
	// VCS stamping on, as it is by default outside this environment:
	// buildAgent must turn it off itself.
	t.Setenv("GOFLAGS", "-buildvcs=true")
	root, err := findModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	repo := t.TempDir()
	if out, err := exec.Command("cp", "-r", filepath.Join(root, "guest"), filepath.Join(root, "go.mod"), filepath.Join(root, "go.sum"), repo).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	git := func(args ...string) {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"}, args...)...)
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	commitFile := func(path, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(repo, path), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		git("add", "-A")
		git("commit", "-q", "-m", "change "+path)
	}
	build := func(name string) string {
		t.Helper()
		out := filepath.Join(t.TempDir(), name)
		if err := buildAgent(context.Background(), repo, out); err != nil {
			t.Fatal(err)
		}
		var bi *buildinfo.BuildInfo
		b, err := os.ReadFile(out)
		if err == nil {
			bi, err = buildinfo.Read(bytes.NewReader(b))
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range bi.Settings {
			if strings.HasPrefix(s.Key, "vcs") {
				t.Errorf("%s: VCS stamp %s=%s", name, s.Key, s.Value)
			}
		}
		sum := sha256.Sum256(b)
		return hex.EncodeToString(sum[:])
	}
	git("init", "-q")
	commitFile("README", "one\n")
	first := build("first")
	commitFile("README", "two\n") // a commit that does not touch the agent
	if second := build("second"); second != first {
		t.Errorf("agent changed with a commit outside guest/agent: %s -> %s", first[:12], second[:12])
	}
	commitFile("guest/agent/NOTE", "x\n") // a commit to the agent: a new version label
	if third := build("third"); third == first {
		t.Error("agent bytes unchanged after a commit to guest/agent")
	}
}

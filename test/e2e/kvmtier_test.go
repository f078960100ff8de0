//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestKVMTestsInNode runs the fast tier's KVM tests (micro-guests, the
// KVM wrapper, userfaultfd, the DSM harness, slices) inside a virt node,
// where KVM is real. `make unit` runs it on a host whose /dev/kvm is
// missing or unusable, so that those tests run somewhere instead of
// skipping (docs/testing.md, "Where the KVM tests run").
//
// HPCVM_E2E_KVM_PKGS lists the packages (go list patterns, relative to the
// module root). Each is compiled here with `go test -c` and its binary run
// in the node from its package directory (the node sees the host's root),
// with -test.short: the node is emulated, so the tests that loop many
// thousand times (coherence litmus tests, TSC sampling) run a tenth of
// their rounds there, with the same checks.
// A test that skips for want of KVM or userfaultfd fails this test: in the
// node both exist, so such a skip is a bug, not a missing prerequisite.
func TestKVMTestsInNode(t *testing.T) {
	pkgs := strings.Fields(os.Getenv("HPCVM_E2E_KVM_PKGS"))
	if len(pkgs) == 0 {
		t.Skip("HPCVM_E2E_KVM_PKGS is empty: `make unit` sets it when this host has no usable /dev/kvm")
	}
	node(t) // boot the node before compiling anything
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	bins := t.TempDir()
	// vmm/boot's real-kernel test (HPCVM_TEST_BZIMAGE) is not given a
	// kernel here: nested in a node a Linux guest resets now and then, and
	// TestBoot in this package boots the same kernels with a retry for that
	// (docs/testing.md).
	for _, pkg := range pkgs {
		pkg := pkg
		name := strings.ReplaceAll(strings.Trim(filepath.Clean(pkg), "./"), "/", "_")
		t.Run(name, func(t *testing.T) {
			bin := filepath.Join(bins, name+".test")
			build := exec.Command("go", "test", "-c", "-o", bin, pkg)
			build.Dir = root
			if out, err := build.CombinedOutput(); err != nil {
				t.Fatalf("go test -c %s: %v\n%s", pkg, err, out)
			}
			if _, err := os.Stat(bin); err != nil {
				t.Skipf("%s has no tests", pkg)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
			defer cancel()
			// One rerun after a failure: nested in an emulated node, KVM
			// guests now and then die for the node's own reasons (docs/testing.md,
			// "Pitfalls"). The first failure is logged in full; a package that
			// fails twice fails the test.
			var out string
			for attempt := 1; ; attempt++ {
				r := node(t) // restarted if a failure left it dead or hung
				start := time.Now()
				res, err := r.Node.Run(ctx, fmt.Sprintf("cd %s && %s -test.v -test.short -test.count=1 -test.timeout 25m 2>&1",
					filepath.Join(root, pkg), bin))
				took := time.Since(start).Round(time.Second)
				out = res.Stdout + res.Stderr
				if err == nil && res.ExitCode == 0 {
					t.Logf("%s in the node: attempt %d passed in %v", pkg, attempt, took)
					break
				}
				if crash := r.Node.KernelCrashContext(50); crash != "" {
					t.Logf("the node's kernel crashed under %s:\n%s", pkg, crash)
				}
				msg := fmt.Sprintf("%s in the node, attempt %d: exit %d, err %v after %v; failures:\n%s\noutput tail:\n%s",
					pkg, attempt, res.ExitCode, err, took, failures(out), tail(out, 30))
				if attempt == 2 {
					t.Fatal(msg)
				}
				t.Logf("%s; running it again", msg)
			}
			pass, skips := summarize(out)
			t.Logf("%s in the node: %d tests passed", pkg, pass)
			if pass == 0 {
				t.Errorf("%s: no test passed in the node; output tail:\n%s", pkg, tail(out, 40))
			}
			for _, s := range skips {
				if kvmSkip.MatchString(s) {
					t.Errorf("%s skipped in the node, where KVM and userfaultfd exist: %s", pkg, s)
				} else {
					t.Logf("%s: skipped (not for want of KVM): %s", pkg, s)
				}
			}
		})
	}
}

// kvmSkip matches skip reasons that mean "no KVM here" or "no userfaultfd".
var kvmSkip = regexp.MustCompile(`(?i)/dev/kvm|kvm unusable|userfaultfd|needs a usable`)

// summarize counts passed tests (subtests included) and returns each skip
// with its reason: `go test -v` streams a test's log, so the reason
// ("    file_test.go:12: needs /dev/kvm") comes just before its
// "--- SKIP: Name (0.00s)" line.
func summarize(out string) (pass int, skips []string) {
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "--- PASS:"):
			pass++
		case strings.HasPrefix(l, "--- SKIP:"):
			s := l
			if i > 0 && !strings.HasPrefix(strings.TrimSpace(lines[i-1]), "=== ") {
				s += ": " + strings.TrimSpace(lines[i-1])
			}
			skips = append(skips, s)
		}
	}
	return pass, skips
}

// failures returns each "--- FAIL" line of a test binary's -v output
// with the log lines its test printed before it.
func failures(out string) string {
	lines := strings.Split(out, "\n")
	var b strings.Builder
	for i, l := range lines {
		if strings.Contains(l, "--- FAIL") {
			for j := max(0, i-15); j <= i; j++ {
				b.WriteString(lines[j] + "\n")
			}
		}
	}
	return b.String()
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

package lab

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// RepoRoot is the module root (this file is test/lab/testing.go).
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// SpankSO is the built plugin: $HPCVM_SPANK_SO, else bin/hpcvm_spank.so.
func SpankSO() string {
	if p := os.Getenv("HPCVM_SPANK_SO"); p != "" {
		return p
	}
	return filepath.Join(RepoRoot(), "bin", "hpcvm_spank.so")
}

// HpcvmBin is the hpcvm binary: $HPCVM_BIN, else bin/hpcvm.
func HpcvmBin() string {
	if p := os.Getenv("HPCVM_BIN"); p != "" {
		return p
	}
	return filepath.Join(RepoRoot(), "bin", "hpcvm")
}

// Require skips the test when reason is non-empty, or fails it when
// HPCVM_E2E_REQUIRE=1 (make e2e, CI), so the tier cannot pass by skipping.
func Require(t testing.TB, reason string) {
	t.Helper()
	if reason == "" {
		return
	}
	if os.Getenv("HPCVM_E2E_REQUIRE") == "1" {
		t.Fatalf("prerequisite missing (HPCVM_E2E_REQUIRE=1): %s", reason)
	}
	t.Skipf("skipping: %s", reason)
}

// RequireHost checks the prerequisites of a HostCluster with the plugin.
func RequireHost(t testing.TB) {
	t.Helper()
	if err := Prerequisites(); err != nil {
		Require(t, err.Error())
	}
	if _, err := os.Stat(SpankSO()); err != nil {
		Require(t, "the SPANK plugin is not built (make spank): "+err.Error())
	}
}

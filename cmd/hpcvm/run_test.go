package main

import (
	"strings"
	"testing"
)

// Bad --boot-timeout values are refused before anything boots, in one line
// naming the flag. The store does not exist: the flag must be checked first.
func TestRunRejectsBadBootTimeout(t *testing.T) {
	store := t.TempDir() + "/no-store"
	for _, v := range []string{"1.5h", "10", "-5m", "5ms", "soon", "0", ""} {
		t.Run(v, func(t *testing.T) {
			code, stderr := runHPCVM(t, "run", "--store", store, "--boot-timeout", v, "--", "true")
			if code == 0 {
				t.Fatalf("exit 0, want an error; stderr %q", stderr)
			}
			if !strings.Contains(stderr, "--boot-timeout") {
				t.Errorf("stderr %q does not name --boot-timeout", stderr)
			}
			if lines := strings.Count(strings.TrimSpace(stderr), "\n"); lines > 0 {
				t.Errorf("error is %d lines, want one:\n%s", lines+1, stderr)
			}
		})
	}
}

func TestRunHelp(t *testing.T) {
	code, stderr := runHPCVM(t, "run", "--help")
	if code != 0 || !strings.Contains(stderr, "--boot-timeout DURATION") || !strings.Contains(stderr, "(default \"10m\")") {
		t.Fatalf("exit %d, help %q", code, stderr)
	}
}

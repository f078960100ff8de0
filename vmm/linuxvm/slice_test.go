package linuxvm

import (
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/kvm"
)

func TestCheckBootPlacement(t *testing.T) {
	for _, p := range [][][]int{{{0}}, {{0, 1}, {2}}, {{1, 0}, {}}} {
		if err := CheckBootPlacement(p); err != nil {
			t.Errorf("%v: %v", p, err)
		}
	}
	for _, p := range [][][]int{nil, {{1}, {0}}, {{}, {0}}} {
		err := CheckBootPlacement(p)
		if err == nil || !strings.Contains(err.Error(), "vCPU 0") {
			t.Errorf("%v: err = %v, want one naming vCPU 0", p, err)
		}
	}
}

func TestWithTSCFrequencyKeepsTheUsersValue(t *testing.T) {
	for _, c := range []string{"console=ttyS0 tsc_early_khz=1000", "tsc_early_khz=5 quiet"} {
		got, err := withTSCFrequency(c)
		if err != nil || got != c {
			t.Errorf("withTSCFrequency(%q) = %q, %v; want it unchanged", c, got, err)
		}
	}
}

func TestWithTSCFrequencyAppendsKVMsRate(t *testing.T) {
	if _, err := os.Stat(kvm.DevicePath); err != nil {
		t.Skipf("needs %s: %v", kvm.DevicePath, err)
	}
	got, err := withTSCFrequency("console=ttyS0")
	if errors.Is(err, kvm.ErrUnavailable) {
		t.Skipf("KVM unusable here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^console=ttyS0 tsc_early_khz=[1-9][0-9]*$`).MatchString(got) {
		t.Fatalf("got %q, want the command line plus tsc_early_khz=<KVM's TSC kHz>", got)
	}
}

func TestWithSpreadSettings(t *testing.T) {
	if got := withSpreadSettings("console=ttyS0"); got != "console=ttyS0 pty.legacy_count=0" {
		t.Errorf("withSpreadSettings appended %q", got)
	}
	// The user's value wins.
	if got := withSpreadSettings("pty.legacy_count=4 quiet"); got != "pty.legacy_count=4 quiet" {
		t.Errorf("withSpreadSettings(user's value) = %q, want it unchanged", got)
	}
}

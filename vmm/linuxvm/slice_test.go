package linuxvm

import (
	"errors"
	"fmt"
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
	for _, c := range []struct {
		cmdline        string
		homeCPUs, cpus int
		want           string
	}{
		{"console=ttyS0", 2, 2, "console=ttyS0 pty.legacy_count=0"},
		// vCPUs on other slices: boot on the home slice's only.
		{"console=ttyS0", 1, 3, "console=ttyS0 pty.legacy_count=0 maxcpus=1"},
		// The user's values win.
		{"pty.legacy_count=4 quiet", 2, 2, "pty.legacy_count=4 quiet"},
		{"maxcpus=3 quiet", 1, 3, "maxcpus=3 quiet pty.legacy_count=0"},
	} {
		if got := withSpreadSettings(c.cmdline, c.homeCPUs, c.cpus); got != c.want {
			t.Errorf("withSpreadSettings(%q, %d, %d) = %q, want %q", c.cmdline, c.homeCPUs, c.cpus, got, c.want)
		}
	}
}

func TestNUMABySlice(t *testing.T) {
	for _, c := range []struct {
		placement [][]int
		want      string
	}{
		{[][]int{{0, 1}}, "[]"},
		{[][]int{{0}, {}}, "[]"}, // one slice runs every vCPU
		{[][]int{{0, 2}, {1}}, "[[0 2] [1]]"},
		{[][]int{{0}, {}, {1, 2}}, "[[0] [1 2]]"}, // a slice without vCPUs is no node
	} {
		if got := fmt.Sprint(numaBySlice(c.placement)); got != c.want {
			t.Errorf("numaBySlice(%v) = %s, want %s", c.placement, got, c.want)
		}
	}
}

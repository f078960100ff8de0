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
		cmdline   string
		placement [][]int
		want      string
	}{
		{"console=ttyS0", [][]int{{0, 1}}, "console=ttyS0 pty.legacy_count=0 rcupdate.rcu_cpu_stall_timeout=300 tsc=reliable"},
		{"console=ttyS0", [][]int{{0, 1}, {}}, "console=ttyS0 pty.legacy_count=0 rcupdate.rcu_cpu_stall_timeout=300 tsc=reliable"},
		// vCPUs on other slices: boot on the home slice's only; the others
		// run tickless when they can.
		{"console=ttyS0", [][]int{{0}, {1}, {2, 3}}, "console=ttyS0 pty.legacy_count=0 rcupdate.rcu_cpu_stall_timeout=300 tsc=reliable maxcpus=1 nohz_full=1-3"},
		{"console=ttyS0", [][]int{{0, 1}, {5, 2}, {3, 7}}, "console=ttyS0 pty.legacy_count=0 rcupdate.rcu_cpu_stall_timeout=300 tsc=reliable maxcpus=2 nohz_full=2-3,5,7"},
		// The home slice's vCPUs are not 0..k-1: maxcpus cannot say so.
		{"console=ttyS0", [][]int{{0, 2}, {1}}, "console=ttyS0 pty.legacy_count=0 rcupdate.rcu_cpu_stall_timeout=300 tsc=reliable nohz_full=1"},
		// The user's values win.
		{"pty.legacy_count=4 rcupdate.rcu_cpu_stall_timeout=60 tsc=unstable quiet", [][]int{{0, 1}}, "pty.legacy_count=4 rcupdate.rcu_cpu_stall_timeout=60 tsc=unstable quiet"},
		{"maxcpus=3 nohz_full=2 quiet", [][]int{{0}, {1, 2}}, "maxcpus=3 nohz_full=2 quiet pty.legacy_count=0 rcupdate.rcu_cpu_stall_timeout=300 tsc=reliable"},
	} {
		if got := withSpreadSettings(c.cmdline, c.placement); got != c.want {
			t.Errorf("withSpreadSettings(%q, %v) = %q, want %q", c.cmdline, c.placement, got, c.want)
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

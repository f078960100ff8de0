package launcher

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestCgroupStartLimitDestroy creates a VMM cgroup below this process's
// own (v2, or v1/hybrid: whatever this host has), starts a process inside
// it, checks the memory limit, and destroys it with the process.
func TestCgroupStartLimitDestroy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating cgroups needs root")
	}
	name := fmt.Sprintf("hpcvm-test-%d", os.Getpid())
	cg, err := NewCgroup(name, CgroupLimits{MemoryMax: 256 << 20, PidsMax: 64, CPUWeight: 100})
	if err != nil {
		t.Fatalf("NewCgroup: %v", err)
	}
	defer cg.Destroy()
	cmd := exec.Command("sleep", "600")
	if err := cg.Start(cmd); err != nil {
		t.Fatalf("Start: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
	if err != nil || !strings.Contains(string(b), "/"+name) {
		t.Fatalf("process not in %s: %s %v", name, b, err)
	}
	if self, _ := os.ReadFile("/proc/self/cgroup"); strings.Contains(string(self), name) {
		t.Errorf("the caller stayed in the VMM cgroup: %s", self)
	}
	limitFile := cg.Path() + "/memory.max"
	if _, err := os.Stat(limitFile); err != nil {
		limitFile = cg.Path() + "/memory.limit_in_bytes"
	}
	if l, err := os.ReadFile(limitFile); err != nil || strings.TrimSpace(string(l)) != fmt.Sprint(256<<20) {
		t.Errorf("%s = %q, %v", limitFile, l, err)
	}
	start := time.Now()
	if err := cg.Destroy(); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	t.Logf("Destroy took %v", time.Since(start))
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("the process in the cgroup survived Destroy")
	}
	if _, err := os.Stat(cg.Path()); err == nil {
		t.Errorf("%s still exists", cg.Path())
	}
}

func TestCgroupNameMustBeOneElement(t *testing.T) {
	for _, n := range []string{"", "a/b", "..", "."} {
		if _, err := NewCgroup(n, CgroupLimits{}); err == nil {
			t.Errorf("NewCgroup(%q) accepted", n)
		}
	}
}

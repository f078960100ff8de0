package images

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRealBuild builds images/debian12.toml with debootstrap from the
// network (minutes, ~200 MB). It runs only with HPCVM_IMAGE_BUILD_TEST=1
// (make image-test); HPCVM_IMAGE_TEST_STORE keeps the store between runs.
func TestRealBuild(t *testing.T) {
	if os.Getenv("HPCVM_IMAGE_BUILD_TEST") != "1" {
		t.Skip("real debootstrap build: set HPCVM_IMAGE_BUILD_TEST=1 (needs root, debootstrap and Debian's mirror)")
	}
	if os.Getuid() != 0 {
		t.Skip("real build needs root (debootstrap, chroot, mounts)")
	}
	for _, tool := range []string{"debootstrap", "mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("real build needs %s: %v", tool, err)
		}
	}
	storeDir := os.Getenv("HPCVM_IMAGE_TEST_STORE")
	if storeDir == "" {
		storeDir = t.TempDir()
	}
	s, err := OpenStore(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	agent := os.Getenv("HPCVM_AGENT")
	if agent == "" {
		agent = filepath.Join(t.TempDir(), "hpcvm-agent")
		cmd := exec.Command("go", "build", "-o", agent, "../guest/agent")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building the agent: %v\n%s", err, out)
		}
	}
	def, err := ParseFile("debian12.toml")
	if err != nil {
		t.Fatal(err)
	}
	cache := ""
	if c := os.Getenv("HPCVM_CACHE"); c != "" {
		cache = filepath.Join(c, "images")
	}
	b := &Builder{Store: s, Agent: agent, CacheDir: cache, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	m, cached, err := b.Build(ctx, def, BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built (cached=%v) kernel %s in %.0fs", cached, m.KernelVersion, m.BuildSeconds)
	if _, err := s.Verify(ctx, def.Name); err != nil {
		t.Fatal(err)
	}
	// The kernel is a bzImage ("HdrS" at 0x202).
	k, err := os.ReadFile(s.Path(def.Name, KernelFile))
	if err != nil || len(k) < 0x206 || string(k[0x202:0x206]) != "HdrS" {
		t.Fatalf("vmlinuz is not a bzImage: %v", err)
	}
	// The disk holds the agent, its enabled unit and an empty machine-id.
	disk := s.Path(def.Name, DiskFile)
	checks := map[string]string{
		"stat " + AgentPath: "Mode:  0755",
		"stat /etc/systemd/system/sysinit.target.wants/hpcvm-agent.service": "Type: symlink",
		"cat /etc/fstab":                              "/dev/vda",
		"cat /etc/initramfs-tools/modules":            "vmw_vsock_virtio_transport",
		"cat /etc/systemd/system/hpcvm-agent.service": "--port 1024",
	}
	for req, want := range checks {
		out, err := exec.Command("debugfs", "-R", req, disk).CombinedOutput()
		if err != nil || !bytes.Contains(out, []byte(want)) {
			t.Errorf("debugfs %q: %v; output lacks %q:\n%s", req, err, want, out)
		}
	}
	out, _ := exec.Command("debugfs", "-R", "ls /usr/sbin/policy-rc.d", disk).CombinedOutput()
	if !strings.Contains(string(out), "not found") {
		t.Errorf("policy-rc.d left in the image: %s", out)
	}
}

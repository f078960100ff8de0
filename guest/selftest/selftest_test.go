package selftest

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A boot under TCG on a busy 2-core machine can take a minute or more.
func bootTimeout() time.Duration {
	if s := os.Getenv("HPCVM_GUEST_SELFTEST_TIMEOUT"); s != "" {
		if d, err := time.ParseDuration(s); err == nil {
			return d
		}
	}
	return 5 * time.Minute
}

func cacheDir() string {
	if d := os.Getenv("HPCVM_CACHE"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "hpcvm")
}

func need(t *testing.T, files ...string) {
	t.Helper()
	if os.Getenv("HPCVM_GUEST_SELFTEST") != "1" {
		t.Skip("guest boot self-check: set HPCVM_GUEST_SELFTEST=1 (make guest-selftest builds the artifacts and does)")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 not installed (apt-get install e2fsprogs)")
	}
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("artifact missing (run make guest): %v", err)
		}
	}
}

// tscKHz gives the guest the TSC frequency: TCG's TSC runs at the host's
// rate, and PIT calibration under TCG on a loaded host fails or takes minutes.
func tscKHz() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "cpu MHz" {
			if mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
				return fmt.Sprintf(" tsc_early_khz=%d", int(mhz*1000))
			}
		}
	}
	return ""
}

// mkdisk makes an ext4 image holding /test.sh.
func mkdisk(t *testing.T, script string) string {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	os.MkdirAll(root, 0o755)
	if err := os.WriteFile(filepath.Join(root, "test.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img, 32<<20)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return img
}

type boot struct {
	kernel, initrd, disk, cmdline string
	smp                           int
}

// run boots under QEMU TCG microvm and returns the console and the wall time.
// QEMU must exit by itself (the guest powers off); a timeout fails the test.
func run(t *testing.T, b boot) (string, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout())
	defer cancel()
	args := []string{
		"-accel", "tcg", "-M", "microvm", "-m", "256", "-smp", strconv.Itoa(b.smp),
		"-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
		"-kernel", b.kernel, "-initrd", b.initrd,
		"-append", "console=ttyS0 panic=-1" + tscKHz() + " " + b.cmdline,
	}
	if b.disk != "" {
		args = append(args, "-drive", "id=d,file="+b.disk+",format=raw,if=none",
			"-device", "virtio-blk-device,drive=d")
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(start)
	console := string(out)
	logf := filepath.Join(t.TempDir(), "console.log")
	os.WriteFile(logf, out, 0o644)
	if ctx.Err() != nil {
		t.Fatalf("guest did not power off within %v; console:\n%s", bootTimeout(), tail(console, 60))
	}
	if err != nil {
		t.Fatalf("qemu: %v; console:\n%s", err, tail(console, 60))
	}
	return console, d
}

func tail(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// facts parses the key=value words of the "HPCVM ..." console lines.
func facts(console string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(console, "\n") {
		l = strings.TrimRight(l, "\r")
		if rest, ok := strings.CutPrefix(l, "HPCVM "); ok {
			for _, w := range strings.Fields(rest) {
				if k, v, ok := strings.Cut(w, "="); ok {
					m[k] = v
				}
			}
		}
	}
	return m
}

func expect(t *testing.T, console string, want map[string]string) {
	t.Helper()
	f := facts(console)
	for k, v := range want {
		if got, ok := f[k]; !ok {
			t.Errorf("console has no HPCVM %s= line", k)
		} else if v != "*" && got != v {
			t.Errorf("HPCVM %s=%s, want %s", k, got, v)
		}
	}
	if n, err := strconv.Atoi(f["memtotal_kb"]); err != nil || n < 100000 {
		t.Errorf("HPCVM memtotal_kb=%q, want > 100000", f["memtotal_kb"])
	}
	if !strings.Contains(console, "HPCVM poweroff") || !regexp.MustCompile(`reboot: Power down`).MatchString(console) {
		t.Errorf("no ACPI power down on the console")
	}
	if t.Failed() {
		t.Logf("console:\n%s", tail(console, 80))
	}
}

const testScript = "#!/bin/sh\necho \"selftest on $(hostname)\"\n[ -f /disk/test.sh ] || exit 1\nexit 7\n"

func guestDir() string { return filepath.Join(cacheDir(), "guest") }

// The minimal kernel as a bzImage, with a disk, a test script and 2 vCPUs.
func TestMinimalBzImage(t *testing.T) {
	g := guestDir()
	kernel, initrd := filepath.Join(g, "bzImage"), filepath.Join(g, "test-initramfs.cpio.gz")
	need(t, kernel, initrd)
	console, d := run(t, boot{kernel: kernel, initrd: initrd, disk: mkdisk(t, testScript), smp: 2,
		cmdline: "hpcvm.test=/test.sh hpcvm.disk=ro hpcvm.hostname=selftest"})
	expect(t, console, map[string]string{
		"nproc": "2", "cpus_online": "0-1", "memtotal_kb": "*", "disk": "/dev/vda", "mode": "ro", "test": "/test.sh", "exit": "7", "stop": "done",
	})
	if !strings.Contains(console, "selftest on selftest") {
		t.Errorf("test script output missing")
	}
	t.Logf("bzImage: booted, ran the test and powered off in %v", d.Round(time.Millisecond))
}

// The minimal kernel's ELF through its PVH entry (how hpcvm boots it), no disk,
// hpcvm.wait ends by timeout.
func TestMinimalPVH(t *testing.T) {
	g := guestDir()
	kernel, initrd := filepath.Join(g, "vmlinux"), filepath.Join(g, "test-initramfs.cpio.gz")
	need(t, kernel, initrd)
	console, d := run(t, boot{kernel: kernel, initrd: initrd, smp: 1, cmdline: "hpcvm.wait=1"})
	expect(t, console, map[string]string{"nproc": "1", "cpus_online": "0", "disk": "none", "waiting": "1", "stop": "timeout"})
	t.Logf("vmlinux (PVH): booted, waited 1 s and powered off in %v", d.Round(time.Millisecond))
}

// Debian's cloud kernel with its initramfs: modules, virtio-blk over MMIO.
func TestCloud(t *testing.T) {
	g := filepath.Join(guestDir(), "cloud")
	kernel, initrd := filepath.Join(g, "vmlinuz"), filepath.Join(g, "initramfs.cpio.gz")
	need(t, kernel, initrd)
	console, d := run(t, boot{kernel: kernel, initrd: initrd, disk: mkdisk(t, testScript), smp: 1,
		cmdline: "hpcvm.test=/test.sh"})
	expect(t, console, map[string]string{
		"modules": "7", "nproc": "1", "memtotal_kb": "*", "disk": "/dev/vda", "mode": "rw", "exit": "7", "stop": "done",
	})
	t.Logf("cloud kernel: booted, loaded modules, ran the test and powered off in %v", d.Round(time.Millisecond))
}

//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/test/guestvm"
	"github.com/hpcvm/hpcvm/test/virtnode"
)

type kernelCase struct {
	name           string
	kernel, initrd string
	memMiB         int
}

func kernelCases(a guestvm.Artifacts) []kernelCase {
	return []kernelCase{
		{"minimal-bzimage", a.BzImage, a.TestInitramfs, 256},
		{"minimal-pvh", a.Vmlinux, a.TestInitramfs, 256},
		{"cloud", a.CloudKernel, a.CloudInitrd, 512},
	}
}

// testDisk is an ext4 image with a random file and guest scripts.
type testDisk struct {
	path   string
	sha256 string // of /data.bin
}

// makeDisk builds the image on the host (mkfs.ext4 -d) in a temp dir; the
// node sees it at the same path through its read-only host root.
func makeDisk(t *testing.T) testDisk { return makeDiskWith(t, nil) }

// makeDiskWith is makeDisk with more files in the disk's root.
func makeDiskWith(t *testing.T, extra map[string][]byte) testDisk {
	t.Helper()
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		guestvm.Need(t, "/sbin/mkfs.ext4") // skips/fails with the reason
	}
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 1<<20+123)
	rand.Read(data)
	sum := sha256.Sum256(data)
	files := map[string]string{
		"data.bin": string(data),
		// Prints the checksum the test compares with the host's.
		"check.sh": "set -e\nsum=$(sha256sum /disk/data.bin)\necho \"SHA256 ${sum%% *}\"\n",
		// Reboots instead of powering off: the VMM must exit non-zero.
		"reboot.sh": "echo rebooting-now\nreboot -f\nsleep 30\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range extra {
		if err := os.WriteFile(filepath.Join(root, name), content, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(dir, "disk.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", root, img, "16M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return testDisk{path: img, sha256: hex.EncodeToString(sum[:])}
}

// hpcvmLine returns the value of the first "HPCVM key=value" word on the
// console, and whether it was there.
func hpcvmLine(console, key string) (string, bool) {
	re := regexp.MustCompile(`(?m)HPCVM ` + regexp.QuoteMeta(key) + `=(\S*)`)
	m := re.FindStringSubmatch(console)
	if m == nil {
		return "", false
	}
	return m[1], true
}

// TestBoot boots each guest kernel with 1 and 2 vCPUs under hpcvm in a virt
// node, with an ext4 disk and vsock, and checks from the outside what the
// guest reports: CPU count, memory, the disk file's checksum, a vsock echo,
// and that a guest poweroff makes the VMM exit 0.
func TestBoot(t *testing.T) {
	r := node(t)
	bin := mustHPCVM(t)
	art := guestvm.FindArtifacts()
	disk := makeDisk(t)
	for _, kc := range kernelCases(art) {
		for _, cpus := range []int{1, 2} {
			t.Run(fmt.Sprintf("%s-%dcpu", kc.name, cpus), func(t *testing.T) {
				guestvm.Need(t, kc.kernel, kc.initrd)
				bootAndCheck(t, r, bin, kc, cpus, disk)
			})
		}
	}
}

func bootAndCheck(t *testing.T, r guestvm.Runner, bin string, kc kernelCase, cpus int, disk testDisk) {
	run, vsockErr, why := bootOnce(t, r, bin, kc, cpus, disk)
	if why != "" {
		// Failures seen in virt nodes (docs/testing.md, "Pitfalls"); a
		// deterministic VMM bug fails again.
		t.Logf("attempt 1: %s; booting once more (docs/testing.md: failures seen in virt nodes)\n%s",
			why, guestvm.Tail(dump(run), 15))
		healthyNode(t)
		run, vsockErr, why = bootOnce(t, r, bin, kc, cpus, disk)
		if why != "" && !r.Node.Alive() {
			t.Fatalf("attempt 2: %s", why)
		}
	}
	checkBoot(t, kc, cpus, disk, run, vsockErr)
}

// bootOnce boots the guest, echoes over vsock and stops it; it returns the
// run, a description of what went wrong with vsock ("" if nothing) and, for
// the failures seen in virt nodes that deserve one more boot (a triple
// fault, no userspace within bootLimit, a VMM that would not die), why.
func bootOnce(t *testing.T, r guestvm.Runner, bin string, kc kernelCase, cpus int, disk testDisk) (run guestvm.Run, vsockErr, retryWhy string) {
	ctx := testCtx(t)
	sock := fmt.Sprintf("/run/e2e-%s-%d.vsock", kc.name, cpus)
	vm := guestvm.VM{
		Kernel: kc.kernel, Initrd: kc.initrd, CPUs: cpus, MemMiB: kc.memMiB,
		Disks: []guestvm.Disk{{Path: disk.path, ReadOnly: true}},
		// wait: the guest stays up until the vsock "stop" (or 5 minutes).
		Cmdline:  guestvm.BaseCmdline + " hpcvm.disk=ro hpcvm.test=/check.sh hpcvm.vsock=1 hpcvm.wait=300",
		Vsock:    sock,
		HPCVMBin: bin,
	}
	p, err := r.Start(vm, guestvm.HPCVM, guestvm.UserspaceMarker)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill() // no-op once it exited

	bctx, bcancel := context.WithTimeout(ctx, bootLimit)
	up := waitConsole(bctx, p, guestvm.UserspaceMarker)
	bcancel()
	if up == "" && !p.Exited() {
		if ok, why := r.Node.Healthy(); !ok {
			return run, "", why
		}
		p.Kill()
		res, _ := p.Wait(ctx)
		run, _ = guestvm.Parse(res)
		return run, "", fmt.Sprintf("the guest showed no userspace within %v", bootLimit)
	}

	// vsock: wait for the guest's server, echo random bytes, then ask it to stop.
	var echoed, stopAnswer string
	switch state := waitConsole(ctx, p, "HPCVM vsock=ready", "HPCVM vsock=error", "HPCVM stop="); state {
	case "HPCVM vsock=ready":
		payload := hex.EncodeToString(randBytes(32))
		echoed, vsockErr = vsockCall(ctx, r, sock, 1024, payload, 0)
		if vsockErr == "" && echoed != payload {
			vsockErr = fmt.Sprintf("echo port returned %q, want %q", echoed, payload)
		}
		var err2 string
		stopAnswer, err2 = vsockCall(ctx, r, sock, 1026, "stop\n", 1)
		if err2 != "" || !strings.HasPrefix(stopAnswer, "OK") {
			vsockErr += fmt.Sprintf("; stop on the control port: %q %s", stopAnswer, err2)
			p.Kill()
		}
	default:
		vsockErr = fmt.Sprintf("guest vsock server not ready (console state %q)", state)
		p.Kill() // do not wait for hpcvm.wait to expire
	}

	// Stopped or killed, the VMM is gone in seconds; one that is not after
	// two minutes is stuck with its node (seen once: node vCPUs busy, the
	// killed VMM still there; docs/testing.md).
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	res, err := p.Wait(wctx)
	wcancel()
	run, perr := guestvm.Parse(res)
	if err != nil || vsockErr != "" {
		// A node whose kernel died under the guest may write the VMM's
		// exit status before its console shows the panic.
		time.Sleep(2 * time.Second)
	}
	if ok, why := r.Node.Healthy(); !ok {
		return run, vsockErr, why
	}
	if err != nil && vsockErr != "" {
		return run, vsockErr, "vsock: " + vsockErr + "; the VMM did not exit when killed"
	}
	if err != nil || perr != nil {
		t.Fatalf("running hpcvm: %v %v\n%s", err, perr, dump(run))
	}
	logRun(t, "hpcvm", run)
	if guestvm.PlatformReset(run) {
		return run, vsockErr, "the guest triple-faulted"
	}
	return run, vsockErr, ""
}

func checkBoot(t *testing.T, kc kernelCase, cpus int, disk testDisk, run guestvm.Run, vsockErr string) {
	c := run.Console
	failed := false
	check := func(name string, ok bool, format string, args ...any) {
		t.Run(name, func(t *testing.T) {
			if !ok {
				failed = true
				t.Errorf(format, args...)
			}
		})
	}

	nproc, _ := hpcvmLine(c, "nproc")
	online, _ := hpcvmLine(c, "cpus_online")
	wantOnline := "0"
	if cpus > 1 {
		wantOnline = fmt.Sprintf("0-%d", cpus-1)
	}
	check("cpus", nproc == strconv.Itoa(cpus) && online == wantOnline,
		"guest reports nproc=%q cpus_online=%q, want %d and %q", nproc, online, cpus, wantOnline)

	memStr, _ := hpcvmLine(c, "memtotal_kb")
	memKB, _ := strconv.Atoi(memStr)
	maxKB := kc.memMiB * 1024
	// MemTotal excludes the kernel image and reserved memory.
	check("memory", memKB > maxKB*3/4 && memKB <= maxKB,
		"guest MemTotal %q kB, want between 75%% and 100%% of %d kB", memStr, maxKB)

	diskMode, _ := hpcvmLine(c, "disk")
	exit, _ := hpcvmLine(c, "exit")
	check("disk", strings.Contains(c, "SHA256 "+disk.sha256) && exit == "0",
		"virtio-blk: want the guest to print SHA256 %s and exit=0 (disk=%q exit=%q)", disk.sha256, diskMode, exit)

	stop, _ := hpcvmLine(c, "stop")
	check("vsock", vsockErr == "" && stop == "vsock", "vsock: %s (guest stop=%q)", vsockErr, stop)

	check("poweroff", run.ExitCode == 0 && strings.Contains(c, "reboot: Power down"),
		"want the guest to power off (\"reboot: Power down\") and hpcvm to exit 0, got exit %d (killed after halt: %v)",
		run.ExitCode, run.Tool.KilledAfterHalt)
	if failed {
		t.Logf("%s", dump(run))
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// waitConsole polls the running VMM's console until one of the texts
// appears, the VMM exits or its node stops being healthy; it returns the
// text found ("" otherwise).
func waitConsole(ctx context.Context, p *virtnode.Proc, texts ...string) string {
	for {
		out := p.Stdout()
		for _, s := range texts {
			if strings.Contains(out, s) {
				return s
			}
		}
		if p.Exited() || ctx.Err() != nil {
			return ""
		}
		if ok, _ := p.Node().Healthy(); !ok {
			return ""
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// vsockCall runs `vmtool vsock` in the node; it returns the answer and an
// error description ("" if none).
func vsockCall(ctx context.Context, r guestvm.Runner, sock string, port int, msg string, lines int) (string, string) {
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cmd := guestvm.Quote([]string{r.VMTool, "vsock", "-sock", sock, "-port", strconv.Itoa(port),
		"-msg", msg, "-lines", strconv.Itoa(lines), "-timeout", "2m"})
	res, err := r.Node.Run(cctx, cmd)
	if err != nil {
		return res.Stdout, err.Error()
	}
	if res.ExitCode != 0 {
		return res.Stdout, fmt.Sprintf("vmtool vsock port %d: exit %d: %s", port, res.ExitCode, strings.TrimSpace(res.Stderr))
	}
	return res.Stdout, ""
}

// TestGuestRebootExitsNonZero: a guest that reboots makes hpcvm exit
// non-zero (it cannot restart the guest).
func TestGuestRebootExitsNonZero(t *testing.T) {
	r := node(t)
	bin := mustHPCVM(t)
	art := guestvm.FindArtifacts()
	guestvm.Need(t, art.Vmlinux, art.TestInitramfs)
	disk := makeDisk(t)
	vm := guestvm.VM{Kernel: art.Vmlinux, Initrd: art.TestInitramfs, MemMiB: 256, HPCVMBin: bin,
		Disks:   []guestvm.Disk{{Path: disk.path, ReadOnly: true}},
		Cmdline: guestvm.BaseCmdline + " hpcvm.disk=ro hpcvm.test=/reboot.sh"}
	run, err := runRetrying(t, r, vm, guestvm.HPCVM, "rebooting-now")
	if err != nil {
		t.Fatal(err)
	}
	logRun(t, "hpcvm", run)
	if run.Tool.MarkerMs < 0 {
		t.Fatalf("the guest never ran its reboot script\n%s", dump(run))
	}
	if run.ExitCode == 0 {
		t.Fatalf("hpcvm exited 0 after a guest reboot\n%s", dump(run))
	}
}

// TestGuestPanicExitsNonZero: a kernel panic (no init to run) makes hpcvm
// exit non-zero and the panic is on the console.
func TestGuestPanicExitsNonZero(t *testing.T) {
	r := node(t)
	bin := mustHPCVM(t)
	art := guestvm.FindArtifacts()
	guestvm.Need(t, art.Vmlinux, art.TestInitramfs)
	vm := guestvm.VM{Kernel: art.Vmlinux, Initrd: art.TestInitramfs, MemMiB: 256, HPCVMBin: bin,
		Cmdline: guestvm.BaseCmdline + " rdinit=/does-not-exist init=/does-not-exist"}
	run, err := runRetrying(t, r, vm, guestvm.HPCVM, "Kernel panic")
	if err != nil {
		t.Fatal(err)
	}
	logRun(t, "hpcvm", run)
	if run.Tool.MarkerMs < 0 || run.ExitCode == 0 {
		t.Fatalf("want a kernel panic on the console and a non-zero exit\n%s", dump(run))
	}
}

// TestMicroVMReference boots the minimal kernel (bzImage and PVH) with the
// same disk under the reference VMM, qemu-system-x86_64 -enable-kvm -M
// microvm, inside the node. It checks the harness and the guest artifacts
// independently of hpcvm, and is the path the boot benchmark compares with.
func TestMicroVMReference(t *testing.T) {
	r := node(t)
	art := guestvm.FindArtifacts()
	disk := makeDisk(t)
	for _, kc := range kernelCases(art)[:2] {
		t.Run(kc.name, func(t *testing.T) {
			guestvm.Need(t, kc.kernel, kc.initrd)
			vm := guestvm.VM{Kernel: kc.kernel, Initrd: kc.initrd, CPUs: 2, MemMiB: kc.memMiB,
				Disks:   []guestvm.Disk{{Path: disk.path, ReadOnly: true}},
				Cmdline: guestvm.BaseCmdline + " hpcvm.disk=ro hpcvm.test=/check.sh"}
			run, err := runRetrying(t, r, vm, guestvm.MicroVM, guestvm.UserspaceMarker)
			if err != nil {
				t.Fatal(err)
			}
			logRun(t, "qemu-microvm", run)
			c := run.Console
			nproc, _ := hpcvmLine(c, "nproc")
			exit, _ := hpcvmLine(c, "exit")
			if nproc != "2" || !strings.Contains(c, "SHA256 "+disk.sha256) || exit != "0" ||
				!strings.Contains(c, "reboot: Power down") || run.ExitCode != 0 {
				t.Fatalf("want nproc=2, the disk checksum, exit=0 and a poweroff\n%s", dump(run))
			}
		})
	}
}

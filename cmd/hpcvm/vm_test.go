package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/linuxvm"
)

// runHPCVM runs the hpcvm command (this test binary re-executed as main)
// and returns its exit status and stderr.
func runHPCVM(t *testing.T, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=TestHelperMain", "--"}, args...)...)
	cmd.Env = append(os.Environ(), "HPCVM_TEST_MAIN=1")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, stderr.String()
}

// TestHelperMain is not a test: it runs main() for runHPCVM.
func TestHelperMain(t *testing.T) {
	if os.Getenv("HPCVM_TEST_MAIN") != "1" {
		t.Skip("helper for CLI tests, not a test by itself")
	}
	for i, a := range os.Args {
		if a == "--" {
			os.Args = append([]string{"hpcvm"}, os.Args[i+1:]...)
			break
		}
	}
	main()
	os.Exit(0)
}

func TestVMRunRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	notKernel := filepath.Join(dir, "notakernel")
	if err := os.WriteFile(notKernel, []byte("this is not a kernel image at all"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string // in the one-line error
	}{
		{"no kernel", []string{"vm", "run"}, "--kernel is required"},
		{"missing kernel", []string{"vm", "run", "--kernel", filepath.Join(dir, "nope")}, "no such file"},
		{"kernel is a directory", []string{"vm", "run", "--kernel", dir}, "not a regular file"},
		{"missing initrd", []string{"vm", "run", "--kernel", notKernel, "--initrd", filepath.Join(dir, "nope")}, "--initrd"},
		{"missing disk", []string{"vm", "run", "--kernel", notKernel, "--disk", filepath.Join(dir, "nope") + ",ro"}, "--disk"},
		{"bad disk option", []string{"vm", "run", "--kernel", notKernel, "--disk", notKernel + ",fast"}, "unknown disk option"},
		{"empty overlay", []string{"vm", "run", "--kernel", notKernel, "--disk", notKernel + ",overlay="}, "overlay= needs a file"},
		{"read-only overlay", []string{"vm", "run", "--kernel", notKernel, "--disk", notKernel + ",ro,overlay=" + filepath.Join(dir, "o")}, "read-only disk needs no overlay"},
		{"unknown stop signal", []string{"vm", "run", "--kernel", notKernel, "--stop-signal", "SIGBOGUS"}, "--stop-signal: unknown signal"},
		{"uncatchable stop signal", []string{"vm", "run", "--kernel", notKernel, "--stop-signal", "KILL"}, "cannot be caught"},
		{"zero cpus", []string{"vm", "run", "--kernel", notKernel, "--cpus", "0"}, "--cpus 0: need at least 1"},
		{"too many cpus", []string{"vm", "run", "--kernel", notKernel, "--cpus", "999"}, "at most"},
		{"bad mem", []string{"vm", "run", "--kernel", notKernel, "--mem", "lots"}, "--mem"},
		{"mem too small", []string{"vm", "run", "--kernel", notKernel, "--mem", "1MiB"}, "too small"},
		{"mem more than host", []string{"vm", "run", "--kernel", notKernel, "--mem", "64PiB"}, "more than this host"},
		{"vsock dir missing", []string{"vm", "run", "--kernel", notKernel, "--vsock", filepath.Join(dir, "no", "v.sock")}, "does not exist"},
		{"vsock path is a file", []string{"vm", "run", "--kernel", notKernel, "--vsock", notKernel}, "not a socket"},
		{"unknown subcommand", []string{"vm", "fly"}, "unknown subcommand"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stderr := runHPCVM(t, tt.args...)
			if code == 0 {
				t.Fatalf("exit 0, want an error; stderr %q", stderr)
			}
			if !strings.Contains(stderr, tt.want) {
				t.Errorf("stderr %q does not mention %q", stderr, tt.want)
			}
			if lines := strings.Count(strings.TrimSpace(stderr), "\n"); lines > 0 && tt.name != "unknown subcommand" {
				t.Errorf("error is %d lines, want one:\n%s", lines+1, stderr)
			}
		})
	}
}

// TestVMRunRejectsNonKernel needs /dev/kvm (the image is read after the VM
// exists); the message must say what the file is not.
func TestVMRunRejectsNonKernel(t *testing.T) {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skipf("needs /dev/kvm: %v", err)
	}
	dir := t.TempDir()
	notKernel := filepath.Join(dir, "notakernel")
	if err := os.WriteFile(notKernel, make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stderr := runHPCVM(t, "vm", "run", "--kernel", notKernel, "--mem", "64MiB")
	if code == 0 || !strings.Contains(stderr, "not a bzImage") {
		t.Fatalf("exit %d, stderr %q: want a 'not a bzImage ... nor an ELF' error", code, stderr)
	}
}

func TestVMRunHelp(t *testing.T) {
	code, stderr := runHPCVM(t, "vm", "run", "--help")
	if code != 0 || !strings.Contains(stderr, "--kernel") || !strings.Contains(stderr, "--vsock") {
		t.Fatalf("exit %d, help %q", code, stderr)
	}
}

func TestDiskFlagOverlay(t *testing.T) {
	var d diskFlags
	if err := d.Set("/img/disk.raw,overlay=/run/x/disk.overlay"); err != nil {
		t.Fatal(err)
	}
	if want := (linuxvm.Disk{Path: "/img/disk.raw", Overlay: "/run/x/disk.overlay"}); d[0] != want {
		t.Errorf("--disk = %+v, want %+v", d[0], want)
	}
}

func TestParseSignal(t *testing.T) {
	for _, v := range []string{"SIGUSR1", "USR1", "sigusr1", "usr1", "10"} {
		if s, err := parseSignal(v); err != nil || s != syscall.SIGUSR1 {
			t.Errorf("parseSignal(%q) = %v, %v; want SIGUSR1", v, s, err)
		}
	}
	for _, v := range []string{"", "USR3", "0", "99"} {
		if s, err := parseSignal(v); err == nil {
			t.Errorf("parseSignal(%q) = %v, want an error", v, s)
		}
	}
}

// signalSelf sends s to this test process and gives the runtime time to
// deliver it.
func signalSelf(t *testing.T, s syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(os.Getpid(), s); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
}

// TestStopSignalsDefault: SIGTERM stops the guest (hpcvm vm run's
// documented behaviour; the CLI exits 143).
func TestStopSignalsDefault(t *testing.T) {
	ctx, got, release := stopSignals(0)
	defer release()
	signalSelf(t, syscall.SIGTERM)
	wantStopped(t, ctx, got, syscall.SIGTERM)
}

// wantStopped checks that stopSignals's context ended because of sig.
func wantStopped(t *testing.T, ctx context.Context, got func() (os.Signal, bool), sig syscall.Signal) {
	t.Helper()
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("%v did not stop", sig)
	}
	if s, ok := got(); !ok || s != sig {
		t.Errorf("stopped by %v, %v; want %v", s, ok, sig)
	}
}

// TestStopSignalsStopSignal: with --stop-signal SIGUSR1 (the VMM of a job
// step), SIGTERM, SIGINT and SIGHUP neither stop the guest nor kill the
// process; SIGUSR1 stops it.
func TestStopSignalsStopSignal(t *testing.T) {
	ctx, got, release := stopSignals(syscall.SIGUSR1)
	defer release()
	for _, s := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP} {
		signalSelf(t, s)
		if ctx.Err() != nil {
			t.Fatalf("%v stopped the guest", s)
		}
	}
	if s, ok := got(); ok {
		t.Fatalf("stopped by %v before the stop signal", s)
	}
	signalSelf(t, syscall.SIGUSR1)
	wantStopped(t, ctx, got, syscall.SIGUSR1)
}

func TestLaunchVMMRemoved(t *testing.T) {
	code, stderr := runHPCVM(t, "launch", "vmm", "--kernel", "/k")
	if code != 2 || !strings.Contains(stderr, "hpcvm vm run --stop-signal=SIGUSR1") {
		t.Fatalf("exit %d, stderr %q: want exit 2 naming the replacement", code, stderr)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
)

func TestSliceRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "secret")
	if err := os.WriteFile(good, []byte("0123456789abcdef0123"), 0o600); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "open-secret")
	if err := os.WriteFile(open, []byte("0123456789abcdef0123"), 0o644); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(dir, "short-secret")
	if err := os.WriteFile(short, []byte("tiny"), 0o600); err != nil {
		t.Fatal(err)
	}
	prog := filepath.Join(dir, "empty.bin")
	os.WriteFile(prog, nil, 0o644)
	base := func(over ...string) []string {
		args := map[string]string{"--id": "0", "--peers": "127.0.0.1:7000,127.0.0.1:7001", "--vm-id": "vm1",
			"--secret-file": good, "--placement": "0/1", "--builtin": "lockinc"}
		for i := 0; i+1 < len(over); i += 2 {
			if over[i+1] == "" {
				delete(args, over[i])
			} else {
				args[over[i]] = over[i+1]
			}
		}
		var out []string
		for k, v := range args {
			out = append(out, k, v)
		}
		return out
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no peers", base("--peers", ""), "--peers is required"},
		{"bad peer", base("--peers", "127.0.0.1,127.0.0.1:7001"), `entry 0 "127.0.0.1" is not HOST:PORT`},
		{"bad port", base("--peers", "127.0.0.1:0,127.0.0.1:7001"), "is not 1..65535"},
		{"duplicate peer", base("--peers", "127.0.0.1:7000,127.0.0.1:7000"), "listed twice"},
		{"no id", base("--id", ""), "--id is required"},
		{"id out of range", base("--id", "2"), "--id 2: not in 0..1"},
		{"no vm id", base("--vm-id", ""), "--vm-id"},
		{"no secret", base("--secret-file", ""), "--secret-file is required"},
		{"missing secret", base("--secret-file", filepath.Join(dir, "nope")), "no such file"},
		{"readable secret", base("--secret-file", open), "mode 0644: group and others must have no access"},
		{"short secret", base("--secret-file", short), "holds 4 bytes"},
		{"no placement", base("--placement", ""), "--placement is required"},
		{"placement groups", base("--placement", "0,1"), "1 groups for 2 slices"},
		{"placement gap", base("--placement", "0/2"), "none is vCPU 1"},
		{"placement duplicate", base("--placement", "0-1/1"), "vCPU 1 placed on slice 0 and slice 1"},
		{"placement syntax", base("--placement", "0/x"), `"x" is not a vCPU id`},
		{"placement range", base("--placement", "3-1/0"), "not a range"},
		{"mem unit", base("--mem", "64"), "--mem"},
		{"mem small", base("--mem", "1MiB"), "at least"},
		{"no guest", base("--builtin", ""), "a guest is required"},
		{"unknown builtin", base("--builtin", "nope"), `no built-in program "nope"`},
		{"both guests", base("--program", prog), "mutually exclusive"},
		{"empty program", base("--builtin", "", "--program", prog), "empty file"},
		{"iters", base("--iters", "0"), "--iters 0"},
		{"result range", base("--result", "0x100000000"), "outside guest memory"},
		{"result align", base("--result", "0x100001"), "not 8-byte aligned"},
		{"timeout", base("--timeout", "5"), "--timeout"},
		{"stop signal", base("--stop-signal", "SIGNOPE"), "--stop-signal"},
		{"hold not a duration", base("--hold", "soon"), "--hold"},
		{"hold too long", base("--hold", "2s"), "--hold 2s"},
		{"hold negative", base("--hold", "-1ms"), "--hold -1ms"},
		{"vcpu nice too high", base("--vcpu-nice", "20"), "--vcpu-nice 20"},
		{"vcpu nice negative", base("--vcpu-nice", "-5"), "--vcpu-nice -5"},
		{"timer slack not a duration", base("--timer-slack", "some"), "--timer-slack"},
		{"timer slack too long", base("--timer-slack", "1s"), "--timer-slack 1s"},
		{"profile not a duration", base("--profile", "often"), "--profile"},
		{"profile too fine", base("--profile", "10us"), "--profile 10us"},
		{"numa without kernel", append(base(), "--numa"), "--numa needs --kernel"},
		{"listen", base("--listen", "nonsense"), "--listen"},
		{"kernel and builtin", base("--kernel", prog), "--kernel and --builtin/--program are mutually exclusive"},
		{"kernel and result", base("--builtin", "", "--kernel", prog, "--result", "0x1000"), "--result is for micro-guests"},
		{"kernel boot cpu elsewhere", base("--builtin", "", "--kernel", prog, "--placement", "1/0"), "vCPU 0 (the boot processor) must be on slice 0"},
		{"kernel mem", base("--builtin", "", "--kernel", prog, "--mem", "16MiB"), "a Linux guest needs"},
		{"initrd without kernel", base("--initrd", prog), "need --kernel"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseSliceArgs(tt.args)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("parseSliceArgs(%q) = %v, want an error containing %q", tt.args, err, tt.want)
			}
		})
	}
	if _, err := parseSliceArgs(base()); err != nil {
		t.Fatalf("good options rejected: %v", err)
	}
	// $HPCVM_SLICE_PROFILE is --profile's default; the flag wins.
	t.Setenv(ProfileEnv, "20ms")
	if o, err := parseSliceArgs(base()); err != nil || o.profile != 20*time.Millisecond {
		t.Errorf("with %s=20ms: profile %v, %v; want 20ms", ProfileEnv, o.profile, err)
	}
	if o, err := parseSliceArgs(base("--profile", "0")); err != nil || o.profile != 0 {
		t.Errorf("with %s=20ms and --profile 0: profile %v, %v; want off", ProfileEnv, o.profile, err)
	}
	t.Setenv(ProfileEnv, "")
	t.Setenv(TimerSlackEnv, "10ms")
	if o, err := parseSliceArgs(base()); err != nil || o.timerSlack != 10*time.Millisecond {
		t.Errorf("with %s=10ms: timer slack %v, %v; want 10ms", TimerSlackEnv, o.timerSlack, err)
	}
	t.Setenv(TimerSlackEnv, "")
	if o, err := parseSliceArgs(base()); err != nil || o.timerSlack != 0 {
		t.Errorf("a micro-guest's default timer slack %v, %v; want 0", o.timerSlack, err)
	}
	if o, err := parseSliceArgs(base("--builtin", "", "--kernel", prog, "--mem", "256MiB")); err != nil || o.linux == nil || o.linux.kernel != prog {
		t.Fatalf("good --kernel options: %+v, %v", o, err)
	} else if o.timerSlack != linuxTimerSlack {
		t.Errorf("a Linux guest's default timer slack %v; want %v", o.timerSlack, linuxTimerSlack)
	}
	if o, err := parseSliceArgs(base("--builtin", "", "--kernel", prog, "--mem", "256MiB", "--timer-slack", "0")); err != nil || o.timerSlack != 0 {
		t.Errorf("--timer-slack 0 for a Linux guest: %v, %v; want 0", o.timerSlack, err)
	}
	if code, stderr := runHPCVM(t, append([]string{"slice"}, base("--placement", "0")...)...); code != 2 || !strings.Contains(stderr, "--placement") {
		t.Fatalf("hpcvm slice with a bad placement: exit %d, stderr %q; want 2 naming --placement", code, stderr)
	}
	if code, stderr := runHPCVM(t, "slice", "--help"); code != 0 || !strings.Contains(stderr, "built-in programs: ") {
		t.Fatalf("hpcvm slice --help: exit %d, stderr %q", code, stderr)
	}
}

// netnsLab is a set of network namespaces the test created: one per slice,
// each with a veth into a bridge in a hub namespace. Nothing is connected
// to the host's own network.
type netnsLab struct {
	hub   string
	names []string
	addrs []string // slice i's IP
}

func requireNetnsLab(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip command to create network namespaces")
	}
	if _, err := os.Stat(kvm.DevicePath); err != nil {
		t.Skipf("needs %s: %v", kvm.DevicePath, err)
	}
	if _, err := os.Stat("/dev/userfaultfd"); err != nil {
		t.Skipf("needs /dev/userfaultfd: %v", err)
	}
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func newNetnsLab(t *testing.T, n int) *netnsLab {
	t.Helper()
	prefix := fmt.Sprintf("hpcvm-st%d", os.Getpid())
	lab := &netnsLab{hub: prefix + "-hub"}
	t.Cleanup(func() {
		for _, ns := range append(lab.names, lab.hub) {
			exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	ip(t, "netns", "add", lab.hub)
	ip(t, "-n", lab.hub, "link", "add", "br0", "type", "bridge")
	ip(t, "-n", lab.hub, "link", "set", "br0", "up")
	for i := 0; i < n; i++ {
		ns := fmt.Sprintf("%s-%d", prefix, i)
		ip(t, "netns", "add", ns)
		lab.names = append(lab.names, ns)
		hubEnd, sliceEnd := fmt.Sprintf("ve%d", i), fmt.Sprintf("vp%d", i)
		ip(t, "-n", lab.hub, "link", "add", hubEnd, "type", "veth", "peer", "name", sliceEnd, "netns", ns)
		ip(t, "-n", lab.hub, "link", "set", hubEnd, "master", "br0", "up")
		addr := fmt.Sprintf("10.231.0.%d", 10+i)
		ip(t, "-n", ns, "addr", "add", addr+"/24", "dev", sliceEnd)
		ip(t, "-n", ns, "link", "set", sliceEnd, "up")
		ip(t, "-n", ns, "link", "set", "lo", "up")
		lab.addrs = append(lab.addrs, addr)
	}
	return lab
}

type sliceProc struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
	done           chan error
}

// TestSliceProcessesInNetns runs `hpcvm slice` processes, each in its own
// network namespace (connected through a bridge the test creates), on the
// lock-inc micro-guest, and checks the exact sum.
func TestSliceProcessesInNetns(t *testing.T) {
	requireNetnsLab(t)
	for _, tc := range []struct {
		name      string
		placement string
		ncpu      int
	}{
		{"3 slices one vCPU each", "0/1/2", 3},
		{"3 slices one without vCPUs", "0-1//2", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			iters := 300000
			if testing.Short() {
				iters = 30000
			}
			const n = 3
			lab := newNetnsLab(t, n)
			var peers []string
			for i := 0; i < n; i++ {
				peers = append(peers, fmt.Sprintf("%s:%d", lab.addrs[i], 7400+i))
			}
			secret := filepath.Join(t.TempDir(), "secret")
			if err := os.WriteFile(secret, []byte("netns-test-secret-0123456789"), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			procs := make([]*sliceProc, n)
			for i := 0; i < n; i++ {
				p := &sliceProc{done: make(chan error, 1)}
				p.cmd = exec.CommandContext(ctx, "ip", "netns", "exec", lab.names[i], os.Args[0], "-test.run=TestHelperMain", "--",
					"slice", "--id", fmt.Sprint(i), "--peers", strings.Join(peers, ","), "--vm-id", "netns-vm",
					"--secret-file", secret, "--placement", tc.placement, "--mem", "8MiB",
					"--builtin", "lockinc", "--iters", fmt.Sprint(iters), "--timeout", "3m")
				p.cmd.Env = append(os.Environ(), "HPCVM_TEST_MAIN=1")
				p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
				if err := p.cmd.Start(); err != nil {
					t.Fatal(err)
				}
				go func() { p.done <- p.cmd.Wait() }()
				procs[i] = p
			}
			outs := make([]sliceOutput, n)
			for i, p := range procs {
				err := <-p.done
				if err != nil {
					t.Errorf("slice %d: %v\nstdout: %s\nstderr: %s", i, err, p.stdout.String(), p.stderr.String())
					continue
				}
				if err := json.Unmarshal(p.stdout.Bytes(), &outs[i]); err != nil {
					t.Fatalf("slice %d output %q: %v", i, p.stdout.String(), err)
				}
			}
			if t.Failed() {
				return
			}
			want := uint64(tc.ncpu * iters)
			if len(outs[0].Results) != 1 || outs[0].Results[0].Value != want {
				t.Fatalf("slice 0 results %+v, want the lock-inc counter = %d", outs[0].Results, want)
			}
			for i, o := range outs {
				if o.Exit != "poweroff" || o.Slice != i {
					t.Fatalf("slice %d output %+v", i, o)
				}
				t.Logf("slice %d: vCPUs %v, %s, stats %+v", i, o.VCPUs, o.Elapsed, o.Stats)
			}
		})
	}
}

// TestSliceStopSignal: with --stop-signal SIGUSR1 (how a Slurm step's
// slices run) SIGTERM is caught and ignored, and SIGUSR1 stops every slice
// with exit status 0, whichever slice's stop reaches the others first.
func TestSliceStopSignal(t *testing.T) {
	requireNetnsLab(t) // root, /dev/kvm, /dev/userfaultfd (no namespace used)
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("stop-signal-test-secret-0123"), 0o600); err != nil {
		t.Fatal(err)
	}
	ln0, ln1 := freePort(t), freePort(t)
	peers := fmt.Sprintf("127.0.0.1:%d,127.0.0.1:%d", ln0, ln1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	procs := make([]*sliceProc, 2)
	for i := range procs {
		p := &sliceProc{done: make(chan error, 1)}
		// A micro-guest that would run for hours.
		p.cmd = exec.CommandContext(ctx, os.Args[0], "-test.run=TestHelperMain", "--",
			"slice", "--id", fmt.Sprint(i), "--peers", peers, "--vm-id", "stop-vm", "--secret-file", secret,
			"--placement", "0/1", "--mem", "8MiB", "--builtin", "private", "--iters", "1000000000",
			"--stop-signal", "SIGUSR1", "--timeout", "2m")
		p.cmd.Env = append(os.Environ(), "HPCVM_TEST_MAIN=1")
		p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { p.done <- p.cmd.Wait() }()
		procs[i] = p
	}
	running := func(what string) {
		t.Helper()
		for i, p := range procs {
			select {
			case err := <-p.done:
				t.Fatalf("%s: slice %d exited (%v)\nstderr: %s", what, i, err, p.stderr.String())
			case <-time.After(1500 * time.Millisecond):
			}
		}
	}
	running("before any signal")
	for _, p := range procs {
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	running("after SIGTERM")
	for _, p := range procs {
		p.cmd.Process.Signal(syscall.SIGUSR1)
	}
	for i, p := range procs {
		if err := <-p.done; err != nil {
			t.Errorf("slice %d after SIGUSR1: %v, want exit 0\nstderr: %s", i, err, p.stderr.String())
		} else if !strings.Contains(p.stderr.String(), "stopped by user defined signal 1") {
			t.Errorf("slice %d: stderr lacks the stop: %s", i, p.stderr.String())
		}
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

package launcher

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestPlaceVCPUs(t *testing.T) {
	for _, tc := range []struct {
		cpus    int
		perNode []int
		want    string
	}{
		{4, []int{2, 2}, "[[0 1] [2 3]]"},
		{3, []int{2, 2}, "[[0 1] [2]]"},
		{4, []int{1, 3}, "[[0] [1 2 3]]"},
		{1, []int{2, 2}, "[[0] []]"},
		{6, []int{2, 2, 2}, "[[0 1] [2 3] [4 5]]"},
	} {
		got, err := PlaceVCPUs(tc.cpus, tc.perNode)
		if err != nil || fmt.Sprint(got) != tc.want {
			t.Errorf("PlaceVCPUs(%d, %v) = %v, %v; want %s", tc.cpus, tc.perNode, got, err, tc.want)
		}
	}
	for _, cpus := range []int{0, 5} {
		if _, err := PlaceVCPUs(cpus, []int{2, 2}); err == nil || !strings.Contains(err.Error(), "do not fit") {
			t.Errorf("PlaceVCPUs(%d, [2 2]): %v, want a do-not-fit error", cpus, err)
		}
	}
}

func slicesPlan(dir string) *Plan {
	return &Plan{JobID: "7", StepID: "batch", Nodes: []string{"n1", "n2"}, RuntimeDir: filepath.Join(dir, "run"),
		VM: VMSpec{Kernel: "/k", Initrd: "/i", Disk: "/store/img/disk.raw", DiskMode: DiskModeCopy,
			Cmdline: "root=/dev/vda", CPUs: 4, MemBytes: 1 << 30},
		Slices: &Slices{Placement: [][]int{{0, 1}, {2, 3}}, Addrs: []string{"10.0.0.1:17001", "10.0.0.2:17001"}, VM: "slurm-7.batch"}}
}

func TestSliceArgs(t *testing.T) {
	p := slicesPlan("/x")
	common := []string{"--peers", "10.0.0.1:17001,10.0.0.2:17001", "--vm-id", "slurm-7.batch",
		"--secret-file", "/x/run/vm.key", "--placement", "0,1/2,3", "--mem", "1024MiB", "--kernel", "/k",
		"--cmdline", "root=/dev/vda", "--stop-signal=SIGUSR1", "--initrd", "/i",
		"--disk", "/store/img/disk.raw,overlay=/x/run/disk.overlay", "--replicate-tables"}
	for i, extra := range [][]string{{"--vsock", "/x/run/vsock.sock", "--console", "/x/run/console.log"}, nil} {
		got := p.SliceArgs(i)
		want := append(append([]string{"--id", fmt.Sprint(i), common[0], common[1], "--listen", ":17001"}, common[2:]...), extra...)
		if !slices.Equal(got, want) {
			t.Errorf("slice %d args\n%q\nwant\n%q", i, got, want)
		}
	}
	// Any number of slices replicates the kernel's page tables (docs/dsm.md).
	p.Slices.Placement = [][]int{{0, 1}, {2}, {3}}
	p.Slices.Addrs = append(p.Slices.Addrs, "10.0.0.3:17001")
	if got := p.SliceArgs(2); !slices.Contains(got, "--replicate-tables") {
		t.Errorf("3 slices: %q lacks --replicate-tables", got)
	}
}

// TestSpanNodesBuildsDistributedPlan: --span=nodes on a 2-node step gives
// the booter a plan whose slices run the vCPUs of each node's allocated
// CPUs at the nodes' addresses, with a secret that is not in the encoded
// plan; a 1-node step stays a single VM.
func TestSpanNodesBuildsDistributedPlan(t *testing.T) {
	e := newEnv(t, []string{"true"}, false, Wish{Image: "img"})
	e.l.Opts.Span = SpanNodes
	// The guest's vCPUs beyond the home slice's are offline after boot.
	cpuDir := t.TempDir()
	for cpu, online := range []string{"1", "1", "0", "0"} {
		d := filepath.Join(cpuDir, fmt.Sprintf("cpu%d", cpu))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "online"), []byte(online+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The guest's processes: one, a sleep of this host, which must end up
	// confined to the "home" CPU, 0.
	if err := os.WriteFile(filepath.Join(cpuDir, "online"), []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	procDir := t.TempDir()
	if err := os.Mkdir(filepath.Join(procDir, strconv.Itoa(sleeper.Process.Pid)), 0o755); err != nil {
		t.Fatal(err)
	}
	e.l.Opts.GuestCPUDir = cpuDir
	e.l.Opts.GuestProcDir = procDir
	e.l.Opts.SliceVMM = []string{"/bin/hpcvm", "slice"}
	e.l.NodeAddrs = func(_ context.Context, nodes []string) ([]string, error) {
		if !slices.Equal(nodes, []string{"n1", "n2"}) {
			t.Errorf("NodeAddrs(%v)", nodes)
		}
		return []string{"10.0.0.1", "10.0.0.2"}, nil
	}
	e.run(t)
	if len(e.booter.plans) != 1 {
		t.Fatalf("%d plans booted, want 1; stderr: %s", len(e.booter.plans), e.stderr)
	}
	p := e.booter.plans[0]
	port := SlicePort("42", "batch")
	if p.Slices == nil || fmt.Sprint(p.Slices.Placement) != "[[0 1] [2 3]]" ||
		!slices.Equal(p.Slices.Addrs, []string{fmt.Sprintf("10.0.0.1:%d", port), fmt.Sprintf("10.0.0.2:%d", port)}) ||
		!slices.Equal(p.SliceVMM, []string{"/bin/hpcvm", "slice"}) || len(p.Secret) != 32 {
		t.Fatalf("plan slices %+v, slice VMM %q, secret %d bytes", p.Slices, p.SliceVMM, len(p.Secret))
	}
	for cpu := range 4 {
		if b, err := os.ReadFile(filepath.Join(cpuDir, fmt.Sprintf("cpu%d", cpu), "online")); err != nil || strings.TrimSpace(string(b)) != "1" {
			t.Errorf("cpu%d online = %q (%v) after boot, want 1", cpu, b, err)
		}
	}
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(sleeper.Process.Pid, &set); err != nil {
		t.Fatal(err)
	}
	if set.Count() != 1 || !set.IsSet(0) {
		t.Errorf("the guest process's affinity has %d CPUs (CPU 0: %v), want CPU 0 alone (the home slice's)", set.Count(), set.IsSet(0))
	}
	enc, err := p.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(enc, hex.EncodeToString(p.Secret)) || strings.Contains(strings.ToLower(enc), "secret") {
		t.Errorf("the encoded plan carries the secret: %s", enc)
	}
	back, err := DecodePlan(enc)
	if err != nil || back.Slices == nil || back.Slices.VM != p.Slices.VM {
		t.Errorf("round trip: %+v %v", back, err)
	}

	one := newEnv(t, []string{"true"}, false, Wish{Image: "img"}, "SLURM_JOB_NODELIST=n1", "SLURM_JOB_CPUS_PER_NODE=2")
	one.l.Opts.Span = SpanNodes
	one.l.Opts.SliceVMM = []string{"/bin/hpcvm", "slice"}
	one.l.NodeAddrs = func(context.Context, []string) ([]string, error) { t.Error("NodeAddrs on one node"); return nil, nil }
	one.run(t)
	if len(one.booter.plans) != 1 || one.booter.plans[0].Slices != nil {
		t.Errorf("a 1-node step with --span=nodes: want a single VM, got %+v", one.booter.plans)
	}
}

// TestRunSliceDistributed runs slice 1 of a distributed VM with a fake
// `hpcvm slice`: it runs (not only slice 0), gets its arguments and the
// secret from SecretEnv in a 0600 file that it can read and that is gone
// afterwards, and the secret is not in its environment.
func TestRunSliceDistributed(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating cgroups needs root")
	}
	dir := t.TempDir()
	p := slicesPlan(dir)
	p.JobID = fmt.Sprint(os.Getpid())
	p.Cgroup = CgroupLimits{MemoryMax: 256 << 20, PidsMax: 64, CPUWeight: 100}
	body := `stat -c %a "` + p.SecretFile() + `" > ` + dir + `/mode; od -An -tx1 "` + p.SecretFile() + `" | tr -d ' \n' > ` + dir + `/secret; ` +
		`env | grep -c ` + SecretEnv + ` > ` + dir + `/inenv; exit 0`
	p.SliceVMM = []string{fakeVMM(t, dir, body)}
	secret := "00112233445566778899aabbccddeeff0123"
	t.Setenv(SecretEnv, secret)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := RunSlice(ctx, p, 1, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatalf("RunSlice: %v", err)
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	if got, want := read("args"), strings.Join(p.SliceArgs(1), " "); got != want {
		t.Errorf("slice VMM args\n%s\nwant\n%s", got, want)
	}
	if m := read("mode"); m != "600" {
		t.Errorf("secret file mode %s, want 600", m)
	}
	if s := read("secret"); s != secret {
		t.Errorf("secret file holds %s, want %s", s, secret)
	}
	if n := read("inenv"); n != "0" {
		t.Errorf("%s reached the VMM's environment", SecretEnv)
	}
	if _, err := os.Stat(p.SecretFile()); !os.IsNotExist(err) {
		t.Errorf("secret file left after the slice: %v", err)
	}

	t.Setenv(SecretEnv, "")
	if err := RunSlice(ctx, p, 1, slog.New(slog.NewTextHandler(io.Discard, nil))); err == nil || !strings.Contains(err.Error(), SecretEnv) {
		t.Errorf("RunSlice without the secret: %v, want an error naming %s", err, SecretEnv)
	}
}

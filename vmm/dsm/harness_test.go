package dsm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
	"github.com/hpcvm/hpcvm/vmm/microguest"
	"github.com/hpcvm/hpcvm/vmm/uffd"
)

const testMem = 4 << 20

func requireKVMAndUFFD(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(kvm.DevicePath); err != nil {
		t.Skipf("needs %s: %v", kvm.DevicePath, err)
	}
	if err := kvmAvailable(); err != nil {
		t.Skipf("needs a usable %s (root): %v", kvm.DevicePath, err)
	}
	requireUFFD(t)
}

// requireUFFD is for tests of the coherence protocol between nodes
// without any VM: their "processors" are goroutines writing guest RAM.
func requireUFFD(t testing.TB) {
	t.Helper()
	u, err := uffd.Open(uffd.FeaturePagefaultFlagWP, 0)
	if err != nil {
		t.Skipf("needs userfaultfd with write-protect (root, %s): %v", uffd.DevicePath, err)
	}
	u.Close()
}

// reportDev collects a slice's port reports.
type reportDev struct {
	mu      sync.Mutex
	reports []uint32
}

func (r *reportDev) Read(uint64, []byte) {}
func (r *reportDev) Write(_ uint64, d []byte) {
	var b [4]byte
	copy(b[:], d)
	r.mu.Lock()
	r.reports = append(r.reports, binary.LittleEndian.Uint32(b[:]))
	r.mu.Unlock()
}

// vmRun is the outcome of running a program on a distributed VM.
type vmRun struct {
	reports []uint32 // all slices' reports, sorted
	finals  []uint64 // qwords at the program's final addresses, read coherently on slice 0
	stats   []StatsSnapshot
	hot     [][]HotPage   // per slice
	profile []*RIPProfile // per slice (SliceConfig.ProfileEvery)
	elapsed time.Duration
}

// sliceSpec builds slice i's config for an n-slice VM.
func sliceSpec(i int, addrs []string, ln net.Listener, placement [][]int, prog string, iters int,
	rep *reportDev, finals *[]uint64, lg *slog.Logger) SliceConfig {
	p := mustProgram(prog)
	return SliceConfig{
		Transport: TransportConfig{ID: i, Addrs: addrs, Listener: ln, VMID: "test-vm", Secret: testSecret, Logger: lg,
			PeerTimeout: 30 * time.Second, ConnectTimeout: 20 * time.Second},
		Placement: placement, MemBytes: testMem,
		Loader:   microguest.Program{Code: p.Build(iters)},
		DonePort: portDone,
		Setup: func(h *Home) error {
			return h.Machine.IO.Register("report", portReport, 1, rep)
		},
		Finish: func(g memory.Guest) error {
			for _, a := range p.Results {
				var b [8]byte
				if _, err := g.ReadAt(b[:], int64(a)); err != nil {
					return err
				}
				*finals = append(*finals, binary.LittleEndian.Uint64(b[:]))
			}
			return nil
		},
		Logger: lg,
	}
}

// splitVCPUs deals ncpu vCPUs round-robin over n slices.
func splitVCPUs(ncpu, n int) [][]int {
	out := make([][]int, n)
	for c := 0; c < ncpu; c++ {
		out[c%n] = append(out[c%n], c)
	}
	return out
}

// scaled is a test's iteration count, cut to a twentieth (at least 4) in
// -short runs. The checks do not change, only how many rounds they see.
// -short is how the fast tier runs these tests inside a virt node when the
// host has no KVM (docs/testing.md): nested under QEMU's emulation a page
// hand-off between slices takes hundreds of milliseconds, not tens of
// microseconds, and the full counts would take most of an hour.
func scaled(iters int) int {
	if testing.Short() {
		return max(iters/20, 4)
	}
	return iters
}

// runInProcess runs prog on n slices inside this process, over loopback.
func runInProcess(t testing.TB, n, ncpu int, prog string, iters int) vmRun {
	t.Helper()
	return runInProcessWith(t, n, ncpu, prog, iters, nil)
}

// runInProcessWith is runInProcess with last changes to each slice's
// config (tweak may be nil).
func runInProcessWith(t testing.TB, n, ncpu int, prog string, iters int, tweak func(i int, cfg *SliceConfig)) vmRun {
	t.Helper()
	requireKVMAndUFFD(t)
	lns, addrs := loopbackListeners(t, n)
	lg := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	reps := make([]*reportDev, n)
	var finals []uint64
	res := make([]SliceResult, n)
	errs := make([]error, n)
	ctx, cancel := context.WithTimeoutCause(context.Background(), 3*time.Minute, errors.New("distributed VM did not finish in 3 minutes"))
	defer cancel()
	vc := splitVCPUs(ncpu, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		reps[i] = &reportDev{}
		cfg := sliceSpec(i, addrs, lns[i], vc, prog, iters, reps[i], &finals, lg)
		if tweak != nil {
			tweak(i, &cfg)
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			res[i], errs[i] = RunSlice(ctx, cfg)
		}(i)
	}
	wg.Wait()
	out := vmRun{elapsed: time.Since(start), finals: finals}
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			t.Fatalf("slice %d: %v", i, errs[i])
		}
		if res[i].Exit.Kind != machine.ExitPoweroff {
			t.Fatalf("slice %d exit %v: %s", i, res[i].Exit.Kind, res[i].Exit.Reason)
		}
		out.reports = append(out.reports, reps[i].reports...)
		out.stats = append(out.stats, res[i].Stats)
		out.hot = append(out.hot, res[i].HotPages)
		out.profile = append(out.profile, res[i].Profile)
	}
	sort.Slice(out.reports, func(a, b int) bool { return out.reports[a] < out.reports[b] })
	return out
}

func (r vmRun) String() string {
	return fmt.Sprintf("reports %v finals %v in %v, stats %+v", r.reports, r.finals, r.elapsed.Round(time.Millisecond), r.stats)
}

// customVM describes a distributed VM for runCustom.
type customVM struct {
	placement [][]int
	mem       uint64 // default testMem
	loader    machine.Loader
	setup     func(h *Home) error           // slice 0's devices
	finish    func(g memory.Guest) error    // slice 0, once every vCPU is done
	timeout   time.Duration                 // default 2 minutes
	tweak     func(i int, cfg *SliceConfig) // last changes to slice i's config
}

// runCustom runs vm on len(placement) slices in this process over
// loopback and returns every slice's result; it fails the test if a
// slice fails.
func runCustom(t testing.TB, vm customVM) []SliceResult {
	t.Helper()
	requireKVMAndUFFD(t)
	n := len(vm.placement)
	if vm.mem == 0 {
		vm.mem = testMem
	}
	if vm.timeout == 0 {
		vm.timeout = 2 * time.Minute
	}
	lns, addrs := loopbackListeners(t, n)
	lg := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, cancel := context.WithTimeoutCause(context.Background(), vm.timeout, fmt.Errorf("distributed VM did not finish in %v", vm.timeout))
	defer cancel()
	res := make([]SliceResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		cfg := SliceConfig{
			Transport: TransportConfig{ID: i, Addrs: addrs, Listener: lns[i], VMID: "test-vm", Secret: testSecret, Logger: lg,
				PeerTimeout: 30 * time.Second, ConnectTimeout: 20 * time.Second},
			Placement: vm.placement, MemBytes: vm.mem, Loader: vm.loader, DonePort: portDone,
			Setup: vm.setup, Finish: vm.finish, Logger: lg,
		}
		if vm.tweak != nil {
			vm.tweak(i, &cfg)
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			res[i], errs[i] = RunSlice(ctx, cfg)
		}(i)
	}
	wg.Wait()
	var bad []string
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			bad = append(bad, fmt.Sprintf("slice %d: %v", i, errs[i]))
		} else if res[i].Exit.Kind != machine.ExitPoweroff {
			bad = append(bad, fmt.Sprintf("slice %d exit %v: %s", i, res[i].Exit.Kind, res[i].Exit.Reason))
		}
	}
	if bad != nil {
		t.Fatal(strings.Join(bad, "\n"))
	}
	return res
}

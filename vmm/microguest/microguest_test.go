package microguest_test

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
	. "github.com/hpcvm/hpcvm/vmm/microguest"
)

// Test ports.
const (
	portReport = 0x10 // guest writes a value the test records
	portInput  = 0x12 // guest reads a value the test supplies
	portDone   = 0x11 // guest signals it has finished
)

// recorder is the test's I/O device: it records reports and stops the
// machine once every vCPU has written the done port.
type recorder struct {
	mu      sync.Mutex
	reports []uint32
	done    int
	ncpu    int
	m       *machine.Machine
	input   uint32
}

func (r *recorder) Read(off uint64, data []byte) {
	binary.LittleEndian.PutUint32(data, r.input)
}

func (r *recorder) Write(off uint64, data []byte) {
	v := binary.LittleEndian.Uint32(append(append([]byte(nil), data...), 0, 0, 0, 0))
	r.mu.Lock()
	defer r.mu.Unlock()
	switch off {
	case portReport - portReport:
		r.reports = append(r.reports, v)
	case portDone - portReport:
		r.done++
		if r.done == r.ncpu {
			go r.m.Stop(machine.ExitPoweroff, "all vCPUs done", nil)
		}
	}
}

func requireKVM(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(kvm.DevicePath); err != nil {
		t.Skipf("micro-guest tests need %s: %v", kvm.DevicePath, err)
	}
	s, err := kvm.Open()
	if err != nil {
		t.Skipf("micro-guest tests need a usable %s (run as root): %v", kvm.DevicePath, err)
	}
	s.Close()
}

// run boots prog on ncpu vCPUs and returns the recorder and machine after
// every vCPU wrote the done port.
func run(t *testing.T, prog Program, ncpu int, mem uint64, setup func(*machine.Machine, *recorder)) (*recorder, *machine.Machine) {
	t.Helper()
	requireKVM(t)
	m, err := machine.New(machine.Config{CPUs: ncpu, MemBytes: mem, Loader: prog})
	if err != nil {
		t.Fatalf("machine.New: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	rec := &recorder{ncpu: ncpu, m: m}
	if err := m.IO.Register("test", portReport, 4, rec); err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(m, rec)
	}
	ctx, cancel := context.WithTimeoutCause(context.Background(), 2*time.Minute, errors.New("micro-guest did not finish"))
	defer cancel()
	exit := m.Run(ctx)
	if exit.Kind != machine.ExitPoweroff {
		t.Fatalf("machine exit %v: %s (%v)", exit.Kind, exit.Reason, exit.Err)
	}
	return rec, m
}

func TestPortIOExit(t *testing.T) {
	a := NewAsm()
	a.MovImm(RAX, 0x12345678)
	a.Out(portReport)
	a.In(portInput)
	a.AddImm(RAX, 1)
	a.Out(portReport)
	a.Out(portDone)
	a.Label("spin")
	a.Jmp("spin")
	rec, _ := run(t, Program{Code: a.MustBytes()}, 1, 4<<20, func(_ *machine.Machine, r *recorder) { r.input = 0xCAFE })
	if len(rec.reports) != 2 || rec.reports[0] != 0x12345678 || rec.reports[1] != 0xCAFF {
		t.Fatalf("reports = %#x, want [0x12345678 0xcaff]", rec.reports)
	}
}

// mmioDev records writes and answers reads at a guest-physical address
// outside RAM.
type mmioDev struct {
	mu     sync.Mutex
	writes map[uint64]uint32
}

func (d *mmioDev) Read(off uint64, data []byte) {
	binary.LittleEndian.PutUint32(data, 0x55AA0000|uint32(off))
}

func (d *mmioDev) Write(off uint64, data []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.writes[off] = binary.LittleEndian.Uint32(data)
}

func TestMMIOExit(t *testing.T) {
	const base = 0xD0000000
	a := NewAsm()
	a.MovImm(RBX, base)
	a.MovImm(RAX, 0xDEADBEEF)
	a.Store32(RBX, RAX)
	a.MovImm(RBX, base+4)
	a.Load32(RAX, RBX)
	a.Out(portReport)
	a.Out(portDone)
	a.Label("spin")
	a.Jmp("spin")
	dev := &mmioDev{writes: map[uint64]uint32{}}
	rec, _ := run(t, Program{Code: a.MustBytes()}, 1, 4<<20, func(m *machine.Machine, _ *recorder) {
		if err := m.MMIO.Register("test", base, 0x1000, dev); err != nil {
			t.Fatal(err)
		}
	})
	if dev.writes[0] != 0xDEADBEEF {
		t.Errorf("MMIO write at +0 = %#x, want 0xdeadbeef", dev.writes[0])
	}
	if len(rec.reports) != 1 || rec.reports[0] != 0x55AA0004 {
		t.Errorf("guest read %#x from MMIO, want 0x55aa0004", rec.reports)
	}
}

// TestMemoryPattern has the guest write a distinct 64-bit pattern to every
// qword of RAM above its own code and data, read it all back, and report
// mismatches; the host then checks every qword too.
func TestMemoryPattern(t *testing.T) {
	const mem = 64 << 20
	const seed = 0x9E3779B97F4A7C15
	a := NewAsm()
	// pattern(addr) = addr * seed
	a.MovImm(RCX, seed)
	a.MovImm(RBX, DataAddr)
	a.MovImm(RDX, mem)
	a.Label("write")
	a.Mov(RAX, RBX)
	a.Imul(RAX, RCX)
	a.Store(RBX, RAX)
	a.AddImm(RBX, 8)
	a.Cmp(RBX, RDX)
	a.J(Below, "write")
	a.MovImm(RBX, DataAddr)
	a.Xor(R8, R8) // mismatches
	a.Label("verify")
	a.Mov(RAX, RBX)
	a.Imul(RAX, RCX)
	a.Load(R9, RBX)
	a.Cmp(R9, RAX)
	a.J(Equal, "ok")
	a.Inc(R8)
	a.Label("ok")
	a.AddImm(RBX, 8)
	a.Cmp(RBX, RDX)
	a.J(Below, "verify")
	a.Mov(RAX, R8)
	a.Out(portReport)
	a.Out(portDone)
	a.Label("spin")
	a.Jmp("spin")
	rec, m := run(t, Program{Code: a.MustBytes()}, 1, mem, nil)
	if len(rec.reports) != 1 || rec.reports[0] != 0 {
		t.Fatalf("guest reported %v mismatches", rec.reports)
	}
	host, err := m.RAM().Slice(DataAddr, mem-DataAddr)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(host); off += 8 {
		addr := uint64(DataAddr + off)
		if got := binary.LittleEndian.Uint64(host[off:]); got != addr*seed {
			t.Fatalf("host sees %#x at %#x, want %#x", got, addr, addr*seed)
		}
	}
}

// TestVCPUsComputeSlices runs one program on 4 vCPUs; each sums i*i over
// its own slice of 0..4M and stores the result at DataAddr + 8*id.
func TestVCPUsComputeSlices(t *testing.T) {
	const ncpu, per = 4, 1 << 20
	a := NewAsm()
	// RDI = id. start = id*per, end = start+per.
	a.MovImm(RCX, per)
	a.Mov(RBX, RDI)
	a.Imul(RBX, RCX)
	a.Mov(RDX, RBX)
	a.Add(RDX, RCX)
	a.Xor(R8, R8)
	a.Label("loop")
	a.Mov(RAX, RBX)
	a.Imul(RAX, RBX)
	a.Add(R8, RAX)
	a.Inc(RBX)
	a.Cmp(RBX, RDX)
	a.J(Below, "loop")
	a.MovImm(R9, DataAddr)
	a.Mov(RAX, RDI)
	a.Shl(RAX, 3)
	a.Add(R9, RAX)
	a.Store(R9, R8)
	a.Mov(RAX, RDI)
	a.Out(portReport)
	a.Out(portDone)
	a.Label("spin")
	a.Jmp("spin")
	rec, m := run(t, Program{Code: a.MustBytes()}, ncpu, 4<<20, nil)
	seen := map[uint32]bool{}
	for _, id := range rec.reports {
		seen[id] = true
	}
	if len(seen) != ncpu {
		t.Fatalf("vCPUs that reported: %v, want all %d", rec.reports, ncpu)
	}
	res, _ := m.RAM().Slice(DataAddr, 8*ncpu)
	for id := 0; id < ncpu; id++ {
		var want uint64
		for i := uint64(id * per); i < uint64((id+1)*per); i++ {
			want += i * i
		}
		if got := binary.LittleEndian.Uint64(res[8*id:]); got != want {
			t.Errorf("vcpu %d computed %d, want %d", id, got, want)
		}
	}
}

// TestLongMode64BitArithmetic checks the guest really executes 64-bit code:
// in 32-bit mode the REX.W prefixes decode as other instructions and the
// stored result would differ.
func TestLongMode64BitArithmetic(t *testing.T) {
	a := NewAsm()
	a.MovImm(RAX, 1)
	a.Shl(RAX, 40)
	a.MovImm(RBX, 0x123456789)
	a.Add(RAX, RBX)
	a.MovImm(R15, 0xFFFFFFFF00000000)
	a.Add(RAX, R15)
	a.MovImm(RCX, DataAddr)
	a.Store(RCX, RAX)
	a.Out(portDone)
	a.Label("spin")
	a.Jmp("spin")
	_, m := run(t, Program{Code: a.MustBytes()}, 1, 4<<20, nil)
	b, _ := m.RAM().Slice(DataAddr, 8)
	hi := uint64(0xFFFFFFFF00000000)
	want := uint64(1<<40) + 0x123456789 + hi // wraps mod 2^64, as in the guest
	if got := binary.LittleEndian.Uint64(b); got != want {
		t.Fatalf("64-bit result %#x, want %#x", got, want)
	}
}

// TestStopKicksSpinningVCPUs checks that vCPUs spinning in the guest leave
// KVM_RUN when the machine is stopped (immediate_exit + signal), with the
// in-kernel irqchip as a Linux guest uses it.
func TestStopKicksSpinningVCPUs(t *testing.T) {
	requireKVM(t)
	a := NewAsm()
	a.Out(portReport)
	a.Label("spin")
	a.Jmp("spin")
	m, err := machine.New(machine.Config{CPUs: 2, MemBytes: 4 << 20, Loader: Program{Code: a.MustBytes()}, InKernelIRQChip: true})
	if err != nil {
		t.Fatalf("machine.New: %v", err)
	}
	defer m.Close()
	started := make(chan struct{}, 2)
	if err := m.IO.Register("start", portReport, 1, startDev(started)); err != nil {
		t.Fatal(err)
	}
	go func() {
		<-started
		<-started
		// Both vCPUs are now spinning in guest mode.
		m.Pause()
		m.Resume()
		m.Stop(machine.ExitStopped, "test stop", nil)
	}()
	exit := m.Run(context.Background())
	if exit.Kind != machine.ExitStopped || exit.Reason != "test stop" {
		t.Fatalf("exit = %+v, want stopped by the test", exit)
	}
}

type startDev chan struct{}

func (s startDev) Read(uint64, []byte)  {}
func (s startDev) Write(uint64, []byte) { s <- struct{}{} }

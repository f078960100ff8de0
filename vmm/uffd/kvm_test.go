package uffd_test

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
	mg "github.com/hpcvm/hpcvm/vmm/microguest"
	"github.com/hpcvm/hpcvm/vmm/uffd"
	"golang.org/x/sys/unix"
)

const (
	portReport = 0x10
	portDone   = 0x11
)

// reporter records port writes and stops the machine on the done port.
type reporter struct {
	mu      sync.Mutex
	reports []uint64
	m       *machine.Machine
}

func (r *reporter) Read(uint64, []byte) {}
func (r *reporter) Write(off uint64, data []byte) {
	var b [8]byte
	copy(b[:], data)
	r.mu.Lock()
	defer r.mu.Unlock()
	if off == 0 {
		r.reports = append(r.reports, binary.LittleEndian.Uint64(b[:]))
		return
	}
	go r.m.Stop(machine.ExitPoweroff, "guest done", nil)
}

// TestKVMGuestPagesServedByUFFD runs a CPL3 micro-guest on RAM registered
// with userfaultfd (missing + write-protect): every page it, KVM or the
// loader touches is supplied by the handler below; data pages carry a
// per-page pattern and are installed write-protected, and the guest's
// writes to them must come back as WP faults.
func TestKVMGuestPagesServedByUFFD(t *testing.T) {
	if _, err := os.Stat(kvm.DevicePath); err != nil {
		t.Skipf("needs %s: %v", kvm.DevicePath, err)
	}
	u, err := uffd.Open(uffd.FeaturePagefaultFlagWP, uffd.FeatureThreadID)
	if err != nil {
		t.Skipf("userfaultfd unavailable (needs root): %v", err)
	}
	defer u.Close()
	const mem = 8 << 20
	const dataPages = 512 // 2 MiB of pattern pages
	ram, err := memory.NewRAM(mem, layout.MMIOGapStart)
	if err != nil {
		t.Fatal(err)
	}
	defer ram.Close()
	reg := ram.Regions()[0]
	base := uffd.Addr(reg.Host)
	// THP would map 2 MiB at once and hide per-page faults.
	if err := unix.Madvise(reg.Host, unix.MADV_NOHUGEPAGE); err != nil {
		t.Fatal(err)
	}

	// Guest: sum the first qword of every data page, then write the sum
	// into the first qword of page 0 of the data area (a WP fault).
	a := mg.NewAsm()
	a.MovImm(mg.RBX, mg.DataAddr)
	a.MovImm(mg.RDX, mg.DataAddr+dataPages*memory.PageSize)
	a.Xor(mg.R8, mg.R8)
	a.Label("loop")
	a.Load(mg.RAX, mg.RBX)
	a.Add(mg.R8, mg.RAX)
	a.AddImm(mg.RBX, memory.PageSize)
	a.Cmp(mg.RBX, mg.RDX)
	a.J(mg.Below, "loop")
	a.MovImm(mg.RBX, mg.DataAddr)
	a.Store(mg.RBX, mg.R8)
	a.Mov(mg.RAX, mg.R8)
	a.Out(portReport)
	a.Out(portDone)
	a.Label("spin")
	a.Jmp("spin")

	// Load the program before registering: a Go goroutine must never fault
	// on registered memory in user mode (a memmove blocked in a fault is not
	// preemptible, so a GC stop-the-world would wait on it while the
	// handler goroutine is stopped).
	prog := mg.Program{Code: a.MustBytes()}
	if err := prog.Load(ram, 1); err != nil {
		t.Fatal(err)
	}
	if err := u.Register(base, uint64(len(reg.Host)), uffd.ModeMissing|uffd.ModeWP); err != nil {
		t.Fatal(err)
	}

	var missing, wp atomic.Int64
	wpWrites := make(map[uint64]bool)
	var wpMu sync.Mutex
	handlerDone := make(chan error, 1)
	go func() {
		evs := make([]uffd.Event, 16)
		page := make([]byte, memory.PageSize)
		for {
			n, err := u.ReadEvents(evs)
			if errors.Is(err, uffd.ErrClosed) {
				handlerDone <- nil
				return
			}
			if err != nil {
				handlerDone <- err
				return
			}
			for _, ev := range evs[:n] {
				addr := ev.Address &^ (memory.PageSize - 1)
				gpa := addr - uint64(base)
				if ev.WP() {
					wp.Add(1)
					wpMu.Lock()
					wpWrites[gpa] = ev.Write()
					wpMu.Unlock()
					if err := u.WriteProtect(uintptr(addr), memory.PageSize, false, false); err != nil {
						handlerDone <- err
						return
					}
					continue
				}
				missing.Add(1)
				clear(page)
				isData := gpa >= mg.DataAddr && gpa < mg.DataAddr+dataPages*memory.PageSize
				if isData {
					binary.LittleEndian.PutUint64(page, gpa*3+1)
				}
				if err := u.Copy(uintptr(addr), page, isData, false); err != nil && !errors.Is(err, uffd.ErrExist) {
					handlerDone <- err
					return
				}
			}
		}
	}()

	m, err := machine.New(machine.Config{CPUs: 1, MemBytes: mem, Loader: setupOnly{prog}, RAM: ram})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	rep := &reporter{m: m}
	if err := m.IO.Register("report", portReport, 2, rep); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exit := m.Run(ctx)
	if exit.Kind != machine.ExitPoweroff {
		t.Fatalf("exit %v: %s (%v)", exit.Kind, exit.Reason, exit.Err)
	}
	var want uint64
	for i := uint64(0); i < dataPages; i++ {
		want += (mg.DataAddr+i*memory.PageSize)*3 + 1
	}
	if len(rep.reports) != 1 || rep.reports[0] != want {
		t.Fatalf("guest sum %v, want [%d]", rep.reports, want)
	}
	if got := binary.LittleEndian.Uint64(reg.Host[mg.DataAddr:]); got != want {
		t.Fatalf("stored sum %d, want %d", got, want)
	}
	if missing.Load() < dataPages {
		t.Fatalf("%d missing faults, want at least %d (one per data page)", missing.Load(), dataPages)
	}
	wpMu.Lock()
	w, ok := wpWrites[mg.DataAddr]
	wpMu.Unlock()
	if !ok || !w {
		t.Fatalf("no WP write fault for the guest's store to %#x (wp faults: %d)", mg.DataAddr, wp.Load())
	}
	u.Close()
	if err := <-handlerDone; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d missing faults, %d wp faults served", missing.Load(), wp.Load())
}

// setupOnly is a loader whose image is already in memory.
type setupOnly struct{ mg.Program }

func (setupOnly) Load(*memory.RAM, int) error { return nil }

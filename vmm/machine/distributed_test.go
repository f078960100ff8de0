package machine_test

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/microguest"
)

// testHooks swallows writes to port 0x20 (recording them) and lets the
// rest reach the buses; vCPU 1 idles in BeforeRun until woken.
type testHooks struct {
	m         *machine.Machine
	before    atomic.Int64
	mu        sync.Mutex
	swallowed []uint32
	wake      chan struct{}
	idled     chan struct{}
	idleOnce  sync.Once
}

func (h *testHooks) BeforeRun(c *kvm.VCPU) error {
	h.before.Add(1)
	if c.ID() == 1 {
		h.idleOnce.Do(func() {
			close(h.idled)
			h.m.Idle(h.wake)
		})
	}
	return nil
}

func (h *testHooks) HandleExit(c *kvm.VCPU, e *kvm.Exit) (bool, error) {
	if e.Reason == kvm.ExitIO && e.Port == 0x20 {
		h.mu.Lock()
		h.swallowed = append(h.swallowed, binary.LittleEndian.Uint32(e.IOData))
		h.mu.Unlock()
		return true, nil
	}
	return false, nil
}

type doneCounter struct {
	m     *machine.Machine
	n     atomic.Int64
	total int64
}

func (d *doneCounter) Read(uint64, []byte) {}
func (d *doneCounter) Write(uint64, []byte) {
	if d.n.Add(1) == d.total {
		d.m.Stop(machine.ExitPoweroff, "done", nil) // on the vCPU thread: done before Run returns
	}
}

func requireKVM(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(kvm.DevicePath); err != nil {
		t.Skipf("needs %s: %v", kvm.DevicePath, err)
	}
	if s, err := kvm.Open(); err != nil {
		t.Skipf("needs a usable %s (root): %v", kvm.DevicePath, err)
	} else {
		s.Close()
	}
}

// TestHooks: the exit hook sees port I/O first and can claim it; a vCPU
// idling in BeforeRun counts as parked (Pause returns) and runs once woken.
func TestHooks(t *testing.T) {
	requireKVM(t)
	a := microguest.NewAsm()
	a.Mov(microguest.RAX, microguest.RDI)
	a.AddImm(microguest.RAX, 100)
	a.Out(0x20) // claimed by the hook
	a.Out(0x21) // reaches the bus
	a.Label("spin")
	a.Pause()
	a.Jmp("spin")
	h := &testHooks{wake: make(chan struct{}), idled: make(chan struct{})}
	m, err := machine.New(machine.Config{CPUs: 2, MemBytes: 4 << 20, Loader: microguest.Program{Code: a.MustBytes()}, Hooks: h})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	h.m = m
	done := &doneCounter{m: m, total: 2}
	if err := m.IO.Register("done", 0x21, 1, done); err != nil {
		t.Fatal(err)
	}
	go func() {
		<-h.idled
		for done.n.Load() < 1 {
			time.Sleep(time.Millisecond)
		}
		m.Pause() // vCPU 1 is idle: must not wait for it
		m.Resume()
		close(h.wake)
	}()
	ctx, cancel := context.WithTimeoutCause(context.Background(), time.Minute, errors.New("hooks test did not finish"))
	defer cancel()
	exit := m.Run(ctx)
	if exit.Kind != machine.ExitPoweroff {
		t.Fatalf("exit %+v", exit)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.swallowed) != 2 || h.swallowed[0]+h.swallowed[1] != 201 {
		t.Fatalf("hook claimed %v, want 100 and 101", h.swallowed)
	}
	if h.before.Load() < 4 {
		t.Fatalf("BeforeRun called %d times, want at least once per exit", h.before.Load())
	}
}

// niceHooks records the nice value of the thread each vCPU runs on (read
// in BeforeRun, which runs on that thread).
type niceHooks struct {
	mu   sync.Mutex
	nice map[int]int
}

func (h *niceHooks) BeforeRun(c *kvm.VCPU) error {
	// getpriority(2) on Linux: PRIO_PROCESS with 0 is the calling thread,
	// and the raw system call returns 20 - nice.
	p, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.nice[c.ID()] = 20 - p
	h.mu.Unlock()
	return nil
}

func (h *niceHooks) HandleExit(*kvm.VCPU, *kvm.Exit) (bool, error) { return false, nil }

// TestVCPUNiceLowersOnlyVCPUThreads: with Config.VCPUNice the vCPU threads
// run niced and the process's other threads keep their priority (the
// threads that serve a distributed VM's peers).
func TestVCPUNiceLowersOnlyVCPUThreads(t *testing.T) {
	requireKVM(t)
	a := microguest.NewAsm()
	a.Out(0x21)
	a.Label("spin")
	a.Pause()
	a.Jmp("spin")
	h := &niceHooks{nice: map[int]int{}}
	m, err := machine.New(machine.Config{CPUs: 2, MemBytes: 4 << 20, Loader: microguest.Program{Code: a.MustBytes()},
		Hooks: h, VCPUNice: 7})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	done := &doneCounter{m: m, total: 2}
	if err := m.IO.Register("done", 0x21, 1, done); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if exit := m.Run(ctx); exit.Kind != machine.ExitPoweroff {
		t.Fatalf("exit %+v", exit)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.nice[0] != 7 || h.nice[1] != 7 {
		t.Errorf("vCPU threads' nice %v, want 7 on both", h.nice)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if p, err := unix.Getpriority(unix.PRIO_PROCESS, 0); err != nil || 20-p != 0 {
		t.Errorf("a non-vCPU thread has nice %d (%v), want 0", 20-p, err)
	}
}

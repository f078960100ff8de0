package machine_test

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

// TestHooks: the exit hook sees port I/O first and can claim it; a vCPU
// idling in BeforeRun counts as parked (Pause returns) and runs once woken.
func TestHooks(t *testing.T) {
	if _, err := os.Stat(kvm.DevicePath); err != nil {
		t.Skipf("needs %s: %v", kvm.DevicePath, err)
	}
	if s, err := kvm.Open(); err != nil {
		t.Skipf("needs a usable %s (root): %v", kvm.DevicePath, err)
	} else {
		s.Close()
	}
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

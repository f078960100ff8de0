package microguest_test

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/hpcvm/hpcvm/vmm/machine"
	. "github.com/hpcvm/hpcvm/vmm/microguest"
)

// TestSaveRestoreMidComputation pauses a guest in the middle of a loop that
// keeps its state in registers, saves the KVM state and RAM, restores both
// into a new machine, and checks the computation finishes there with the
// exact result.
func TestSaveRestoreMidComputation(t *testing.T) {
	requireKVM(t)
	const n = 1 << 31
	a := NewAsm()
	a.Out(portReport) // "started"
	a.Xor(RBX, RBX)
	a.Xor(R12, R12)
	a.MovImm(RDX, n)
	a.Label("loop")
	a.Inc(RBX)
	a.Add(R12, RBX) // R12 = sum 1..RBX
	a.Cmp(RBX, RDX)
	a.J(Below, "loop")
	a.MovImm(RCX, DataAddr)
	a.Store(RCX, R12)
	a.Out(portDone)
	a.Label("spin")
	a.Jmp("spin")
	prog := Program{Code: a.MustBytes()}
	cfg := machine.Config{CPUs: 1, MemBytes: 4 << 20, Loader: prog, InKernelIRQChip: true}

	m1, err := machine.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m1.Close()
	started := make(chan struct{}, 1)
	m1.IO.Register("start", portReport, 1, startDev(started))
	m1.IO.Register("done", portDone, 1, startDev(make(chan struct{}, 1)))
	type saved struct {
		st  *machine.State
		ram []byte
		err error
	}
	res := make(chan saved, 1)
	go func() {
		<-started
		time.Sleep(20 * time.Millisecond) // let the loop get going
		m1.Pause()
		st, err := m1.SaveState()
		var ram []byte
		if err == nil {
			b, _ := m1.RAM().Slice(0, 4<<20)
			ram = append([]byte(nil), b...)
		}
		res <- saved{st, ram, err}
		m1.Stop(machine.ExitStopped, "saved", nil)
	}()
	m1.Run(context.Background())
	s := <-res
	if s.err != nil {
		t.Fatalf("SaveState: %v", s.err)
	}
	rbx := s.st.VCPUs[0].Regs.RBX
	if rbx == 0 || rbx >= n {
		t.Fatalf("saved RBX = %d: the guest was not paused mid-loop", rbx)
	}

	m2, err := machine.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if err := m2.RestoreState(s.st); err != nil {
		t.Fatalf("RestoreState: %v", err)
	}
	dst, _ := m2.RAM().Slice(0, 4<<20)
	copy(dst, s.ram)
	rec := &recorder{ncpu: 1, m: m2}
	m2.IO.Register("test", portReport, 4, rec)
	exit := m2.Run(context.Background())
	if exit.Kind != machine.ExitPoweroff {
		t.Fatalf("restored machine: %v %s", exit.Kind, exit.Reason)
	}
	b, _ := m2.RAM().Slice(DataAddr, 8)
	want := uint64(n) * (n + 1) / 2
	if got := binary.LittleEndian.Uint64(b); got != want {
		t.Fatalf("restored guest computed %d, want %d", got, want)
	}
	if len(rec.reports) != 0 {
		t.Fatalf("restored guest re-ran its start (reports %v): registers were not restored", rec.reports)
	}
	t.Logf("paused at iteration %d of %d, finished after restore", rbx, uint64(n))
}

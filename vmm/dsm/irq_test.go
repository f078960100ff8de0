package dsm

import (
	"encoding/binary"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hpcvm/hpcvm/vmm/irqchip"
	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
	mg "github.com/hpcvm/hpcvm/vmm/microguest"
)

// Interrupt micro-guests. On this PVM host an interrupt handler runs at
// CPL0, which KVM emulates instruction by instruction (~1M/s): handlers
// are a handful of instructions. Memory map additions to the micro-guest
// layout (all below its code at 0x10000 or in the free 0x80000-0xFFFFF):
const (
	idtAddr        = 0x8000 // 256 gates
	handlerBase    = 0x9000 // handler i at handlerBase + 0x100*i
	tssBase        = 0xA000 // vCPU i's 64-bit TSS at tssBase + 0x80*i
	trampolineAddr = 0xC000 // real-mode code a startup IPI (vector 0x0C) runs
	kstackTop      = 0xC0000
	kernelCS       = 1 << 3
)

// irqGuest is a micro-guest with an IDT and CPL0 interrupt handlers.
type irqGuest struct {
	prog     mg.Program
	handlers map[uint8][]byte // vector -> CPL0 code ending in iretq
	waitSIPI map[int]bool     // vCPUs that wait for INIT/SIPI
	tramp    []byte           // real-mode code at trampolineAddr
}

func (g irqGuest) Load(mem *memory.RAM, ncpu int) error {
	if err := g.prog.Load(mem, ncpu); err != nil {
		return err
	}
	var gdt [16]byte
	binary.LittleEndian.PutUint64(gdt[0:], 0x00AF9A000000FFFF) // 64-bit code, DPL0
	binary.LittleEndian.PutUint64(gdt[8:], 0x00CF92000000FFFF) // data, DPL0
	if _, err := mem.WriteAt(gdt[:], mg.GDTAddr+8); err != nil {
		return err
	}
	idt := make([]byte, 256*16)
	i := 0
	for vec, code := range g.handlers {
		at := uint64(handlerBase + 0x100*i)
		i++
		if len(code) > 0x100 {
			panic("handler too long")
		}
		if _, err := mem.WriteAt(code, int64(at)); err != nil {
			return err
		}
		e := idt[int(vec)*16:]
		binary.LittleEndian.PutUint16(e[0:], uint16(at))
		binary.LittleEndian.PutUint16(e[2:], kernelCS)
		e[5] = 0x8E // present, DPL0, 64-bit interrupt gate
		binary.LittleEndian.PutUint16(e[6:], uint16(at>>16))
		binary.LittleEndian.PutUint32(e[8:], uint32(at>>32))
	}
	if _, err := mem.WriteAt(idt, idtAddr); err != nil {
		return err
	}
	for id := 0; id < ncpu; id++ {
		var rsp0 [8]byte
		binary.LittleEndian.PutUint64(rsp0[:], uint64(kstackTop-id*0x1000))
		if _, err := mem.WriteAt(rsp0[:], int64(tssBase+0x80*id+4)); err != nil {
			return err
		}
	}
	if g.tramp != nil {
		if _, err := mem.WriteAt(g.tramp, trampolineAddr); err != nil {
			return err
		}
	}
	return nil
}

func (g irqGuest) SetupVCPU(id, ncpu int, regs *kvm.Regs, sregs *kvm.Sregs) bool {
	if g.waitSIPI[id] {
		return false
	}
	g.prog.SetupVCPU(id, ncpu, regs, sregs)
	sregs.IDT = kvm.Descriptor{Base: idtAddr, Limit: 256*16 - 1}
	sregs.TR.Base = uint64(tssBase + 0x80*id) // a TSS (RSP0) per vCPU
	regs.RFLAGS |= 1 << 9                     // IF
	return true
}

// Raw encodings the assembler lacks.
var (
	pushRAX = []byte{0x50}
	pushRBX = []byte{0x53}
	pushRDX = []byte{0x52}
	popRAX  = []byte{0x58}
	popRBX  = []byte{0x5B}
	popRDX  = []byte{0x5A}
	iretq   = []byte{0x48, 0xCF}
)

// lapicReg is a local APIC register's guest-physical address.
func lapicReg(off uint64) uint64 { return layout.LAPICAddr + off }

// writeLAPIC emits mov dword [reg], imm (clobbers RAX, RBX).
func writeLAPIC(a *mg.Asm, reg uint64, v uint32) {
	a.MovImm(mg.RBX, lapicReg(reg))
	a.MovImm(mg.RAX, uint64(v))
	a.Store32(mg.RBX, mg.RAX)
}

// countingHandler: lock inc [counter]; optionally out port (forwarded from
// other slices); EOI unless nmi; iretq. Preserves RAX, RBX, RDX.
func countingHandler(counter uint64, port uint16, eoi bool) []byte {
	a := mg.NewAsm()
	a.Raw(pushRAX...)
	a.Raw(pushRBX...)
	a.Raw(pushRDX...)
	a.MovImm(mg.RBX, counter)
	a.LockInc(mg.RBX)
	if port != 0 {
		a.Out(port)
	}
	if eoi {
		writeLAPIC(a, irqchip.RegEOI, 0)
	}
	a.Raw(popRDX...)
	a.Raw(popRBX...)
	a.Raw(popRAX...)
	a.Raw(iretq...)
	return a.MustBytes()
}

// waitCounter spins until [addr] >= the value in reg (clobbers RAX).
func waitCounter(a *mg.Asm, addr uint64, reg mg.Reg, tag string) {
	a.MovImm(mg.RBX, addr)
	a.Label(tag)
	a.Pause()
	a.Load(mg.RAX, mg.RBX)
	a.Cmp(mg.RAX, reg)
	a.J(mg.Below, tag)
}

const (
	ipiVector   = 0x40
	ioapicVec   = 0x51
	timerVector = 0x62
	nmiCounter  = pageD + 0x100
	ipiCounter  = pageB
	irqCounter  = pageC
	tickCounter = pageC + 0x100
	readyFlag   = pageA
	lineOnPort  = 0x70 // write: the test device asserts IOAPIC pin 5
	lineOffPort = 0x71 // write: ... releases it
	ioapicPin   = 5
)

// ipiProgram: vCPU 0 (the target) enables its local APIC, raises the
// ready flag and waits until its handler counted n IPIs and n NMIs. vCPU
// 1 (the sender) waits for the flag, then n times sends a fixed IPI to
// vCPU 0 and waits for the count to move, and then n NMIs likewise.
// Other vCPUs just finish.
func ipiProgram(n int) []byte {
	a := mg.NewAsm()
	a.Xor(mg.R13, mg.R13)
	a.Cmp(mg.RDI, mg.R13)
	a.J(mg.Equal, "target")
	a.MovImm(mg.R10, 1)
	a.Cmp(mg.RDI, mg.R10)
	a.J(mg.Equal, "sender")
	a.Jmp("end")

	a.Label("target")
	writeLAPIC(a, irqchip.RegSVR, 0x1FF)
	a.MovImm(mg.RBX, readyFlag)
	a.MovImm(mg.RAX, 1)
	a.Store(mg.RBX, mg.RAX)
	a.MovImm(mg.R8, uint64(n))
	waitCounter(a, ipiCounter, mg.R8, "t_ipi")
	waitCounter(a, nmiCounter, mg.R8, "t_nmi")
	a.Jmp("end")

	a.Label("sender")
	a.MovImm(mg.R8, 1)
	waitCounter(a, readyFlag, mg.R8, "s_ready")
	a.MovImm(mg.R8, 1)
	a.Label("s_loop")
	writeLAPIC(a, irqchip.RegICRHigh, 0<<24)
	writeLAPIC(a, irqchip.RegICRLow, uint32(irqchip.Fixed)<<8|ipiVector)
	waitCounter(a, ipiCounter, mg.R8, "s_wait")
	a.Inc(mg.R8)
	a.MovImm(mg.RAX, uint64(n))
	a.Cmp(mg.R8, mg.RAX)
	a.J(mg.BelowOrEqual, "s_loop")
	a.MovImm(mg.R8, 1)
	a.Label("s_nmi")
	writeLAPIC(a, irqchip.RegICRLow, uint32(irqchip.NMI)<<8)
	waitCounter(a, nmiCounter, mg.R8, "s_nwait")
	a.Inc(mg.R8)
	a.MovImm(mg.RAX, uint64(n))
	a.Cmp(mg.R8, mg.RAX)
	a.J(mg.BelowOrEqual, "s_nmi")

	a.Label("end")
	return finish(a)
}

func readQword(t *testing.T, g memory.Guest, addr uint64) uint64 {
	var b [8]byte
	if _, err := g.ReadAt(b[:], int64(addr)); err != nil {
		t.Errorf("reading %#x: %v", addr, err)
	}
	return binary.LittleEndian.Uint64(b[:])
}

// TestCrossSliceIPI: a vCPU on slice 1 sends fixed IPIs and NMIs to a
// vCPU on slice 0 through its emulated local APIC's ICR; the target's CPL0
// handlers count them (and EOI). Each IPI is only sent once the previous
// one was handled, so every one must arrive exactly once.
func TestCrossSliceIPI(t *testing.T) {
	n := scaled(20)
	var ipis, nmis uint64
	res := runCustom(t, customVM{
		placement: [][]int{{0}, {1}},
		loader: irqGuest{prog: mg.Program{Code: ipiProgram(n)}, handlers: map[uint8][]byte{
			ipiVector: countingHandler(ipiCounter, 0, true),
			2:         countingHandler(nmiCounter, 0, false), // NMI: no EOI
		}},
		finish: func(g memory.Guest) error {
			ipis, nmis = readQword(t, g, ipiCounter), readQword(t, g, nmiCounter)
			return nil
		},
	})
	if ipis != uint64(n) || nmis != uint64(n) {
		t.Fatalf("handler counted %d IPIs and %d NMIs, want %d each", ipis, nmis, n)
	}
	if res[1].Stats.IRQsSent != int64(2*n) || res[0].Stats.IRQsReceived != int64(2*n) {
		t.Fatalf("interrupt messages: slice 1 sent %d, slice 0 received %d; want %d", res[1].Stats.IRQsSent, res[0].Stats.IRQsReceived, 2*n)
	}
}

// lineDev drives IOAPIC pin 5 from port writes.
type lineDev struct {
	io          *irqchip.IOAPIC
	ons, offs   atomic.Int64
	mu          sync.Mutex
	assertedNow bool
}

func (d *lineDev) Read(uint64, []byte) {}
func (d *lineDev) Write(off uint64, _ []byte) {
	if off == 0 {
		d.ons.Add(1)
		d.io.SetLevel(ioapicPin, true)
	} else {
		d.offs.Add(1)
		d.io.SetLevel(ioapicPin, false)
	}
}

// ioapicProgram: vCPU 1 enables its local APIC, programs IOAPIC pin 5
// (level-triggered, vector ioapicVec, to APIC 1) through the IOAPIC's
// MMIO window, then n times asks the device to assert the line and waits
// until its handler (which releases the line and EOIs) counted it.
func ioapicProgram(n int) []byte {
	a := mg.NewAsm()
	a.MovImm(mg.R10, 1)
	a.Cmp(mg.RDI, mg.R10)
	a.J(mg.NotEqual, "end")
	writeLAPIC(a, irqchip.RegSVR, 0x1FF)
	ioapicWrite := func(reg, v uint32) {
		a.MovImm(mg.RBX, layout.IOAPICAddr+irqchip.IOAPICRegSel)
		a.MovImm(mg.RAX, uint64(reg))
		a.Store32(mg.RBX, mg.RAX)
		a.MovImm(mg.RBX, layout.IOAPICAddr+irqchip.IOAPICWin)
		a.MovImm(mg.RAX, uint64(v))
		a.Store32(mg.RBX, mg.RAX)
	}
	ioapicWrite(0x10+2*ioapicPin+1, 1<<24)
	ioapicWrite(0x10+2*ioapicPin, ioapicVec|1<<15)
	a.MovImm(mg.R8, 1)
	a.Label("loop")
	a.Out(lineOnPort)
	waitCounter(a, irqCounter, mg.R8, "wait")
	a.Inc(mg.R8)
	a.MovImm(mg.RAX, uint64(n))
	a.Cmp(mg.R8, mg.RAX)
	a.J(mg.BelowOrEqual, "loop")
	a.Label("end")
	return finish(a)
}

// TestIOAPICLevelAcrossSlices: a device on slice 0 raises a level-triggered
// IOAPIC input routed to a vCPU on slice 1; the handler there releases the
// line (a port write forwarded to slice 0) and EOIs, which must reach the
// IOAPIC on slice 0 (remote IRR) before the next assertion is delivered.
func TestIOAPICLevelAcrossSlices(t *testing.T) {
	n := scaled(20)
	dev := &lineDev{}
	var count uint64
	var ioapic *irqchip.IOAPIC
	runCustom(t, customVM{
		placement: [][]int{{0}, {1}},
		loader: irqGuest{prog: mg.Program{Code: ioapicProgram(n)}, handlers: map[uint8][]byte{
			ioapicVec: countingHandler(irqCounter, lineOffPort, true),
		}},
		setup: func(h *Home) error {
			dev.io, ioapic = h.IOAPIC, h.IOAPIC
			return h.Machine.IO.Register("line", lineOnPort, 2, dev)
		},
		finish: func(g memory.Guest) error {
			count = readQword(t, g, irqCounter)
			return nil
		},
	})
	if count != uint64(n) || dev.ons.Load() != int64(n) || dev.offs.Load() != int64(n) {
		t.Fatalf("handler ran %d times; line asserted %d and released %d times; want %d each", count, dev.ons.Load(), dev.offs.Load(), n)
	}
	if d := ioapic.Delivered(ioapicPin); d != n {
		t.Fatalf("IOAPIC delivered pin %d %d times, want %d (once per assertion)", ioapicPin, d, n)
	}
}

// timerProgram: vCPU 1 starts its local APIC timer in periodic mode (a
// 200 us period) and waits for 5 ticks, then masks it.
func timerProgram() []byte {
	a := mg.NewAsm()
	a.MovImm(mg.R10, 1)
	a.Cmp(mg.RDI, mg.R10)
	a.J(mg.NotEqual, "end")
	writeLAPIC(a, irqchip.RegSVR, 0x1FF)
	writeLAPIC(a, irqchip.RegTimerDiv, 0xB) // divide by 1
	writeLAPIC(a, irqchip.RegLVTTimer, timerVector|1<<17)
	writeLAPIC(a, irqchip.RegTimerInit, 200_000)
	a.MovImm(mg.R8, 5)
	waitCounter(a, tickCounter, mg.R8, "wait")
	writeLAPIC(a, irqchip.RegLVTTimer, 1<<16)
	a.Label("end")
	return finish(a)
}

// TestLAPICTimerOnSlice: the emulated local APIC timer (host clock) of a
// vCPU on slice 1 interrupts it periodically.
func TestLAPICTimerOnSlice(t *testing.T) {
	var ticks uint64
	runCustom(t, customVM{
		placement: [][]int{{0}, {1}},
		loader: irqGuest{prog: mg.Program{Code: timerProgram()}, handlers: map[uint8][]byte{
			timerVector: countingHandler(tickCounter, 0, true),
		}},
		finish: func(g memory.Guest) error {
			ticks = readQword(t, g, tickCounter)
			return nil
		},
	})
	if ticks < 5 {
		t.Fatalf("%d timer ticks counted, want at least 5", ticks)
	}
}

// sipiProgram: vCPU 1 sends INIT (assert, then de-assert) and a startup
// IPI with vector 0x0C to APIC 2, which runs the real-mode trampoline.
func sipiProgram() []byte {
	a := mg.NewAsm()
	a.MovImm(mg.R10, 1)
	a.Cmp(mg.RDI, mg.R10)
	a.J(mg.NotEqual, "end")
	writeLAPIC(a, irqchip.RegICRHigh, 2<<24)
	writeLAPIC(a, irqchip.RegICRLow, uint32(irqchip.INIT)<<8|1<<14|1<<15)
	writeLAPIC(a, irqchip.RegICRLow, uint32(irqchip.INIT)<<8|1<<15)
	writeLAPIC(a, irqchip.RegICRLow, uint32(irqchip.StartUp)<<8|trampolineAddr>>12)
	a.Label("end")
	return finish(a)
}

// TestINITSIPIAcrossSlices: vCPU 2 (on slice 0) is created waiting for a
// startup IPI; vCPU 1 on slice 1 wakes it with INIT and SIPI, and it runs
// real-mode code at the SIPI vector's page (reporting and marking itself
// done through port I/O, then halting).
func TestINITSIPIAcrossSlices(t *testing.T) {
	rep := &reportDev{}
	tramp := []byte{
		0xB0, 0x5A, // mov al, 0x5a
		0xE6, portReport, // out 0x10, al
		0xE6, portDone, // out 0x11, al
		0xF4,       // hlt
		0xEB, 0xFD, // jmp back to hlt
	}
	runCustom(t, customVM{
		placement: [][]int{{0, 2}, {1}},
		loader:    irqGuest{prog: mg.Program{Code: sipiProgram()}, waitSIPI: map[int]bool{2: true}, tramp: tramp},
		setup: func(h *Home) error {
			return h.Machine.IO.Register("report", portReport, 1, rep)
		},
	})
	if len(rep.reports) != 1 || rep.reports[0] != 0x5A {
		t.Fatalf("reports %#x, want the trampoline's 0x5a", rep.reports)
	}
}

const (
	deadlineVector = 0x63
	wrmsrVector    = 0x80 // handler: wrmsr(IA32_TSC_DEADLINE, EDX:EAX)
	rdmsrVector    = 0x81 // handler: EDX:EAX = rdmsr(IA32_TSC_DEADLINE)
	deadlineTicks  = pageC + 0x200
)

// selfIPI sends vector to this vCPU through the ICR without touching RAX,
// RDX (clobbers R11, R12). This is how the CPL3 test code enters a CPL0
// handler: on this PVM host `int n` from CPL3 ends in a triple fault,
// while injected interrupts are delivered normally.
func selfIPI(a *mg.Asm, vector uint8) {
	a.MovImm(mg.R11, lapicReg(irqchip.RegICRLow))
	a.MovImm(mg.R12, uint64(vector)|irqchip.Self<<18)
	a.Store32(mg.R11, mg.R12)
}

// msrHandler: ECX = IA32_TSC_DEADLINE, op (wrmsr or rdmsr), EOI, iretq;
// preserves RBX and RCX, and RAX/RDX for a write.
func msrHandler(op ...byte) []byte {
	a := mg.NewAsm()
	a.Raw(pushRBX...)
	a.Raw(0x51) // push rcx
	a.MovImm(mg.RCX, msrTSCDeadline)
	a.Raw(op...)
	a.MovImm(mg.RBX, lapicReg(irqchip.RegEOI))
	a.Store32(mg.RBX, mg.RCX)
	a.Raw(0x59) // pop rcx
	a.Raw(popRBX...)
	a.Raw(iretq...)
	return a.MustBytes()
}

// deadlineProgram: vCPU 1 puts its local APIC timer in TSC-deadline mode,
// arms IA32_TSC_DEADLINE (wrmsr in a CPL0 handler) for now + 100,000 TSC
// cycles, waits for the tick, reads the MSR back (0 once fired) and
// reports it.
func deadlineProgram() []byte {
	a := mg.NewAsm()
	a.MovImm(mg.R10, 1)
	a.Cmp(mg.RDI, mg.R10)
	a.J(mg.NotEqual, "end")
	writeLAPIC(a, irqchip.RegSVR, 0x1FF)
	writeLAPIC(a, irqchip.RegLVTTimer, deadlineVector|2<<17)
	a.Rdtsc()
	a.Shl(mg.RDX, 32)
	a.Add(mg.RAX, mg.RDX)
	a.AddImm(mg.RAX, 100_000)
	a.Mov(mg.RDX, mg.RAX)
	a.Raw(0x48, 0xC1, 0xEA, 0x20) // shr rdx, 32
	selfIPI(a, wrmsrVector)
	a.MovImm(mg.R8, 1)
	waitCounter(a, deadlineTicks, mg.R8, "wait")
	a.MovImm(mg.RAX, 0xDEAD)
	selfIPI(a, rdmsrVector)
	a.Out(portReport)
	a.Label("end")
	return finish(a)
}

// TestTSCDeadlineTimer: IA32_TSC_DEADLINE, trapped to the VMM with an MSR
// filter, arms the emulated local APIC timer, which fires once and then
// reads back 0.
func TestTSCDeadlineTimer(t *testing.T) {
	rep := &reportDev{}
	var ticks uint64
	runCustom(t, customVM{
		placement: [][]int{{0}, {1}},
		loader: irqGuest{prog: mg.Program{Code: deadlineProgram()},
			handlers: map[uint8][]byte{
				deadlineVector: countingHandler(deadlineTicks, 0, true),
				wrmsrVector:    msrHandler(0x0F, 0x30),
				rdmsrVector:    msrHandler(0x0F, 0x32),
			}},
		setup: func(h *Home) error { return h.Machine.IO.Register("report", portReport, 1, rep) },
		finish: func(g memory.Guest) error {
			ticks = readQword(t, g, deadlineTicks)
			return nil
		},
	})
	if ticks != 1 {
		t.Fatalf("TSC-deadline timer fired %d times, want once", ticks)
	}
	if len(rep.reports) != 1 || rep.reports[0] != 0 {
		t.Fatalf("IA32_TSC_DEADLINE read back %#x after firing, want 0", rep.reports)
	}
}

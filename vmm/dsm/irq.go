package dsm

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/hpcvm/hpcvm/vmm/irqchip"
	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/machine"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Interrupts in a distributed VM (docs/dsm.md). KVM's in-kernel irqchip
// only knows the vCPUs of its own process, so slices run without it
// (userspace irqchip mode: no KVM_CREATE_IRQCHIP) and emulate the
// controllers: each slice has the local APICs of its own vCPUs, slice 0
// has the IOAPIC. An interrupt message (an IPI from an ICR write, an
// IOAPIC redirection, an MSI) is resolved to target vCPUs on the sending
// slice, using every local APIC's View (ID, LDR, DFR) which each slice
// keeps for all vCPUs (apic-state messages announce changes); a target on
// another slice gets an interrupt message over the transport. A vCPU takes
// an interrupt in its run loop: before KVM_RUN the highest deliverable
// vector is injected with KVM_INTERRUPT if the last exit said the guest
// can take one, else an interrupt window is requested.

// vcpuIRQ is one local vCPU's interrupt state.
type vcpuIRQ struct {
	id    int
	lapic *irqchip.LAPIC
	wake  chan struct{} // a token when the LAPIC has news (buffered 1)

	// Only touched on the vCPU's thread (and before Run).
	waitSIPI bool   // after INIT (or created not started): waits for a startup IPI
	started  bool   // BeforeRun has run once
	lastCR8  uint64 // CR8 value given to KVM at the last entry

	// For the RIP sampler (profile.go): idle while the vCPU waits in the
	// VMM (halted, or for a startup IPI); sample asks its thread to
	// record its RIP before the next entry.
	idle, sample atomic.Bool
}

// irqState is one slice's share of the VM's interrupt controllers.
type irqState struct {
	s     *sliceRun
	owner []int      // slice running each vCPU
	local []*vcpuIRQ // by vCPU id; nil for other slices' vCPUs

	mu    sync.RWMutex
	views []irqchip.View // every vCPU's destination state

	ioapic *irqchip.IOAPIC // slice 0 only
}

func newIRQState(s *sliceRun) *irqState {
	q := &irqState{s: s, owner: make([]int, s.ncpu), local: make([]*vcpuIRQ, s.ncpu), views: make([]irqchip.View, s.ncpu)}
	for slice, g := range s.cfg.Placement {
		for _, id := range g {
			q.owner[id] = slice
		}
	}
	for id := range q.views {
		q.views[id] = irqchip.ResetView(id)
	}
	for _, id := range s.vcpus {
		v := &vcpuIRQ{id: id, wake: make(chan struct{}, 1)}
		v.lapic = irqchip.NewLAPIC(irqchip.LAPICConfig{ID: id, TimerSlack: s.cfg.TimerSlack,
			Notify:  func() { q.notify(v) },
			Send:    q.deliver,
			EOI:     q.eoi,
			Changed: func(view irqchip.View) { q.viewChanged(id, view) },
		})
		q.local[id] = v
	}
	if s.id == 0 {
		q.ioapic = irqchip.NewIOAPIC(q.deliver)
	}
	return q
}

func (q *irqState) close() {
	for _, v := range q.local {
		if v != nil {
			v.lapic.Close()
		}
	}
}

// notify wakes vCPU v: a token for a halted vCPU, a kick for one in the guest.
func (q *irqState) notify(v *vcpuIRQ) {
	select {
	case v.wake <- struct{}{}:
	default:
	}
	q.s.kick(v.id)
}

// deliver routes an interrupt message to its target vCPUs, wherever they run.
func (q *irqState) deliver(m irqchip.Message) {
	q.mu.RLock()
	targets := irqchip.Targets(m, q.views)
	q.mu.RUnlock()
	if m.Mode == irqchip.StartUp {
		q.s.smpSeen.Store(true)
	}
	for _, t := range targets {
		if q.owner[t] == q.s.id {
			q.local[t].lapic.Accept(m)
			continue
		}
		q.s.node.Stats.IRQsSent.Add(1)
		q.s.node.send(q.owner[t], &Msg{Type: MsgInterrupt, VCPU: uint16(t), Vector: m.Vector, Mode: uint8(m.Mode),
			Level: m.Level, Assert: m.Assert})
	}
}

// eoi forwards a level-triggered EOI to the IOAPIC on slice 0.
func (q *irqState) eoi(vector uint8) {
	if q.ioapic != nil {
		q.ioapic.EOI(vector)
		return
	}
	q.s.node.send(0, &Msg{Type: MsgEOI, Vector: vector})
}

// viewChanged records a local APIC's new destination state and tells the
// other slices.
func (q *irqState) viewChanged(id int, v irqchip.View) {
	q.mu.Lock()
	q.views[id] = v
	q.mu.Unlock()
	for j := 0; j < q.s.n; j++ {
		if j != q.s.id {
			q.s.node.send(j, &Msg{Type: MsgAPICState, VCPU: uint16(id), APICID: v.ID, LDR: v.LDR, DFR: v.DFR})
		}
	}
}

// receive handles the interrupt messages of the transport.
func (q *irqState) receive(from int, m *Msg) error {
	switch m.Type {
	case MsgInterrupt:
		id := int(m.VCPU)
		if id >= len(q.local) || q.local[id] == nil {
			return fmt.Errorf("%w: slice %d sent an interrupt for vCPU %d, which slice %d does not run", ErrProtocol, from, id, q.s.id)
		}
		q.s.node.Stats.IRQsReceived.Add(1)
		q.local[id].lapic.Accept(irqchip.Message{Vector: m.Vector, Mode: irqchip.DeliveryMode(m.Mode), Level: m.Level,
			Assert: m.Assert, Source: -1})
	case MsgEOI:
		if q.ioapic == nil {
			return fmt.Errorf("%w: slice %d sent an EOI to slice %d, which has no IOAPIC", ErrProtocol, from, q.s.id)
		}
		q.ioapic.EOI(m.Vector)
	case MsgAPICState:
		id := int(m.VCPU)
		if id >= len(q.owner) || q.owner[id] != from {
			return fmt.Errorf("%w: slice %d announced the APIC of vCPU %d, which it does not run", ErrProtocol, from, id)
		}
		q.mu.Lock()
		q.views[id] = irqchip.View{ID: m.APICID, LDR: m.LDR, DFR: m.DFR}
		q.mu.Unlock()
	}
	return nil
}

// startLoader records which vCPUs the loader starts; the others wait for
// INIT/SIPI (without the in-kernel LAPIC, KVM would run them at once).
type startLoader struct {
	machine.Loader
	q *irqState
}

func (l startLoader) Load(*memory.RAM, int) error { return nil }

func (l startLoader) SetupVCPU(id, ncpu int, regs *kvm.Regs, sregs *kvm.Sregs) bool {
	start := l.Loader.SetupVCPU(id, ncpu, regs, sregs)
	if start && sregs.CR0&(1<<31) != 0 {
		l.q.s.bootCR3 = append(l.q.s.bootCR3, sregs.CR3) // machine.New, before any vCPU runs
	}
	if v := l.q.local[id]; v != nil {
		v.waitSIPI = !start
	}
	return start
}

// beforeRun is the interrupt part of a vCPU's BeforeRun hook: INIT/SIPI,
// CR8 <-> TPR, NMI and interrupt injection.
func (q *irqState) beforeRun(c *kvm.VCPU, v *vcpuIRQ, m *machine.Machine) (stopping bool, err error) {
	if v.lapic.TakeINIT() {
		v.lapic.Reset()
		if err := setINITState(c); err != nil {
			return false, err
		}
		v.waitSIPI = true
	}
	for v.waitSIPI {
		// An INIT discards earlier SIPIs, so a pending INIT came first.
		if v.lapic.TakeINIT() {
			v.lapic.Reset()
			continue
		}
		if vec, ok := v.lapic.TakeSIPI(); ok {
			if err := setSIPIState(c, vec); err != nil {
				return false, err
			}
			v.waitSIPI = false
			q.s.smpSeen.Store(true)
			break
		}
		if q.idle(v, m) {
			return true, nil
		}
	}
	v.lapic.TakeSIPI() // ignored by a vCPU that is not waiting for one
	if cr8 := c.CR8(); cr8 != v.lastCR8 {
		v.lapic.SetTPR(uint8(cr8 << 4))
	}
	if v.lapic.TakeNMI() {
		if err := c.NMI(); err != nil {
			return false, err
		}
	}
	vec, pending := v.lapic.PendingInterrupt()
	if pending && c.ReadyForInterruptInjection() {
		v.lapic.AckInterrupt(vec)
		if err := c.Interrupt(vec); err != nil {
			return false, err
		}
		_, pending = v.lapic.PendingInterrupt()
	}
	c.SetRequestInterruptWindow(pending)
	v.lastCR8 = uint64(v.lapic.TPR() >> 4)
	c.SetCR8(v.lastCR8)
	return false, nil
}

// MSRs the slices emulate (trapped with an MSR filter).
const (
	msrTSC         = 0x10
	msrTSCDeadline = 0x6E0
)

// msr answers a trapped MSR access: IA32_TSC_DEADLINE goes to the local
// APIC timer (KVM ignores it without its own LAPIC).
func (q *irqState) msr(c *kvm.VCPU, v *vcpuIRQ, write bool) error {
	idx, data := c.MSRExit()
	if idx != msrTSCDeadline {
		c.CompleteMSRExit(0, true) // not ours: #GP, as KVM would
		return nil
	}
	if !write {
		c.CompleteMSRExit(v.lapic.TSCDeadline(), false)
		return nil
	}
	now, err := c.GetMSRs([]uint32{msrTSC})
	if err != nil || len(now) != 1 {
		return fmt.Errorf("vcpu %d: reading the TSC for a TSC-deadline write: %v", c.ID(), err)
	}
	v.lapic.SetTSCDeadline(data, now[0].Data)
	c.CompleteMSRExit(0, false)
	return nil
}

// halt waits, for a vCPU that executed HLT, until it has something to
// take (or the machine stops).
func (q *irqState) halt(c *kvm.VCPU, v *vcpuIRQ, m *machine.Machine) {
	for !v.lapic.HasWork(c.InterruptFlag()) {
		if q.idle(v, m) {
			return
		}
	}
}

// idle waits in the VMM for v's next wake-up (machine.Idle), marked idle
// for the RIP sampler.
func (q *irqState) idle(v *vcpuIRQ, m *machine.Machine) (stopping bool) {
	v.idle.Store(true)
	defer v.idle.Store(false)
	return m.Idle(v.wake)
}

// setINITState puts a vCPU in the state INIT leaves it in (SDM 9.1.1).
func setINITState(c *kvm.VCPU) error {
	s, err := c.GetSregs()
	if err != nil {
		return err
	}
	data := kvm.Segment{Limit: 0xFFFF, Typ: 3, Present: 1, S: 1}
	s.CS = kvm.Segment{Selector: 0xF000, Base: 0xFFFF0000, Limit: 0xFFFF, Typ: 0xB, Present: 1, S: 1}
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = kvm.Segment{Limit: 0xFFFF, Typ: 0xB, Present: 1}
	s.LDT = kvm.Segment{Limit: 0xFFFF, Typ: 2, Present: 1}
	s.GDT = kvm.Descriptor{Limit: 0xFFFF}
	s.IDT = kvm.Descriptor{Limit: 0xFFFF}
	s.CR0, s.CR2, s.CR3, s.CR4, s.EFER = 0x60000010, 0, 0, 0, 0
	if err := c.SetSregs(s); err != nil {
		return err
	}
	return c.SetRegs(kvm.Regs{RFLAGS: 2, RIP: 0xFFF0})
}

// setSIPIState starts a vCPU waiting for SIPI at vector*4096 in real mode.
func setSIPIState(c *kvm.VCPU, vec uint8) error {
	if err := setINITState(c); err != nil {
		return err
	}
	s, err := c.GetSregs()
	if err != nil {
		return err
	}
	s.CS.Selector, s.CS.Base = uint16(vec)<<8, uint64(vec)<<12
	if err := c.SetSregs(s); err != nil {
		return err
	}
	return c.SetRegs(kvm.Regs{RFLAGS: 2, RIP: 0})
}

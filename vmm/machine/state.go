package machine

import (
	"errors"
	"fmt"

	"github.com/hpcvm/hpcvm/vmm/kvm"
)

// StateVersion is the version of VCPUState and State. Bump it when a field
// changes meaning; Restore refuses states it does not understand.
const StateVersion = 1

// VCPUState is everything KVM holds for one vCPU.
type VCPUState struct {
	Version   uint32
	ID        int
	Regs      kvm.Regs
	Sregs     kvm.Sregs
	FPU       kvm.FPU
	XSave     []byte // XSAVE standard format, opaque
	XCRS      kvm.XCRS
	MSRs      []kvm.MSREntry
	LAPIC     *kvm.LAPICState // nil without the in-kernel irqchip
	Events    kvm.VCPUEvents
	MPState   uint32
	DebugRegs kvm.DebugRegs
	TSCKHz    uint64
}

// State is a machine's KVM state (guest RAM and device state are saved by
// their owners).
type State struct {
	Version  uint32
	CPUs     int
	MemBytes uint64
	IRQChip  bool
	// Chips: PIC master, PIC slave, IOAPIC (in-kernel irqchip only).
	Chips []kvm.IRQChip
	PIT   *kvm.PITState
	Clock kvm.ClockData
	VCPUs []VCPUState
}

// ErrNotPaused is returned by SaveState/RestoreState on a running machine.
var ErrNotPaused = errors.New("machine: vCPUs are running (Pause first)")

func (m *Machine) pausedOrIdle() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.running || (m.pause && m.parked == len(m.vcpus)) || m.exit != nil
}

// SaveState reads the KVM state of a paused (or not yet started, or
// stopped) machine.
func (m *Machine) SaveState() (*State, error) {
	if !m.pausedOrIdle() {
		return nil, ErrNotPaused
	}
	s := &State{Version: StateVersion, CPUs: len(m.vcpus), MemBytes: m.cfg.MemBytes, IRQChip: m.cfg.InKernelIRQChip}
	var err error
	if m.cfg.InKernelIRQChip {
		for _, id := range []uint32{kvm.IRQChipPICMaster, kvm.IRQChipPICSlave, kvm.IRQChipIOAPIC} {
			c, err := m.vm.GetIRQChip(id)
			if err != nil {
				return nil, err
			}
			s.Chips = append(s.Chips, c)
		}
		pit, err := m.vm.GetPIT()
		if err != nil {
			return nil, err
		}
		s.PIT = &pit
	}
	if s.Clock, err = m.vm.GetClock(); err != nil {
		return nil, err
	}
	msrIdx, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	for _, c := range m.vcpus {
		v, err := saveVCPU(c, msrIdx, m.cfg.InKernelIRQChip)
		if err != nil {
			return nil, err
		}
		s.VCPUs = append(s.VCPUs, v)
	}
	return s, nil
}

func saveVCPU(c *kvm.VCPU, msrIdx []uint32, lapic bool) (VCPUState, error) {
	v := VCPUState{Version: StateVersion, ID: c.ID()}
	var err error
	if v.MPState, err = c.GetMPState(); err != nil {
		return v, err
	}
	if v.Regs, err = c.GetRegs(); err != nil {
		return v, err
	}
	if v.Sregs, err = c.GetSregs(); err != nil {
		return v, err
	}
	if v.FPU, err = c.GetFPU(); err != nil {
		return v, err
	}
	if v.XSave, err = c.GetXSave(); err != nil {
		return v, err
	}
	if v.XCRS, err = c.GetXCRS(); err != nil {
		return v, err
	}
	// Read MSRs one by one past any KVM refuses (the index list includes
	// MSRs this CPU model does not implement).
	for len(msrIdx) > 0 {
		got, err := c.GetMSRs(msrIdx)
		if err != nil {
			return v, err
		}
		v.MSRs = append(v.MSRs, got...)
		msrIdx = msrIdx[min(len(got)+1, len(msrIdx)):]
	}
	if lapic {
		l, err := c.GetLAPIC()
		if err != nil {
			return v, err
		}
		v.LAPIC = &l
	}
	if v.Events, err = c.GetEvents(); err != nil {
		return v, err
	}
	if v.DebugRegs, err = c.GetDebugRegs(); err != nil {
		return v, err
	}
	if v.TSCKHz, err = c.GetTSCKHz(); err != nil {
		return v, err
	}
	return v, nil
}

// RestoreState writes a saved state into a machine created with the same
// shape that has not started running (restore), or is paused.
func (m *Machine) RestoreState(s *State) error {
	if !m.pausedOrIdle() {
		return ErrNotPaused
	}
	if s.Version != StateVersion {
		return fmt.Errorf("machine state version %d, this hpcvm reads version %d", s.Version, StateVersion)
	}
	if s.CPUs != len(m.vcpus) || len(s.VCPUs) != len(m.vcpus) || s.MemBytes != m.cfg.MemBytes || s.IRQChip != m.cfg.InKernelIRQChip {
		return fmt.Errorf("machine state is for %d vCPUs, %d bytes, irqchip %v; this machine has %d vCPUs, %d bytes, irqchip %v",
			s.CPUs, s.MemBytes, s.IRQChip, len(m.vcpus), m.cfg.MemBytes, m.cfg.InKernelIRQChip)
	}
	if s.IRQChip {
		if len(s.Chips) != 3 || s.PIT == nil {
			return errors.New("machine state: in-kernel irqchip state missing")
		}
		for _, c := range s.Chips {
			if err := m.vm.SetIRQChip(c); err != nil {
				return err
			}
		}
		if err := m.vm.SetPIT(*s.PIT); err != nil {
			return err
		}
	}
	for i, c := range m.vcpus {
		if err := restoreVCPU(c, &s.VCPUs[i]); err != nil {
			return err
		}
	}
	return m.vm.SetClock(s.Clock)
}

func restoreVCPU(c *kvm.VCPU, v *VCPUState) error {
	if v.Version != StateVersion || v.ID != c.ID() {
		return fmt.Errorf("vcpu %d: state is version %d for vcpu %d", c.ID(), v.Version, v.ID)
	}
	// Order matters: sregs (mode) before regs, MSRs before events, LAPIC
	// after sregs (APIC base), MP state last.
	if err := c.SetTSCKHz(v.TSCKHz); err != nil && v.TSCKHz != 0 {
		cur, _ := c.GetTSCKHz()
		if cur != v.TSCKHz {
			return err
		}
	}
	if err := c.SetSregs(v.Sregs); err != nil {
		return err
	}
	if err := c.SetRegs(v.Regs); err != nil {
		return err
	}
	if err := c.SetFPU(v.FPU); err != nil {
		return err
	}
	if err := c.SetXSave(v.XSave); err != nil {
		return err
	}
	if err := c.SetXCRS(v.XCRS); err != nil {
		return err
	}
	if err := c.SetMSRs(v.MSRs); err != nil {
		return err
	}
	if v.LAPIC != nil {
		if err := c.SetLAPIC(*v.LAPIC); err != nil {
			return err
		}
	}
	if err := c.SetEvents(v.Events); err != nil {
		return err
	}
	if err := c.SetDebugRegs(v.DebugRegs); err != nil {
		return err
	}
	return c.SetMPState(v.MPState)
}

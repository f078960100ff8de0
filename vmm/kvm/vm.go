package kvm

import (
	"fmt"
	"os"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// VM is a KVM virtual machine file descriptor.
type VM struct {
	f   *os.File
	sys *System
}

func (v *VM) fd() uintptr { return v.f.Fd() }

// Close closes the VM fd. The kernel frees the VM once every vCPU fd is closed too.
func (v *VM) Close() error { return v.f.Close() }

// System returns the /dev/kvm handle the VM was created from.
func (v *VM) System() *System { return v.sys }

// SetMemoryRegion installs or replaces a memory slot (KVM_SET_USER_MEMORY_REGION).
// hostAddr is the start of the host mapping backing [gpa, gpa+size).
func (v *VM) SetMemoryRegion(slot uint32, flags uint32, gpa, size uint64, hostAddr uintptr) error {
	r := &gokvm.UserspaceMemoryRegion{Slot: slot, Flags: flags, GuestPhysAddr: gpa, MemorySize: size, UserspaceAddr: uint64(hostAddr)}
	if err := gokvm.SetUserMemoryRegion(v.fd(), r); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION slot %d gpa %#x size %#x: %w", slot, gpa, size, err)
	}
	return nil
}

// Memory slot flags.
const (
	MemLogDirtyPages uint32 = 1 << 0
	MemReadonly      uint32 = 1 << 1
)

// SetTSSAddr and SetIdentityMapAddr reserve the pages Intel VT-x needs for
// real-mode emulation; they must not overlap RAM or device windows.
func (v *VM) SetTSSAddr(addr uint32) error {
	if err := gokvm.SetTSSAddr(v.fd(), addr); err != nil {
		return fmt.Errorf("KVM_SET_TSS_ADDR: %w", err)
	}
	return nil
}

// SetIdentityMapAddr sets the EPT identity map page (Intel only; harmless elsewhere).
func (v *VM) SetIdentityMapAddr(addr uint32) error {
	if err := gokvm.SetIdentityMapAddr(v.fd(), addr); err != nil {
		return fmt.Errorf("KVM_SET_IDENTITY_MAP_ADDR: %w", err)
	}
	return nil
}

// CreateIRQChip creates the in-kernel PIC, IOAPIC and per-vCPU LAPICs.
// Used for a VM on one node; distributed VMs emulate them in the VMM.
func (v *VM) CreateIRQChip() error {
	if err := gokvm.CreateIRQChip(v.fd()); err != nil {
		return fmt.Errorf("KVM_CREATE_IRQCHIP: %w", err)
	}
	return nil
}

// CreatePIT2 creates the in-kernel i8254 PIT.
func (v *VM) CreatePIT2() error {
	if err := gokvm.CreatePIT2(v.fd()); err != nil {
		return fmt.Errorf("KVM_CREATE_PIT2: %w", err)
	}
	return nil
}

// IRQLine sets the level of an in-kernel irqchip input (KVM_IRQ_LINE_STATUS).
func (v *VM) IRQLine(gsi uint32, level bool) error {
	l := uint32(0)
	if level {
		l = 1
	}
	if err := gokvm.IRQLineStatus(v.fd(), gsi, l); err != nil {
		return fmt.Errorf("KVM_IRQ_LINE gsi %d: %w", gsi, err)
	}
	return nil
}

// IRQChip is the state of one in-kernel interrupt controller
// (mirrors struct kvm_irqchip). ChipID: 0 PIC master, 1 PIC slave, 2 IOAPIC.
type IRQChip = gokvm.IRQChip

// IRQChip IDs.
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
)

// GetIRQChip reads an in-kernel interrupt controller's state.
func (v *VM) GetIRQChip(id uint32) (IRQChip, error) {
	c := IRQChip{ChipID: id}
	if err := gokvm.GetIRQChip(v.fd(), &c); err != nil {
		return c, fmt.Errorf("KVM_GET_IRQCHIP %d: %w", id, err)
	}
	return c, nil
}

// SetIRQChip writes an in-kernel interrupt controller's state.
func (v *VM) SetIRQChip(c IRQChip) error {
	if err := gokvm.SetIRQChip(v.fd(), &c); err != nil {
		return fmt.Errorf("KVM_SET_IRQCHIP %d: %w", c.ChipID, err)
	}
	return nil
}

// PITState mirrors struct kvm_pit_state2.
type PITState = gokvm.PITState2

// GetPIT reads the in-kernel PIT state.
func (v *VM) GetPIT() (PITState, error) {
	var s PITState
	if err := gokvm.GetPIT2(v.fd(), &s); err != nil {
		return s, fmt.Errorf("KVM_GET_PIT2: %w", err)
	}
	return s, nil
}

// SetPIT writes the in-kernel PIT state.
func (v *VM) SetPIT(s PITState) error {
	if err := gokvm.SetPIT2(v.fd(), &s); err != nil {
		return fmt.Errorf("KVM_SET_PIT2: %w", err)
	}
	return nil
}

// ClockData mirrors struct kvm_clock_data (kvmclock).
type ClockData = gokvm.ClockData

// GetClock reads the VM's kvmclock.
func (v *VM) GetClock() (ClockData, error) {
	var c ClockData
	if err := gokvm.GetClock(v.fd(), &c); err != nil {
		return c, fmt.Errorf("KVM_GET_CLOCK: %w", err)
	}
	return c, nil
}

// SetClock sets the VM's kvmclock.
func (v *VM) SetClock(c ClockData) error {
	c.Flags &= uint32(gokvm.Realtime) // only KVM_CLOCK_REALTIME is accepted on set
	if err := gokvm.SetClock(v.fd(), &c); err != nil {
		return fmt.Errorf("KVM_SET_CLOCK: %w", err)
	}
	return nil
}

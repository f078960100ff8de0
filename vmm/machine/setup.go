package machine

import (
	"math/bits"

	"github.com/hpcvm/hpcvm/vmm/kvm"
)

// MSRs given fixed initial values on every vCPU (as a firmware would).
const (
	msrIA32MiscEnable = 0x1a0
	msrMTRRDefType    = 0x2ff
	msrIA32TSC        = 0x10
)

func (m *Machine) setupVCPU(c *kvm.VCPU, supported []kvm.CPUIDEntry) error {
	if err := c.SetCPUID(cpuidFor(supported, c.ID(), m.cfg.CPUs, m.cfg.InKernelIRQChip)); err != nil {
		return err
	}
	if err := c.SetMSRs([]kvm.MSREntry{
		{Index: msrIA32MiscEnable, Data: 1},      // fast strings
		{Index: msrMTRRDefType, Data: 1<<11 | 6}, // MTRRs on, default write-back
	}); err != nil {
		return err
	}
	// x87 and SSE control words as after FNINIT / reset.
	if err := c.SetFPU(kvm.FPU{FCW: 0x37f}); err != nil {
		return err
	}
	if err := c.SetMXCSR(0x1f80); err != nil {
		return err
	}
	if m.cfg.InKernelIRQChip {
		l, err := c.GetLAPIC()
		if err != nil {
			return err
		}
		// LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them.
		setLVT(&l, 0x350, 7)
		setLVT(&l, 0x360, 4)
		if err := c.SetLAPIC(l); err != nil {
			return err
		}
	}
	regs, err := c.GetRegs()
	if err != nil {
		return err
	}
	sregs, err := c.GetSregs()
	if err != nil {
		return err
	}
	start := m.cfg.Loader.SetupVCPU(c.ID(), m.cfg.CPUs, &regs, &sregs)
	if !start {
		return nil
	}
	if err := c.SetSregs(sregs); err != nil {
		return err
	}
	if err := c.SetRegs(regs); err != nil {
		return err
	}
	if c.ID() != 0 && m.cfg.InKernelIRQChip {
		// KVM parks non-boot vCPUs waiting for SIPI; this one starts now.
		return c.SetMPState(kvm.MPStateRunnable)
	}
	return nil
}

func setLVT(l *kvm.LAPICState, off int, mode uint32) {
	v := uint32(l.Regs[off]) | uint32(l.Regs[off+1])<<8 | uint32(l.Regs[off+2])<<16 | uint32(l.Regs[off+3])<<24
	v = v&^0x700 | mode<<8
	l.Regs[off], l.Regs[off+1], l.Regs[off+2], l.Regs[off+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

// cpuidFor adapts KVM's supported CPUID to vCPU id of n: APIC id, logical
// processor counts and topology leaves, so the guest sees n single-thread
// cores in one package.
//
// noNestedVirt: guests see neither VMX nor SVM, as under Firecracker. A job
// does not run VMs of its own, and with the bit Debian's udev loads kvm_amd
// in every guest; in virt nodes (KVM inside QEMU TCG) that is a third level
// of virtualization, and node kernels died of stack overflows in KVM_RUN
// under such guests (docs/testing.md).
//
// Without the in-kernel irqchip (a distributed VM's slices emulate an xAPIC
// in userspace, vmm/irqchip) the guest must not use x2APIC, nor the KVM
// paravirtual features that KVM implements on its own local APIC (PV EOI,
// PV IPIs, PV unhalt, directed yield, async page faults by interrupt).
// kvmclock goes too: the userspace irqchip serves distributed VMs, where
// each slice's KVM writes its vCPUs' pvclock records straight into its own
// copy of a guest page, past the write protection that keeps pages
// coherent, so another vCPU's record reads back stale or zero. The guest
// uses the TSC instead, which every slice derives from the shared guest
// clock (vmm/dsm), advertised invariant so Linux trusts it across CPUs.
// Only the no-I/O-delay hint is left.
func cpuidFor(supported []kvm.CPUIDEntry, id, n int, inKernelIRQChip bool) []kvm.CPUIDEntry {
	shift := uint32(bits.Len(uint(n - 1))) // APIC-id bits for the core level
	out := make([]kvm.CPUIDEntry, 0, len(supported))
	for _, e := range supported {
		switch e.Function {
		case 1:
			e.EBX = e.EBX&0x0000FFFF | uint32(id)<<24 | uint32(n&0xff)<<16
			e.ECX |= 1 << 31 // running under a hypervisor
			e.ECX &^= 1 << 5 // no VMX: see noNestedVirt
			if !inKernelIRQChip {
				e.ECX &^= 1 << 21 // x2APIC
				// TSC-deadline timer: KVM reports it only for its own
				// local APIC; the userspace one implements it (the slices
				// trap IA32_TSC_DEADLINE). Without it Linux calibrates the
				// APIC timer against the PIT, which a distributed VM lacks.
				e.ECX |= 1 << 24
			}
			if n > 1 {
				e.EDX |= 1 << 28 // HTT: EBX[23:16] is valid
			}
		case 4: // Intel deterministic cache parameters: cores per package
			if e.EAX&0x1f != 0 {
				e.EAX = e.EAX&0x03FFFFFF | uint32(n-1)<<26
				e.EAX &^= 0xFFF << 14 // one logical processor shares each cache level...
			}
		case 0xB, 0x1F: // extended topology
			switch e.Index {
			case 0: // SMT level: one thread per core
				e.EAX, e.EBX, e.ECX = 0, 1, 1<<8
			case 1: // core level
				e.EAX, e.EBX, e.ECX = shift, uint32(n), 2<<8|1
			default:
				e.EAX, e.EBX, e.ECX = 0, 0, e.Index
			}
			e.EDX = uint32(id)
		case kvmCPUIDFeatures:
			if !inKernelIRQChip {
				e.EAX &= kvmFeaturesWithoutIRQChip
			}
		case 0x80000001:
			e.ECX &^= 1 << 2 // no SVM: see noNestedVirt
		case 0x80000007:
			if !inKernelIRQChip {
				e.EDX |= 1 << 8 // invariant TSC
			}
		case 0x80000008: // AMD: number of cores - 1 and APIC-id core bits
			e.ECX = e.ECX&^0xF0FF | uint32(n-1)&0xff | shift<<12
		}
		out = append(out, e)
	}
	return fixXSave(out)
}

// KVM's paravirtual feature leaf and the one feature kept without KVM's
// local APIC: NOP_IO_DELAY.
const (
	kvmCPUIDFeatures          = 0x40000001
	kvmFeaturesWithoutIRQChip = 1 << 1
)

// fixXSave keeps CPUID leaf 0xD consistent with the feature bits: a host
// (such as QEMU TCG) may report AVX state in leaf 0xD while leaf 1 lacks
// AVX, and Linux then warns "XSAVE consistency problem" and may size its
// buffers wrongly. State components whose feature is absent are dropped
// and the area sizes recomputed from the remaining components.
func fixXSave(entries []kvm.CPUIDEntry) []kvm.CPUIDEntry {
	var leaf1ECX uint32
	for _, e := range entries {
		if e.Function == 1 {
			leaf1ECX = e.ECX
		}
	}
	const avx = 1 << 28
	if leaf1ECX&avx != 0 {
		return entries
	}
	drop := uint32(1 << 2) // AVX (YMM upper halves)
	out := entries[:0]
	var d0 *kvm.CPUIDEntry
	for _, e := range entries {
		if e.Function == 0xD && e.Index >= 2 && e.Index < 32 && drop&(1<<e.Index) != 0 {
			continue
		}
		out = append(out, e)
	}
	for i := range out {
		if out[i].Function == 0xD && out[i].Index == 0 {
			d0 = &out[i]
		}
	}
	if d0 == nil || d0.EAX&drop == 0 {
		return out
	}
	d0.EAX &^= drop
	size := uint32(576) // legacy area + XSAVE header
	for _, e := range out {
		if e.Function == 0xD && e.Index >= 2 && e.Index < 32 && d0.EAX&(1<<e.Index) != 0 {
			size = max(size, e.EBX+e.EAX) // offset + size
		}
	}
	d0.EBX, d0.ECX = size, size
	return out
}

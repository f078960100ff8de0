package machine

import (
	"testing"

	"github.com/hpcvm/hpcvm/vmm/kvm"
)

func TestCPUIDTopology(t *testing.T) {
	sup := []kvm.CPUIDEntry{
		{Function: 1, EBX: 0xAABB0800},
		{Function: 0xB, Index: 0}, {Function: 0xB, Index: 1},
		{Function: 0x80000008, ECX: 0xF0FF},
	}
	got := cpuidFor(sup, 5, 6, true)
	if apic := got[0].EBX >> 24; apic != 5 {
		t.Errorf("leaf 1 APIC id %d, want 5", apic)
	}
	if n := got[0].EBX >> 16 & 0xff; n != 6 {
		t.Errorf("leaf 1 logical count %d, want 6", n)
	}
	if got[0].EDX&(1<<28) == 0 || got[0].ECX&(1<<31) == 0 {
		t.Errorf("leaf 1 HTT or hypervisor bit missing: edx %#x ecx %#x", got[0].EDX, got[0].ECX)
	}
	if got[2].EBX != 6 || got[2].EAX != 3 || got[2].EDX != 5 {
		t.Errorf("leaf 0xB core level = %+v, want 6 cores, shift 3, x2apic id 5", got[2])
	}
	if got[3].ECX&0xff != 5 || got[3].ECX>>12&0xf != 3 {
		t.Errorf("leaf 0x80000008 ecx %#x, want NC=5 ApicIdCoreIdSize=3", got[3].ECX)
	}
}

func TestFixXSaveDropsAVXStateWithoutAVX(t *testing.T) {
	sup := []kvm.CPUIDEntry{
		{Function: 1, ECX: 0}, // no AVX
		{Function: 0xD, Index: 0, EAX: 7, EBX: 832, ECX: 832},
		{Function: 0xD, Index: 2, EAX: 256, EBX: 576},
	}
	got := cpuidFor(sup, 0, 1, true)
	for _, e := range got {
		if e.Function == 0xD && e.Index == 2 {
			t.Errorf("AVX state component kept without AVX")
		}
		if e.Function == 0xD && e.Index == 0 && (e.EAX != 3 || e.EBX != 576 || e.ECX != 576) {
			t.Errorf("leaf 0xD.0 = %+v, want eax 3, sizes 576", e)
		}
	}
	withAVX := []kvm.CPUIDEntry{{Function: 1, ECX: 1 << 28}, {Function: 0xD, Index: 0, EAX: 7, EBX: 832, ECX: 832}, {Function: 0xD, Index: 2, EAX: 256, EBX: 576}}
	if got := cpuidFor(withAVX, 0, 1, true); len(got) != 3 || got[1].EAX != 7 {
		t.Errorf("consistent leaf 0xD changed: %+v", got)
	}
}

func TestCPUIDHidesNestedVirtualization(t *testing.T) {
	sup := []kvm.CPUIDEntry{
		{Function: 1, ECX: 1<<5 | 1<<0},          // VMX, SSE3
		{Function: 0x80000001, ECX: 1<<2 | 1<<0}, // SVM, LAHF
	}
	got := cpuidFor(sup, 0, 1, true)
	if got[0].ECX&(1<<5) != 0 || got[0].ECX&1 == 0 {
		t.Errorf("leaf 1 ecx %#x: want VMX cleared and SSE3 kept", got[0].ECX)
	}
	if got[1].ECX != 1 {
		t.Errorf("leaf 0x80000001 ecx %#x: want SVM cleared and LAHF kept", got[1].ECX)
	}
}

func TestCPUIDWithoutInKernelIRQChip(t *testing.T) {
	const x2apic = 1 << 21
	const pvEOI, pvSendIPI, clocksource2, stable, noIODelay = 1 << 6, 1 << 11, 1 << 3, 1 << 24, 1 << 1
	const invariantTSC = 1 << 8
	sup := []kvm.CPUIDEntry{
		{Function: 1, ECX: x2apic | 1},
		{Function: 0x40000001, EAX: pvEOI | pvSendIPI | clocksource2 | stable | noIODelay},
		{Function: 0x80000007},
	}
	in := cpuidFor(sup, 0, 2, true)
	if in[0].ECX&x2apic == 0 || in[1].EAX != pvEOI|pvSendIPI|clocksource2|stable|noIODelay || in[2].EDX != 0 {
		t.Errorf("with the in-kernel irqchip the guest keeps x2APIC, every PV feature and KVM's TSC bits: %+v", in)
	}
	out := cpuidFor(sup, 0, 2, false)
	if out[0].ECX&^(1<<31) != 1|1<<24 { // bit 31: hypervisor present
		t.Errorf("leaf 1 ecx %#x: want x2APIC cleared, TSC deadline set, the rest kept", out[0].ECX)
	}
	if out[1].EAX != noIODelay {
		t.Errorf("KVM features %#x: want only NOP_IO_DELAY (kvmclock bypasses page coherence)", out[1].EAX)
	}
	if out[2].EDX != invariantTSC {
		t.Errorf("leaf 0x80000007 edx %#x: want the invariant TSC bit", out[2].EDX)
	}
}

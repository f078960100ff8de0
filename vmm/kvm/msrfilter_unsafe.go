package kvm

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// Userspace MSR handling (KVM_CAP_X86_USER_SPACE_MSR with
// KVM_X86_SET_MSR_FILTER): accesses to the MSRs a filter denies exit to
// the VMM as KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR instead of being
// handled (or refused with #GP) by KVM. A VMM that emulates the local APIC
// uses it for IA32_TSC_DEADLINE, which KVM ignores without its own LAPIC.

// MSR exit reasons.
const (
	ExitX86RDMSR ExitReason = 29
	ExitX86WRMSR ExitReason = 30
)

const (
	CapX86UserSpaceMSR Capability = 188
	CapX86MSRFilter    Capability = 189

	msrExitReasonFilter = 1 << 2 // KVM_MSR_EXIT_REASON_FILTER
	nrSetMSRFilter      = 0xc6
	msrFilterRead       = 1 << 0
	msrFilterWrite      = 1 << 1
	maxMSRFilterRanges  = 16
)

// msrFilterRange mirrors struct kvm_msr_filter_range.
type msrFilterRange struct {
	Flags  uint32
	NMSRs  uint32
	Base   uint32
	_      uint32
	Bitmap uint64 // user pointer: bit set = allowed
}

// msrFilter mirrors struct kvm_msr_filter.
type msrFilter struct {
	Flags  uint32
	_      uint32
	Ranges [maxMSRFilterRanges]msrFilterRange
}

var _ [24]byte = [unsafe.Sizeof(msrFilterRange{})]byte{}
var _ [8 + 16*24]byte = [unsafe.Sizeof(msrFilter{})]byte{}

// TrapMSRs makes guest reads and writes of the given MSRs exit to the VMM
// (ExitX86RDMSR / ExitX86WRMSR; answer with CompleteMSRExit). Every other
// MSR stays with KVM.
func (v *VM) TrapMSRs(indices ...uint32) error {
	if len(indices) > maxMSRFilterRanges {
		return fmt.Errorf("KVM_X86_SET_MSR_FILTER: %d MSRs, at most %d", len(indices), maxMSRFilterRanges)
	}
	if err := v.EnableCap(CapX86UserSpaceMSR, msrExitReasonFilter); err != nil {
		return fmt.Errorf("userspace MSR exits: %w", err)
	}
	var f msrFilter
	deny := make([]byte, 8*len(indices)) // one zero (deny) bit per range, 8-byte aligned
	for i, idx := range indices {
		f.Ranges[i] = msrFilterRange{Flags: msrFilterRead | msrFilterWrite, NMSRs: 1, Base: idx,
			Bitmap: uint64(uintptr(unsafe.Pointer(&deny[8*i])))}
	}
	if _, err := ioctl(v.fd(), gokvm.IIOW(nrSetMSRFilter, unsafe.Sizeof(f)), unsafe.Pointer(&f)); err != nil {
		return fmt.Errorf("KVM_X86_SET_MSR_FILTER: %w", err)
	}
	return nil
}

// kvm_run.msr: { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; }
const (
	msrError = 0
	msrIndex = 12
	msrData  = 16
)

// MSRExit returns the MSR index and (for a write) the value of the last
// ExitX86RDMSR/ExitX86WRMSR exit.
func (c *VCPU) MSRExit() (index uint32, data uint64) {
	return c.run.u32(msrIndex), c.run.u64(msrData)
}

// CompleteMSRExit answers the last MSR exit: the value read (ignored for a
// write), or fail to make the guest take #GP.
func (c *VCPU) CompleteMSRExit(data uint64, fail bool) {
	binary.LittleEndian.PutUint64(c.run[runUnionOffset+msrData:], data)
	var e byte
	if fail {
		e = 1
	}
	c.run[runUnionOffset+msrError] = e
}

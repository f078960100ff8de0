// Package kvm wraps github.com/bobuhiro11/gokvm's kvm package behind small
// typed handles (System, VM, VCPU) and adds the ioctls hpcvm needs that
// gokvm lacks: FPU and XSAVE state, ENABLE_CAP, CLEAR_DIRTY_LOG, IRQFD,
// IOEVENTFD, SIGNAL_MSI, and a KVM_RUN that leaves when the vCPU is kicked.
//
// Kicking follows the documented KVM protocol: the kicker sets
// kvm_run.immediate_exit and sends a signal to the vCPU's OS thread, so a
// vCPU either never enters the guest or leaves it with EINTR. EINTR is
// reported to the caller (never retried here), unlike newer gokvm releases.
package kvm

import (
	"errors"
	"fmt"
	"os"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// ErrUnavailable is returned by Open when /dev/kvm cannot be used.
var ErrUnavailable = errors.New("kvm unavailable")

// DevicePath is the KVM device node.
const DevicePath = "/dev/kvm"

// System is an open /dev/kvm.
type System struct {
	f        *os.File
	runSize  int
	xsave2Sz int // KVM_CAP_XSAVE2 size in bytes; 0 when unsupported
}

// Open opens /dev/kvm and checks the API version.
func Open() (*System, error) {
	f, err := os.OpenFile(DevicePath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open %s: %v", ErrUnavailable, DevicePath, err)
	}
	s := &System{f: f}
	v, err := gokvm.GetAPIVersion(s.fd())
	if err != nil || v != 12 {
		f.Close()
		return nil, fmt.Errorf("%w: KVM API version %d (want 12): %v", ErrUnavailable, v, err)
	}
	sz, err := gokvm.GetVCPUMMmapSize(s.fd())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	s.runSize = int(sz)
	if n, err := s.CheckExtension(CapXSave2); err == nil && n > 0 {
		s.xsave2Sz = n
	}
	return s, nil
}

func (s *System) fd() uintptr { return s.f.Fd() }

// Close closes /dev/kvm. VMs created from it stay valid.
func (s *System) Close() error { return s.f.Close() }

// CheckExtension returns KVM_CHECK_EXTENSION for cap (0 = unsupported).
func (s *System) CheckExtension(cap Capability) (int, error) {
	r, err := gokvm.CheckExtension(s.fd(), gokvm.Capability(cap))
	return int(r), err
}

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	c := &gokvm.CPUID{Nent: 256, Entries: make([]gokvm.CPUIDEntry2, 256)}
	if err := gokvm.GetSupportedCPUID(s.fd(), c); err != nil {
		return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %w", err)
	}
	out := make([]CPUIDEntry, 0, c.Nent)
	for _, e := range c.Entries[:c.Nent] {
		out = append(out, CPUIDEntry{Function: e.Function, Index: e.Index, Flags: e.Flags,
			EAX: e.Eax, EBX: e.Ebx, ECX: e.Ecx, EDX: e.Edx})
	}
	return out, nil
}

// MSRIndexList returns the MSRs KVM saves and restores for a vCPU.
func (s *System) MSRIndexList() ([]uint32, error) {
	l := &gokvm.MSRList{NMSRs: uint32(len(gokvm.MSRList{}.Indicies))}
	if err := gokvm.GetMSRIndexList(s.fd(), l); err != nil {
		return nil, fmt.Errorf("KVM_GET_MSR_INDEX_LIST: %w", err)
	}
	return append([]uint32(nil), l.Indicies[:l.NMSRs]...), nil
}

// CreateVM creates a VM (KVM_CREATE_VM).
func (s *System) CreateVM() (*VM, error) {
	fd, err := gokvm.CreateVM(s.fd())
	// KVM returns a bare EINTR (not restarted by SA_RESTART) when a signal
	// arrives while it sets the VM up, and Go's runtime signals its
	// threads all the time (preemption): seen in virt nodes. Nothing was
	// created, so try again.
	for tries := 0; errors.Is(err, unix.EINTR) && tries < 100; tries++ {
		fd, err = gokvm.CreateVM(s.fd())
	}
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	return &VM{f: os.NewFile(fd, "kvm-vm"), sys: s}, nil
}

// Capability is a KVM_CAP_* number.
type Capability int

// Capabilities hpcvm checks.
const (
	CapIRQChip        Capability = 0
	CapUserMemory     Capability = 3
	CapIRQFD          Capability = 32
	CapPIT2           Capability = 33
	CapIOEventFD      Capability = 36
	CapAdjustClock    Capability = 39
	CapXSave          Capability = 55
	CapXCRS           Capability = 56
	CapTSCControl     Capability = 60
	CapMaxVCPUs       Capability = 66
	CapSignalMSI      Capability = 77
	CapSplitIRQChip   Capability = 121
	CapX2APICAPI      Capability = 129
	CapImmediateExit  Capability = 136
	CapManualDirtyLog Capability = 168 // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
	CapXSave2         Capability = 208
)

// CPUIDEntry mirrors struct kvm_cpuid_entry2 (without padding).
type CPUIDEntry struct {
	Function, Index, Flags uint32
	EAX, EBX, ECX, EDX     uint32
}

// TSCKHz returns the TSC frequency KVM gives vCPUs on this host, from a
// throwaway VM (KVM_GET_TSC_KHZ is a vCPU ioctl), for callers that need it
// before their own vCPUs exist.
func (s *System) TSCKHz() (uint64, error) {
	vm, err := s.CreateVM()
	if err != nil {
		return 0, err
	}
	defer vm.Close()
	c, err := vm.CreateVCPU(0)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return c.GetTSCKHz()
}

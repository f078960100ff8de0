package kvm

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// ExitReason is kvm_run.exit_reason.
type ExitReason uint32

// Exit reasons hpcvm handles (KVM_EXIT_*).
const (
	ExitUnknown       ExitReason = 0
	ExitException     ExitReason = 1
	ExitIO            ExitReason = 2
	ExitHypercall     ExitReason = 3
	ExitDebug         ExitReason = 4
	ExitHLT           ExitReason = 5
	ExitMMIO          ExitReason = 6
	ExitIRQWindowOpen ExitReason = 7
	ExitShutdown      ExitReason = 8
	ExitFailEntry     ExitReason = 9
	ExitIntr          ExitReason = 10
	ExitInternalError ExitReason = 17
	ExitSystemEvent   ExitReason = 24
)

func (e ExitReason) String() string {
	names := map[ExitReason]string{
		ExitUnknown: "UNKNOWN", ExitException: "EXCEPTION", ExitIO: "IO", ExitHypercall: "HYPERCALL",
		ExitDebug: "DEBUG", ExitHLT: "HLT", ExitMMIO: "MMIO", ExitIRQWindowOpen: "IRQ_WINDOW_OPEN",
		ExitShutdown: "SHUTDOWN", ExitFailEntry: "FAIL_ENTRY", ExitIntr: "INTR",
		ExitInternalError: "INTERNAL_ERROR", ExitSystemEvent: "SYSTEM_EVENT",
	}
	if n, ok := names[e]; ok {
		return "KVM_EXIT_" + n
	}
	return fmt.Sprintf("KVM_EXIT_%d", uint32(e))
}

// System event types (kvm_run.system_event.type).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// ErrInterrupted is returned by Run when the vCPU was kicked (EINTR).
var ErrInterrupted = errors.New("kvm run interrupted")

// KickSignal is sent to a vCPU thread to force it out of KVM_RUN. The Go
// runtime already handles SIGURG (for goroutine preemption) and ignores
// spurious ones, so sending it never disturbs the program.
const KickSignal = unix.SIGURG

// VCPU is a virtual CPU. Run, and every state accessor, must be called from
// the OS thread that will run it (see LockThread); Kick may be called from
// any goroutine.
type VCPU struct {
	f   *os.File
	id  int
	sys *System
	run runPage
	tid atomic.Int32 // OS thread running the vCPU; 0 while none
}

func (c *VCPU) fd() uintptr { return c.f.Fd() }

// ID is the vCPU index (and initial APIC ID).
func (c *VCPU) ID() int { return c.id }

// CreateVCPU creates vCPU id and maps its kvm_run page.
func (v *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := gokvm.CreateVCPU(v.fd(), id)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU %d: %w", id, err)
	}
	f := os.NewFile(fd, fmt.Sprintf("kvm-vcpu-%d", id))
	mem, err := unix.Mmap(int(fd), 0, v.sys.runSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("vcpu %d: mmap kvm_run: %w", id, err)
	}
	return &VCPU{f: f, id: id, sys: v.sys, run: runPage(mem)}, nil
}

// Close unmaps the run page and closes the vCPU fd.
func (c *VCPU) Close() error {
	if c.run != nil {
		unix.Munmap(c.run)
		c.run = nil
	}
	return c.f.Close()
}

// LockThread binds the calling goroutine to its OS thread and records the
// thread for Kick. Call it once, first, in the goroutine that runs the vCPU;
// UnlockThread when done.
func (c *VCPU) LockThread() {
	runtime.LockOSThread()
	c.tid.Store(int32(unix.Gettid()))
}

// UnlockThread undoes LockThread.
func (c *VCPU) UnlockThread() {
	c.tid.Store(0)
	runtime.UnlockOSThread()
}

// Kick forces the vCPU out of KVM_RUN (or makes its next KVM_RUN return at
// once). The vCPU's Run then returns ErrInterrupted.
func (c *VCPU) Kick() {
	c.run.setImmediateExit(true)
	if tid := c.tid.Load(); tid != 0 {
		_ = unix.Tgkill(unix.Getpid(), int(tid), KickSignal)
	}
}

// Exit describes why KVM_RUN returned. The byte slices alias the kvm_run
// page and are valid only until the next Run.
type Exit struct {
	Reason ExitReason

	// ExitIO
	Port    uint16
	IOWrite bool
	IOSize  int    // bytes per access
	IOData  []byte // IOSize*count bytes; fill on reads

	// ExitMMIO
	MMIOAddr  uint64
	MMIOWrite bool
	MMIOData  []byte // len bytes; fill on reads

	// ExitInternalError / ExitSystemEvent / ExitFailEntry
	Suberror    uint32
	EventType   uint32
	FailReason  uint64
	InternalRaw []uint64
}

// Run enters the guest until the next exit. A kick (signal or
// immediate_exit) yields ErrInterrupted; the immediate_exit flag is cleared
// so the next Run enters the guest again.
func (c *VCPU) Run() (Exit, error) {
	_, err := gokvm.Ioctl(c.fd(), gokvm.IIO(0x80), 0)
	if err != nil {
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			c.run.setImmediateExit(false)
			return Exit{Reason: ExitIntr}, ErrInterrupted
		}
		return Exit{}, fmt.Errorf("vcpu %d: KVM_RUN: %w", c.id, err)
	}
	r := c.run
	e := Exit{Reason: ExitReason(r.header().ExitReason)}
	switch e.Reason {
	case ExitIO:
		e.IOWrite = r.u8(ioDirection) == 1
		e.IOSize = int(r.u8(ioSize))
		e.Port = r.u16(ioPort)
		n := e.IOSize * int(r.u32(ioCount))
		off := int(r.u64(ioDataOffset))
		if off+n <= len(r) {
			e.IOData = r[off : off+n]
		}
	case ExitMMIO:
		e.MMIOAddr = r.u64(mmioPhysAddr)
		l := int(r.u32(mmioLen))
		if l > 8 {
			l = 8
		}
		e.MMIOData = r[runUnionOffset+mmioData : runUnionOffset+mmioData+l]
		e.MMIOWrite = r.u8(mmioIsWrite) != 0
	case ExitInternalError:
		e.Suberror = r.u32(internalSuberror)
		n := int(r.u32(internalNData))
		if n > 16 {
			n = 16
		}
		for i := 0; i < n; i++ {
			e.InternalRaw = append(e.InternalRaw, r.u64(internalData+8*i))
		}
	case ExitSystemEvent:
		e.EventType = r.u32(systemEventType)
	case ExitFailEntry:
		e.FailReason = r.u64(failEntryReason)
	}
	return e, nil
}

// Registers and special registers mirror struct kvm_regs / kvm_sregs.
type (
	Regs       = gokvm.Regs
	Sregs      = gokvm.Sregs
	Segment    = gokvm.Segment
	Descriptor = gokvm.Descriptor
	LAPICState = gokvm.LAPICState
	VCPUEvents = gokvm.VCPUEvents
	DebugRegs  = gokvm.DebugRegs
	XCRS       = gokvm.XCRS
	MSREntry   = gokvm.MSREntry
)

// GetRegs reads the general-purpose registers.
func (c *VCPU) GetRegs() (Regs, error) {
	r, err := gokvm.GetRegs(c.fd())
	if err != nil {
		return Regs{}, fmt.Errorf("vcpu %d: KVM_GET_REGS: %w", c.id, err)
	}
	return *r, nil
}

// SetRegs writes the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error {
	if err := gokvm.SetRegs(c.fd(), &r); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_REGS: %w", c.id, err)
	}
	return nil
}

// GetSregs reads the special registers.
func (c *VCPU) GetSregs() (Sregs, error) {
	s, err := gokvm.GetSregs(c.fd())
	if err != nil {
		return Sregs{}, fmt.Errorf("vcpu %d: KVM_GET_SREGS: %w", c.id, err)
	}
	return *s, nil
}

// SetSregs writes the special registers.
func (c *VCPU) SetSregs(s Sregs) error {
	if err := gokvm.SetSregs(c.fd(), &s); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_SREGS: %w", c.id, err)
	}
	return nil
}

// SetCPUID installs the CPUID table the guest sees (KVM_SET_CPUID2).
func (c *VCPU) SetCPUID(entries []CPUIDEntry) error {
	cp := &gokvm.CPUID{Nent: uint32(len(entries))}
	for _, e := range entries {
		cp.Entries = append(cp.Entries, gokvm.CPUIDEntry2{Function: e.Function, Index: e.Index, Flags: e.Flags,
			Eax: e.EAX, Ebx: e.EBX, Ecx: e.ECX, Edx: e.EDX})
	}
	if err := gokvm.SetCPUID2(c.fd(), cp); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_CPUID2: %w", c.id, err)
	}
	return nil
}

// GetMSRs reads the MSRs named by indices. KVM stops at the first MSR it
// cannot read; only the MSRs read are returned.
func (c *VCPU) GetMSRs(indices []uint32) ([]MSREntry, error) {
	if len(indices) == 0 {
		return nil, nil
	}
	m := &gokvm.MSRS{NMSRs: uint32(len(indices))}
	for _, i := range indices {
		m.Entries = append(m.Entries, MSREntry{Index: i})
	}
	data, err := m.Bytes()
	if err != nil {
		return nil, err
	}
	n, err := gokvm.Ioctl(c.fd(), gokvm.IIOWR(0x88, 8), uintptrOf(data))
	if err != nil {
		return nil, fmt.Errorf("vcpu %d: KVM_GET_MSRS: %w", c.id, err)
	}
	got, err := gokvm.NewMSRS(data)
	if err != nil {
		return nil, err
	}
	return got.Entries[:n], nil
}

// SetMSRs writes MSRs. KVM stops at the first MSR it rejects; that is
// reported as an error naming it.
func (c *VCPU) SetMSRs(entries []MSREntry) error {
	if len(entries) == 0 {
		return nil
	}
	m := &gokvm.MSRS{NMSRs: uint32(len(entries)), Entries: entries}
	data, err := m.Bytes()
	if err != nil {
		return err
	}
	n, err := gokvm.Ioctl(c.fd(), gokvm.IIOW(0x89, 8), uintptrOf(data))
	if err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_MSRS: %w", c.id, err)
	}
	if int(n) != len(entries) {
		return fmt.Errorf("vcpu %d: KVM_SET_MSRS: MSR %#x rejected (%d of %d set)", c.id, entries[n].Index, n, len(entries))
	}
	return nil
}

// GetLAPIC reads the in-kernel local APIC registers.
func (c *VCPU) GetLAPIC() (LAPICState, error) {
	var l LAPICState
	if err := gokvm.GetLocalAPIC(c.fd(), &l); err != nil {
		return l, fmt.Errorf("vcpu %d: KVM_GET_LAPIC: %w", c.id, err)
	}
	return l, nil
}

// SetLAPIC writes the in-kernel local APIC registers.
func (c *VCPU) SetLAPIC(l LAPICState) error {
	if err := gokvm.SetLocalAPIC(c.fd(), &l); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_LAPIC: %w", c.id, err)
	}
	return nil
}

// GetEvents reads pending exceptions, interrupts and NMIs.
func (c *VCPU) GetEvents() (VCPUEvents, error) {
	var e VCPUEvents
	if err := gokvm.GetVCPUEvents(c.fd(), &e); err != nil {
		return e, fmt.Errorf("vcpu %d: KVM_GET_VCPU_EVENTS: %w", c.id, err)
	}
	return e, nil
}

// SetEvents writes pending exceptions, interrupts and NMIs.
func (c *VCPU) SetEvents(e VCPUEvents) error {
	if err := gokvm.SetVCPUEvents(c.fd(), &e); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_VCPU_EVENTS: %w", c.id, err)
	}
	return nil
}

// GetMPState reads the multiprocessing state (runnable, halted, waiting for SIPI...).
func (c *VCPU) GetMPState() (uint32, error) {
	var s gokvm.MPState
	if err := gokvm.GetMPState(c.fd(), &s); err != nil {
		return 0, fmt.Errorf("vcpu %d: KVM_GET_MP_STATE: %w", c.id, err)
	}
	return s.State, nil
}

// SetMPState writes the multiprocessing state.
func (c *VCPU) SetMPState(state uint32) error {
	s := gokvm.MPState{State: state}
	if err := gokvm.SetMPState(c.fd(), &s); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_MP_STATE: %w", c.id, err)
	}
	return nil
}

// MP states.
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSIPIReceived  = 4
)

// GetDebugRegs reads DR0-3, DR6, DR7.
func (c *VCPU) GetDebugRegs() (DebugRegs, error) {
	var d DebugRegs
	if err := gokvm.GetDebugRegs(c.fd(), &d); err != nil {
		return d, fmt.Errorf("vcpu %d: KVM_GET_DEBUGREGS: %w", c.id, err)
	}
	return d, nil
}

// SetDebugRegs writes DR0-3, DR6, DR7.
func (c *VCPU) SetDebugRegs(d DebugRegs) error {
	if err := gokvm.SetDebugRegs(c.fd(), &d); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_DEBUGREGS: %w", c.id, err)
	}
	return nil
}

// GetXCRS reads the extended control registers (XCR0).
func (c *VCPU) GetXCRS() (XCRS, error) {
	var x XCRS
	if err := gokvm.GetXCRS(c.fd(), &x); err != nil {
		return x, fmt.Errorf("vcpu %d: KVM_GET_XCRS: %w", c.id, err)
	}
	return x, nil
}

// SetXCRS writes the extended control registers.
func (c *VCPU) SetXCRS(x XCRS) error {
	if err := gokvm.SetXCRS(c.fd(), &x); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_XCRS: %w", c.id, err)
	}
	return nil
}

// GetTSCKHz returns the vCPU's TSC frequency.
func (c *VCPU) GetTSCKHz() (uint64, error) {
	f, err := gokvm.GetTSCKHz(c.fd())
	if err != nil {
		return 0, fmt.Errorf("vcpu %d: KVM_GET_TSC_KHZ: %w", c.id, err)
	}
	return f, nil
}

// SetTSCKHz sets the vCPU's TSC frequency (restore on a host with another TSC rate).
func (c *VCPU) SetTSCKHz(khz uint64) error {
	if err := gokvm.SetTSCKHz(c.fd(), khz); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_TSC_KHZ %d: %w", c.id, khz, err)
	}
	return nil
}

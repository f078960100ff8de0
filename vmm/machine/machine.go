// Package machine assembles a single-node VM: KVM VM and vCPUs, guest RAM,
// port-I/O and MMIO buses, the in-kernel irqchip, and the vCPU run loops.
// Guest-specific parts (Linux boot and its devices, or a micro-guest) are
// supplied through Loader and the buses.
//
// vCPU lifecycle: each vCPU runs on its own goroutine locked to an OS thread.
// States: running (in or around KVM_RUN) -> parked (on a pause request) ->
// running again on resume, or -> exited when the machine stops. Pause and
// stop kick every vCPU (immediate_exit + signal) so none stays in the guest.
package machine

import (
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"log/slog"
	"strings"
	"sync"

	"github.com/hpcvm/hpcvm/vmm/bus"
	"github.com/hpcvm/hpcvm/vmm/kvm"
	"github.com/hpcvm/hpcvm/vmm/layout"
	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Loader places a guest's boot image into memory and sets up the vCPUs.
type Loader interface {
	// Load writes the boot image into guest memory.
	Load(mem *memory.RAM, ncpu int) error
	// SetupVCPU sets vCPU id's initial registers (modifying the values KVM
	// reported) and returns whether it starts running at once; false means
	// it waits for INIT/SIPI from the guest (Linux application processors).
	SetupVCPU(id, ncpu int, regs *kvm.Regs, sregs *kvm.Sregs) (start bool)
}

// Config describes a machine.
type Config struct {
	CPUs     int
	MemBytes uint64
	// InKernelIRQChip creates KVM's PIC/IOAPIC/LAPICs and PIT (a VM on one
	// node). Without it HLT exits to the VMM.
	InKernelIRQChip bool
	Loader          Loader
	Logger          *slog.Logger
	// RAM, if set, is used as guest memory instead of fresh anonymous
	// memory (its size must be MemBytes); the machine does not close it.
	// Distributed slices pass RAM they registered with userfaultfd.
	RAM *memory.RAM
	// RunVCPUs lists the vCPU ids this machine runs; nil runs all CPUs.
	// A slice of a distributed VM creates and runs only its own vCPUs,
	// but every slice knows the VM has CPUs vCPUs (CPUID topology, ACPI).
	RunVCPUs []int
	// Hooks, if set, take part in every vCPU's run loop (distributed.go).
	Hooks Hooks
	// VCPUNice, if positive, is the nice value of the vCPU threads (the
	// rest of the process keeps its own): for a slice of a distributed VM,
	// so that threads serving the other slices' page requests need not
	// wait for a vCPU's time slice. Off by default: on one-CPU virt nodes
	// it starved the vCPUs instead (docs/dsm.md, Status, session 10).
	VCPUNice int
}

// ExitKind says why a machine stopped.
type ExitKind int

const (
	ExitPoweroff ExitKind = iota // guest powered off (ACPI S5, or a test's done port)
	ExitReset                    // guest asked for a reset or reboot
	ExitPanic                    // guest kernel panicked
	ExitStopped                  // stopped from outside (signal, context)
	ExitError                    // the VMM failed (KVM error, unhandled exit)
)

func (k ExitKind) String() string {
	return [...]string{"poweroff", "reset", "panic", "stopped", "error"}[k]
}

// Exit is the outcome of Run.
type Exit struct {
	Kind   ExitKind
	Reason string
	Err    error
}

// Machine is a VM on one node.
type Machine struct {
	cfg   Config
	log   *slog.Logger
	sys   *kvm.System
	vm    *kvm.VM
	ram   *memory.RAM
	vcpus []*kvm.VCPU

	IO   bus.Bus // port I/O space
	MMIO bus.Bus // MMIO space (addresses outside RAM)

	mu      sync.Mutex
	cond    *sync.Cond
	pause   bool // vCPUs must park
	parked  int
	exit    *Exit // first stop reason; non-nil once stopping
	exitCh  chan struct{}
	running bool

	closers []interface{ Close() error } // irqfds and other per-VM resources
	ownRAM  bool
}

// New creates the VM, its RAM and vCPUs, and runs the loader.
func New(cfg Config) (*Machine, error) {
	if cfg.CPUs < 1 {
		return nil, fmt.Errorf("machine: %d vCPUs: need at least 1", cfg.CPUs)
	}
	if cfg.Loader == nil {
		return nil, errors.New("machine: no loader")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	m := &Machine{cfg: cfg, log: cfg.Logger, exitCh: make(chan struct{})}
	m.cond = sync.NewCond(&m.mu)
	ok := false
	defer func() {
		if !ok {
			m.Close()
		}
	}()
	var err error
	if m.sys, err = kvm.Open(); err != nil {
		return nil, err
	}
	if max, _ := m.sys.CheckExtension(kvm.CapMaxVCPUs); max > 0 && cfg.CPUs > max {
		return nil, fmt.Errorf("machine: %d vCPUs: KVM allows at most %d", cfg.CPUs, max)
	}
	if m.vm, err = m.sys.CreateVM(); err != nil {
		return nil, err
	}
	// Pages for Intel's real-mode TSS and EPT identity map, in the MMIO gap
	// just below the IOAPIC, never RAM.
	if err := m.vm.SetTSSAddr(0xFFFBD000); err != nil {
		return nil, err
	}
	if err := m.vm.SetIdentityMapAddr(0xFFFBC000); err != nil {
		return nil, err
	}
	if cfg.InKernelIRQChip {
		if err := m.vm.CreateIRQChip(); err != nil {
			return nil, err
		}
		if err := m.vm.CreatePIT2(); err != nil {
			return nil, err
		}
	}
	if cfg.RAM != nil {
		if cfg.RAM.Size() != cfg.MemBytes {
			return nil, fmt.Errorf("machine: RAM is %d bytes, config says %d", cfg.RAM.Size(), cfg.MemBytes)
		}
		m.ram, m.ownRAM = cfg.RAM, false
	} else {
		if m.ram, err = memory.NewRAM(cfg.MemBytes, layout.MMIOGapStart); err != nil {
			return nil, err
		}
		m.ownRAM = true
	}
	for i, r := range m.ram.Regions() {
		if err := m.vm.SetMemoryRegion(uint32(i), 0, r.GPA, uint64(len(r.Host)), hostAddr(r.Host)); err != nil {
			return nil, err
		}
	}
	cpuid, err := m.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	if err := cfg.Loader.Load(m.ram, cfg.CPUs); err != nil {
		return nil, err
	}
	ids := cfg.RunVCPUs
	if ids == nil {
		for id := 0; id < cfg.CPUs; id++ {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		if id < 0 || id >= cfg.CPUs {
			return nil, fmt.Errorf("machine: vCPU %d out of range 0..%d", id, cfg.CPUs-1)
		}
		c, err := m.vm.CreateVCPU(id)
		if err != nil {
			return nil, err
		}
		m.vcpus = append(m.vcpus, c)
		if err := m.setupVCPU(c, cpuid); err != nil {
			return nil, err
		}
	}
	// Write every vCPU's TSC back to back: KVM treats TSC writes close in
	// time as one synchronized TSC, so the guest does not see unsynchronized
	// TSCs (which makes Linux mark the TSC unstable).
	for _, c := range m.vcpus {
		if err := c.SetMSRs([]kvm.MSREntry{{Index: msrIA32TSC, Data: 0}}); err != nil {
			return nil, err
		}
	}
	ok = true
	return m, nil
}

// RAM returns guest memory.
func (m *Machine) RAM() *memory.RAM { return m.ram }

// VM returns the KVM VM (for devices that use IRQ lines and eventfds).
func (m *Machine) VM() *kvm.VM { return m.vm }

// CPUs returns the number of vCPUs this machine runs.
func (m *Machine) CPUs() int { return len(m.vcpus) }

// Close releases vCPUs, the VM and guest RAM. Run must have returned.
func (m *Machine) Close() error {
	for _, c := range m.closers {
		c.Close()
	}
	m.closers = nil
	for _, c := range m.vcpus {
		c.Close()
	}
	m.vcpus = nil
	if m.vm != nil {
		m.vm.Close()
		m.vm = nil
	}
	if m.sys != nil {
		m.sys.Close()
		m.sys = nil
	}
	if m.ram != nil && m.ownRAM {
		m.ram.Close()
	}
	m.ram = nil
	return nil
}

// Stop makes Run return with the given outcome (the first Stop wins).
// Safe to call from devices on vCPU threads and from any goroutine.
func (m *Machine) Stop(kind ExitKind, reason string, err error) {
	m.mu.Lock()
	if m.exit != nil {
		m.mu.Unlock()
		return
	}
	m.exit = &Exit{Kind: kind, Reason: reason, Err: err}
	close(m.exitCh)
	m.cond.Broadcast()
	m.mu.Unlock()
	for _, c := range m.vcpus {
		c.Kick()
	}
}

// Run starts every vCPU and blocks until the machine stops (guest poweroff,
// reset, a VMM error, Stop, or ctx cancelled).
func (m *Machine) Run(ctx context.Context) Exit {
	m.mu.Lock()
	if m.running {
		m.mu.Unlock()
		return Exit{Kind: ExitError, Reason: "machine already ran", Err: errors.New("machine: Run called twice")}
	}
	m.running = true
	m.mu.Unlock()

	var wg sync.WaitGroup
	for _, c := range m.vcpus {
		wg.Add(1)
		go func(c *kvm.VCPU) {
			defer wg.Done()
			m.runVCPU(c)
		}(c)
	}
	select {
	case <-m.exitCh:
	case <-ctx.Done():
		m.Stop(ExitStopped, context.Cause(ctx).Error(), nil)
	}
	wg.Wait()
	m.mu.Lock()
	defer m.mu.Unlock()
	return *m.exit
}

// Pause parks every vCPU outside KVM_RUN; their state can then be read or
// written. It returns once all are parked (or the machine is stopping).
func (m *Machine) Pause() {
	m.mu.Lock()
	m.pause = true
	m.mu.Unlock()
	for _, c := range m.vcpus {
		c.Kick()
	}
	m.mu.Lock()
	for m.parked < len(m.vcpus) && m.exit == nil {
		m.cond.Wait()
	}
	m.mu.Unlock()
}

// Resume lets paused vCPUs run again.
func (m *Machine) Resume() {
	m.mu.Lock()
	m.pause = false
	m.cond.Broadcast()
	m.mu.Unlock()
}

// checkpoint is called by a vCPU between KVM_RUN calls: it parks while a
// pause is requested and reports whether the vCPU must exit.
func (m *Machine) checkpoint() (stop bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pause && m.exit == nil {
		m.parked++
		m.cond.Broadcast()
		for m.pause && m.exit == nil {
			m.cond.Wait()
		}
		m.parked--
	}
	return m.exit != nil
}

func (m *Machine) runVCPU(c *kvm.VCPU) {
	c.LockThread()
	defer c.UnlockThread()
	if n := m.cfg.VCPUNice; n > 0 {
		// Per thread (Linux): only this vCPU's thread. Restored before
		// the thread goes back to the Go scheduler's pool.
		tid := unix.Gettid()
		if old, err := unix.Getpriority(unix.PRIO_PROCESS, tid); err == nil {
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, n); err != nil {
				m.log.Warn("vcpu thread priority not lowered", "vcpu", c.ID(), "nice", n, "err", err)
			} else {
				// getpriority(2) returns 20 - nice.
				defer unix.Setpriority(unix.PRIO_PROCESS, tid, 20-old)
			}
		}
	}
	for {
		if m.checkpoint() {
			m.reportStopState(c)
			return
		}
		if m.cfg.Hooks != nil {
			if err := m.cfg.Hooks.BeforeRun(c); err != nil {
				m.Stop(ExitError, err.Error(), err)
				return
			}
		}
		exit, err := c.Run()
		if errors.Is(err, kvm.ErrInterrupted) {
			continue
		}
		if err != nil {
			m.Stop(ExitError, err.Error(), err)
			return
		}
		if err := m.handleExit(c, exit); err != nil {
			m.Stop(ExitError, err.Error(), err)
			return
		}
	}
}

func (m *Machine) handleExit(c *kvm.VCPU, e kvm.Exit) error {
	if m.cfg.Hooks != nil {
		if handled, err := m.cfg.Hooks.HandleExit(c, &e); handled || err != nil {
			return err
		}
	}
	switch e.Reason {
	case kvm.ExitIO:
		for off := 0; off+e.IOSize <= len(e.IOData); off += e.IOSize {
			d := e.IOData[off : off+e.IOSize]
			if e.IOWrite {
				m.IO.Write(uint64(e.Port), d)
			} else {
				m.IO.Read(uint64(e.Port), d)
			}
		}
	case kvm.ExitMMIO:
		if e.MMIOWrite {
			m.MMIO.Write(e.MMIOAddr, e.MMIOData)
		} else {
			m.MMIO.Read(e.MMIOAddr, e.MMIOData)
		}
	case kvm.ExitHLT:
		// Only without the in-kernel LAPIC: a halted vCPU with nothing to
		// wake it has finished.
		m.log.Debug("vcpu halted", "vcpu", c.ID())
		m.parkForever()
	case kvm.ExitShutdown:
		m.Stop(ExitReset, fmt.Sprintf("vcpu %d: triple fault (KVM_EXIT_SHUTDOWN)%s", c.ID(), m.where(c)), nil)
	case kvm.ExitSystemEvent:
		switch e.EventType {
		case kvm.SystemEventShutdown:
			m.Stop(ExitPoweroff, "guest powered off", nil)
		case kvm.SystemEventReset:
			m.Stop(ExitReset, "guest requested reset", nil)
		default:
			m.Stop(ExitPanic, fmt.Sprintf("guest crash (system event %d)", e.EventType), nil)
		}
	case kvm.ExitInternalError:
		return fmt.Errorf("vcpu %d: KVM internal error, suberror %d, data %#x%s", c.ID(), e.Suberror, e.InternalRaw, m.where(c))
	case kvm.ExitFailEntry:
		return fmt.Errorf("vcpu %d: VM entry failed, hardware reason %#x", c.ID(), e.FailReason)
	case kvm.ExitIntr, kvm.ExitIRQWindowOpen:
	default:
		return fmt.Errorf("vcpu %d: unexpected exit %v%s", c.ID(), e.Reason, m.where(c))
	}
	return nil
}

// parkForever blocks a vCPU that has nothing more to run until the machine stops.
func (m *Machine) parkForever() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.parked++
	m.cond.Broadcast()
	for m.exit == nil {
		m.cond.Wait()
	}
	m.parked--
}

// reportStopState logs where a vCPU was when the machine was stopped from
// outside or failed (not when the guest powered off, reset or panicked):
// for a guest that hung, this is the first clue (like QEMU's "info
// registers"). A Hooks that is also a VCPUDescriber adds its own state.
func (m *Machine) reportStopState(c *kvm.VCPU) {
	m.mu.Lock()
	kind := m.exit.Kind
	m.mu.Unlock()
	if kind != ExitStopped && kind != ExitError {
		return
	}
	r, err := c.GetRegs()
	if err != nil {
		return
	}
	attrs := []any{"vcpu", c.ID(), "rip", fmt.Sprintf("%#x", r.RIP), "rsp", fmt.Sprintf("%#x", r.RSP),
		"rflags", fmt.Sprintf("%#x", r.RFLAGS)}
	gprs := []struct {
		name string
		v    uint64
	}{{"rax", r.RAX}, {"rbx", r.RBX}, {"rcx", r.RCX}, {"rdx", r.RDX}, {"rsi", r.RSI}, {"rdi", r.RDI},
		{"rbp", r.RBP}, {"r8", r.R8}, {"r9", r.R9}, {"r10", r.R10}, {"r11", r.R11}, {"r12", r.R12},
		{"r13", r.R13}, {"r14", r.R14}, {"r15", r.R15}}
	var regs strings.Builder
	for _, g := range gprs {
		fmt.Fprintf(&regs, "%s=%#x ", g.name, g.v)
	}
	attrs = append(attrs, "regs", strings.TrimSpace(regs.String()))
	if sr, err := c.GetSregs(); err == nil {
		attrs = append(attrs, "cr3", fmt.Sprintf("%#x", sr.CR3), "cpl", sr.CS.DPL)
		// Kernel-half addresses in registers (a lock a vCPU spins on,
		// the object it works on): what backs them.
		if d, ok := m.cfg.Hooks.(AddrDescriber); ok && sr.CR0&(1<<31) != 0 {
			for _, g := range gprs {
				if g.v>>47 == 0x1ffff && (g.name == "rbx" || g.name == "rdi") {
					attrs = append(attrs, "at_"+g.name, d.DescribeAddr(sr.CR3, g.v))
				}
			}
		}
	}
	if d, ok := m.cfg.Hooks.(VCPUDescriber); ok {
		attrs = append(attrs, "state", d.DescribeVCPU(c.ID()))
	}
	m.log.Warn("vcpu state at stop", attrs...)
}

// where describes a vCPU's instruction pointer for error messages.
func (m *Machine) where(c *kvm.VCPU) string {
	r, err := c.GetRegs()
	if err != nil {
		return ""
	}
	return fmt.Sprintf(" at rip %#x", r.RIP)
}

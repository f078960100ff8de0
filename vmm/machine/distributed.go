package machine

import (
	"github.com/hpcvm/hpcvm/vmm/kvm"
)

// Hooks let a VMM that emulates the interrupt controllers and forwards
// device accesses (a slice of a distributed VM, docs/dsm.md) take part in
// every vCPU's run loop. Both methods run on the vCPU's own thread.
type Hooks interface {
	// BeforeRun is called before every KVM_RUN: inject interrupts, hold a
	// vCPU that waits for a startup IPI. It may block (see Machine.Idle)
	// but must return once Stopping() is closed.
	BeforeRun(c *kvm.VCPU) error
	// HandleExit sees every exit before the machine's own handling; if it
	// returns handled, the machine does nothing more with it.
	HandleExit(c *kvm.VCPU, e *kvm.Exit) (handled bool, err error)
}

// VCPUDescriber is an optional part of Hooks: a one-line description of a
// vCPU's state outside KVM (interrupt controller, halted or waiting), logged
// with its registers when the machine is stopped from outside or fails.
type VCPUDescriber interface {
	DescribeVCPU(id int) string
}

// AddrDescriber is an optional part of Hooks: what backs a guest-virtual
// address of a stopped vCPU (for a distributed VM, the page's state on
// this slice). The stop-time report asks it about the registers that hold
// kernel addresses: a vCPU spinning on a lock has the lock's address in
// one of them.
type AddrDescriber interface {
	DescribeAddr(cr3, va uint64) string
}

// Kick forces vCPU id out of KVM_RUN (or makes its next KVM_RUN return at
// once) so its run loop calls Hooks.BeforeRun again. It does nothing if
// this machine does not run vCPU id.
func (m *Machine) Kick(id int) {
	for _, c := range m.vcpus {
		if c.ID() == id {
			c.Kick()
			return
		}
	}
}

// Stopping is closed once the machine is stopping.
func (m *Machine) Stopping() <-chan struct{} { return m.exitCh }

// Idle blocks the calling vCPU thread (a halted vCPU, or one waiting for a
// startup IPI) until wake is signalled or the machine stops; it reports
// whether the machine is stopping. While idle the vCPU counts as parked,
// so Pause does not wait for it.
func (m *Machine) Idle(wake <-chan struct{}) (stopping bool) {
	m.mu.Lock()
	m.parked++
	m.cond.Broadcast()
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.parked--
		m.mu.Unlock()
	}()
	select {
	case <-wake:
		return false
	case <-m.exitCh:
		return true
	}
}

package kvm

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// Userspace interrupt controller support (a VM without KVM_CREATE_IRQCHIP,
// whose LAPICs and IOAPIC the VMM emulates, as distributed slices do).
//
// The protocol (Documentation/virt/kvm/api.rst, KVM_INTERRUPT): before
// KVM_RUN the VMM injects an external interrupt with Interrupt only when
// the previous exit reported ReadyForInterruptInjection; otherwise it sets
// RequestInterruptWindow and KVM exits with KVM_EXIT_IRQ_WINDOW_OPEN as
// soon as the guest can take one. CR8 (the task priority) is mirrored in
// kvm_run both ways.

const (
	nrInterrupt = 0x86
	nrNMI       = 0x9a
)

// Interrupt queues external interrupt vector on the vCPU (KVM_INTERRUPT).
// Call it on the vCPU's thread, between exits, only when
// ReadyForInterruptInjection is true.
func (c *VCPU) Interrupt(vector uint8) error {
	irq := uint32(vector)
	if _, err := ioctl(c.fd(), gokvm.IIOW(nrInterrupt, unsafe.Sizeof(irq)), unsafe.Pointer(&irq)); err != nil {
		return fmt.Errorf("vcpu %d: KVM_INTERRUPT vector %#x: %w", c.id, vector, err)
	}
	return nil
}

// NMI queues a non-maskable interrupt on the vCPU (KVM_NMI).
func (c *VCPU) NMI() error {
	if _, err := gokvm.Ioctl(c.fd(), gokvm.IIO(nrNMI), 0); err != nil {
		return fmt.Errorf("vcpu %d: KVM_NMI: %w", c.id, err)
	}
	return nil
}

// SetRequestInterruptWindow asks KVM to exit (KVM_EXIT_IRQ_WINDOW_OPEN)
// as soon as the guest can accept an external interrupt.
func (c *VCPU) SetRequestInterruptWindow(on bool) {
	p := (*uint32)(unsafe.Pointer(&c.run[0])) // byte 0: request_interrupt_window
	for {
		old := atomic.LoadUint32(p)
		nv := old &^ 0xff
		if on {
			nv |= 1
		}
		if atomic.CompareAndSwapUint32(p, old, nv) {
			return
		}
	}
}

// ReadyForInterruptInjection reports kvm_run.ready_for_interrupt_injection
// from the last exit: an interrupt queued now is delivered on entry.
func (c *VCPU) ReadyForInterruptInjection() bool {
	return c.run.header().ReadyForInterruptInjection != 0
}

// InterruptFlag reports kvm_run.if_flag (RFLAGS.IF) from the last exit.
func (c *VCPU) InterruptFlag() bool { return c.run.header().IfFlag != 0 }

// CR8 returns kvm_run.cr8 (the guest's task priority, TPR[7:4]) from the last exit.
func (c *VCPU) CR8() uint64 { return c.run.header().CR8 }

// SetCR8 sets the task priority KVM loads into the guest's CR8 on the next
// KVM_RUN (only without the in-kernel LAPIC).
func (c *VCPU) SetCR8(v uint64) { c.run.header().CR8 = v }

// APICBase returns kvm_run.apic_base from the last exit.
func (c *VCPU) APICBase() uint64 { return c.run.header().APICBase }

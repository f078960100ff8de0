// Package bus dispatches guest port I/O and MMIO accesses to emulated devices.
package bus

// Device is an emulated device register window. offset is relative to the
// base the device was registered at; len(data) is the access width (1, 2, 4
// or 8 bytes). Read fills data; Write consumes it. Values are little-endian.
type Device interface {
	Read(offset uint64, data []byte)
	Write(offset uint64, data []byte)
}

// Interrupt is a device's interrupt line into the guest.
// Trigger signals an edge (the VMM's interrupt controller model decides how
// it is delivered: KVM_IRQ_LINE/irqfd on one node, the emulated IOAPIC in
// distributed mode).
type Interrupt interface {
	Trigger() error
}

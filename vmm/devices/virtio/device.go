// Package virtio implements the virtio-mmio (version 2, "modern") transport
// and split virtqueues of the virtio 1.x specification. Concrete devices
// (blk, vsock) implement Device; the transport, MMIO, is what the VMM
// registers on its MMIO bus.
package virtio

import (
	"fmt"
	"log/slog"

	"github.com/hpcvm/hpcvm/vmm/memory"
)

// Device type IDs (virtio 1.x §5).
const (
	IDBlock = 2
	IDVsock = 19
)

// Transport-level feature bits (virtio 1.x §6).
const (
	FeatureRingIndirectDesc = 1 << 28
	FeatureRingEventIdx     = 1 << 29
	FeatureVersion1         = 1 << 32
)

// Device status bits (virtio 1.x §2.1).
const (
	StatusAcknowledge      = 1
	StatusDriver           = 2
	StatusDriverOK         = 4
	StatusFeaturesOK       = 8
	StatusDeviceNeedsReset = 0x40
	StatusFailed           = 0x80
)

// InterruptStatus bits.
const (
	InterruptUsedBuffer   = 1 << 0
	InterruptConfigChange = 1 << 1
)

// VendorID is reported in the VendorID register ("hpcv" would be cute but
// any value works; Linux ignores it for non-vendor devices).
const VendorID = 0x68706376

// Device is a virtio device behind a transport.
//
// The transport serialises calls to every method except that Activate's
// Env may be used from any goroutine. Notify runs on a vCPU thread and must
// not block: devices hand work to their own worker goroutine.
type Device interface {
	// Type is the virtio device ID (IDBlock, IDVsock, ...).
	Type() uint32
	// Features are the device-specific feature bits offered to the driver.
	// The transport adds VIRTIO_F_VERSION_1 and VIRTIO_F_RING_INDIRECT_DESC.
	Features() uint64
	// QueueMaxSizes gives the number of virtqueues and each one's maximum size.
	QueueMaxSizes() []uint16
	// ReadConfig and WriteConfig access the device configuration space;
	// offset is relative to the start of that space.
	ReadConfig(offset uint64, data []byte)
	WriteConfig(offset uint64, data []byte)
	// Activate starts the device after the driver set DRIVER_OK.
	Activate(env *Env) error
	// Notify reports a driver kick on queue q. It must not block.
	Notify(q int)
	// Reset stops all activity started by Activate and waits for it to
	// end; the device must not touch guest memory or env afterwards.
	Reset()
	// Close resets the device and releases its backend (files, sockets).
	Close() error
}

// Env is what an active device uses to reach the guest.
type Env struct {
	Mem memory.Guest
	// Features is the negotiated feature set.
	Features uint64
	// Queues has one entry per device queue; nil for queues the driver did
	// not enable.
	Queues []*Queue
	Log    *slog.Logger

	t *MMIO
}

// Fail records a fatal device error caused by the driver (malformed
// virtqueue, bad guest address): the device sets DEVICE_NEEDS_RESET and
// raises a configuration-change interrupt so the driver notices.
func (e *Env) Fail(err error) {
	e.Log.Error("virtio device needs reset", "err", err)
	e.t.fail()
}

// ConfigChanged bumps ConfigGeneration and raises a config-change interrupt.
func (e *Env) ConfigChanged() { e.t.configChanged() }

// Failed reports whether the device has been marked DEVICE_NEEDS_RESET.
func (e *Env) Failed() bool { return e.t.needsReset.Load() }

// errorf builds errors that name the queue problem.
func errorf(format string, args ...any) error { return fmt.Errorf("virtqueue: "+format, args...) }

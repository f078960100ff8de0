package kvm

import (
	"fmt"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// The TSC offset of a vCPU (KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET
// device attribute, Linux 5.16+): guest TSC = host TSC (scaled) + offset.
// Writing IA32_TSC instead is subject to KVM's "synchronization": a write
// within a second of what the previous write extrapolates to is snapped
// to the previous offset, so a precise value cannot be set that way.

const (
	nrSetDeviceAttr = 0xe1
	nrGetDeviceAttr = 0xe2
	vcpuTSCCtrl     = 0 // attribute group KVM_VCPU_TSC_CTRL
	vcpuTSCOffset   = 0 // attribute KVM_VCPU_TSC_OFFSET
)

// deviceAttr mirrors struct kvm_device_attr.
type deviceAttr struct {
	Flags uint32
	Group uint32
	Attr  uint64
	Addr  uint64
}

var _ [24]byte = [unsafe.Sizeof(deviceAttr{})]byte{}

// TSCOffset reads the vCPU's TSC offset.
func (c *VCPU) TSCOffset() (int64, error) {
	var v int64
	a := deviceAttr{Group: vcpuTSCCtrl, Attr: vcpuTSCOffset, Addr: uint64(uintptr(unsafe.Pointer(&v)))}
	if _, err := ioctl(c.fd(), gokvm.IIOW(nrGetDeviceAttr, unsafe.Sizeof(a)), unsafe.Pointer(&a)); err != nil {
		return 0, fmt.Errorf("vcpu %d: KVM_GET_DEVICE_ATTR (TSC offset): %w", c.id, err)
	}
	return v, nil
}

// SetTSCOffset sets the vCPU's TSC offset.
func (c *VCPU) SetTSCOffset(off int64) error {
	v := off
	a := deviceAttr{Group: vcpuTSCCtrl, Attr: vcpuTSCOffset, Addr: uint64(uintptr(unsafe.Pointer(&v)))}
	if _, err := ioctl(c.fd(), gokvm.IIOW(nrSetDeviceAttr, unsafe.Sizeof(a)), unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_DEVICE_ATTR (TSC offset %d): %w", c.id, off, err)
	}
	return nil
}

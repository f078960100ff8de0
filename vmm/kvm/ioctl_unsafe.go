package kvm

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// ioctl numbers gokvm does not define (include/uapi/linux/kvm.h).
const (
	nrGetFPU        = 0x8c
	nrSetFPU        = 0x8d
	nrIRQFD         = 0x76
	nrIOEventFD     = 0x79
	nrEnableCap     = 0xa3
	nrGetXSave      = 0xa4
	nrSetXSave      = 0xa5
	nrSignalMSI     = 0xa5
	nrGetXSave2     = 0xcf
	nrClearDirtyLog = 0xc0
	nrGetDirtyLog   = 0x42
)

func ioctl(fd uintptr, op uintptr, arg unsafe.Pointer) (uintptr, error) {
	return gokvm.Ioctl(fd, op, uintptr(arg))
}

// FPU mirrors struct kvm_fpu (legacy x87/SSE state).
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

var _ [416]byte = [unsafe.Sizeof(FPU{})]byte{}

// enableCap mirrors struct kvm_enable_cap.
type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}

var _ [104]byte = [unsafe.Sizeof(enableCap{})]byte{}

// irqfd mirrors struct kvm_irqfd.
type irqfd struct {
	FD         uint32
	GSI        uint32
	Flags      uint32
	ResampleFD uint32
	_          [16]uint8
}

var _ [32]byte = [unsafe.Sizeof(irqfd{})]byte{}

// ioeventfd mirrors struct kvm_ioeventfd.
type ioeventfd struct {
	DataMatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	_         [36]uint8
}

var _ [64]byte = [unsafe.Sizeof(ioeventfd{})]byte{}

// msi mirrors struct kvm_msi.
type msi struct {
	AddressLo uint32
	AddressHi uint32
	Data      uint32
	Flags     uint32
	DevID     uint32
	_         [12]uint8
}

var _ [32]byte = [unsafe.Sizeof(msi{})]byte{}

// dirtyLog mirrors struct kvm_dirty_log.
type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uint64 // user pointer
}

// clearDirtyLog mirrors struct kvm_clear_dirty_log.
type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uint64 // user pointer
}

// IOEventFD flags.
const (
	ioeventfdDataMatch = 1 << 0
	ioeventfdPIO       = 1 << 1
	ioeventfdDeassign  = 1 << 2
	irqfdDeassign      = 1 << 0
)

// EnableCap enables a VM capability (KVM_ENABLE_CAP on the VM fd).
func (v *VM) EnableCap(cap Capability, args ...uint64) error {
	c := enableCap{Cap: uint32(cap)}
	copy(c.Args[:], args)
	if _, err := ioctl(v.fd(), gokvm.IIOW(nrEnableCap, unsafe.Sizeof(c)), unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("KVM_ENABLE_CAP %d: %w", cap, err)
	}
	return nil
}

// IRQFD makes a write to eventfd efd raise GSI gsi without a trip through
// the VMM (KVM_IRQFD). deassign removes the binding.
func (v *VM) IRQFD(efd int, gsi uint32, deassign bool) error {
	r := irqfd{FD: uint32(efd), GSI: gsi}
	if deassign {
		r.Flags = irqfdDeassign
	}
	if _, err := ioctl(v.fd(), gokvm.IIOW(nrIRQFD, unsafe.Sizeof(r)), unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("KVM_IRQFD gsi %d: %w", gsi, err)
	}
	return nil
}

// IOEventFD makes a guest write of length size at addr (port I/O if pio)
// signal eventfd efd instead of exiting to the VMM (KVM_IOEVENTFD).
// If match is non-nil only writes of that value match.
func (v *VM) IOEventFD(efd int, addr uint64, size uint32, pio bool, match *uint64, deassign bool) error {
	r := ioeventfd{Addr: addr, Len: size, FD: int32(efd)}
	if pio {
		r.Flags |= ioeventfdPIO
	}
	if match != nil {
		r.Flags |= ioeventfdDataMatch
		r.DataMatch = *match
	}
	if deassign {
		r.Flags |= ioeventfdDeassign
	}
	if _, err := ioctl(v.fd(), gokvm.IIOW(nrIOEventFD, unsafe.Sizeof(r)), unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("KVM_IOEVENTFD addr %#x: %w", addr, err)
	}
	return nil
}

// SignalMSI injects a message-signalled interrupt (KVM_SIGNAL_MSI).
func (v *VM) SignalMSI(addr uint64, data uint32) error {
	m := msi{AddressLo: uint32(addr), AddressHi: uint32(addr >> 32), Data: data}
	if _, err := ioctl(v.fd(), gokvm.IIOW(nrSignalMSI, unsafe.Sizeof(m)), unsafe.Pointer(&m)); err != nil {
		return fmt.Errorf("KVM_SIGNAL_MSI addr %#x data %#x: %w", addr, data, err)
	}
	return nil
}

// DirtyLog returns the dirty bitmap of a slot (one bit per page, bitmap
// sized for pages pages) via KVM_GET_DIRTY_LOG.
func (v *VM) DirtyLog(slot uint32, pages uint64) ([]uint64, error) {
	bm := make([]uint64, (pages+63)/64)
	if len(bm) == 0 {
		return bm, nil
	}
	d := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(&bm[0])))}
	if _, err := ioctl(v.fd(), gokvm.IIOW(nrGetDirtyLog, unsafe.Sizeof(d)), unsafe.Pointer(&d)); err != nil {
		return nil, fmt.Errorf("KVM_GET_DIRTY_LOG slot %d: %w", slot, err)
	}
	return bm, nil
}

// ClearDirtyLog re-protects the pages set in bitmap, starting at firstPage
// (KVM_CLEAR_DIRTY_LOG; needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled).
// firstPage must be a multiple of 64.
func (v *VM) ClearDirtyLog(slot uint32, firstPage uint64, numPages uint32, bitmap []uint64) error {
	if len(bitmap) == 0 || uint64(len(bitmap))*64 < uint64(numPages) {
		return fmt.Errorf("KVM_CLEAR_DIRTY_LOG slot %d: bitmap of %d words too small for %d pages", slot, len(bitmap), numPages)
	}
	c := clearDirtyLog{Slot: slot, NumPages: numPages, FirstPage: firstPage, Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	if _, err := ioctl(v.fd(), gokvm.IIOWR(nrClearDirtyLog, unsafe.Sizeof(c)), unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("KVM_CLEAR_DIRTY_LOG slot %d: %w", slot, err)
	}
	return nil
}

// GetFPU reads the legacy FPU state (KVM_GET_FPU).
func (c *VCPU) GetFPU() (FPU, error) {
	var f FPU
	if _, err := ioctl(c.fd(), gokvm.IIOR(nrGetFPU, unsafe.Sizeof(f)), unsafe.Pointer(&f)); err != nil {
		return f, fmt.Errorf("vcpu %d: KVM_GET_FPU: %w", c.id, err)
	}
	return f, nil
}

// SetFPU writes the legacy FPU state (KVM_SET_FPU). KVM ignores MXCSR
// here; set it through the XSAVE area (SetMXCSR).
func (c *VCPU) SetFPU(f FPU) error {
	if _, err := ioctl(c.fd(), gokvm.IIOW(nrSetFPU, unsafe.Sizeof(f)), unsafe.Pointer(&f)); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_FPU: %w", c.id, err)
	}
	return nil
}

// xsaveLegacySize is sizeof(struct kvm_xsave) without the flexible tail.
const xsaveLegacySize = 4096

// GetXSave reads the XSAVE area (KVM_GET_XSAVE2 when the host has larger
// state components such as AMX, else KVM_GET_XSAVE). The result is opaque
// bytes in the XSAVE standard format.
func (c *VCPU) GetXSave() ([]byte, error) {
	size := xsaveLegacySize
	nr := uintptr(nrGetXSave)
	if c.sys.xsave2Sz > size {
		size, nr = c.sys.xsave2Sz, nrGetXSave2
	}
	buf := make([]byte, size)
	if _, err := ioctl(c.fd(), gokvm.IIOR(nr, xsaveLegacySize), unsafe.Pointer(&buf[0])); err != nil {
		return nil, fmt.Errorf("vcpu %d: KVM_GET_XSAVE: %w", c.id, err)
	}
	return buf, nil
}

// SetXSave writes an XSAVE area read by GetXSave.
func (c *VCPU) SetXSave(buf []byte) error {
	if len(buf) < xsaveLegacySize {
		return fmt.Errorf("vcpu %d: KVM_SET_XSAVE: area is %d bytes, need at least %d", c.id, len(buf), xsaveLegacySize)
	}
	if c.sys.xsave2Sz > xsaveLegacySize && len(buf) < c.sys.xsave2Sz {
		// The kernel copies xsave2Sz bytes: pad a short (older) area with zeros.
		buf = append(buf, make([]byte, c.sys.xsave2Sz-len(buf))...)
	}
	if _, err := ioctl(c.fd(), gokvm.IIOW(nrSetXSave, xsaveLegacySize), unsafe.Pointer(&buf[0])); err != nil {
		return fmt.Errorf("vcpu %d: KVM_SET_XSAVE: %w", c.id, err)
	}
	return nil
}

// SetMXCSR sets the SSE control register through the XSAVE area, the only
// ioctl that carries it (KVM_SET_FPU ignores the field).
func (c *VCPU) SetMXCSR(v uint32) error {
	xs, err := c.GetXSave()
	if err != nil {
		return err
	}
	const mxcsrOff, xstateBVOff, sse = 24, 512, 1 << 1
	binary.LittleEndian.PutUint32(xs[mxcsrOff:], v)
	// MXCSR is only loaded when the SSE component is marked present.
	bv := binary.LittleEndian.Uint64(xs[xstateBVOff:])
	binary.LittleEndian.PutUint64(xs[xstateBVOff:], bv|sse)
	return c.SetXSave(xs)
}

// EnableCap enables a vCPU capability (KVM_ENABLE_CAP on the vCPU fd).
func (c *VCPU) EnableCap(cap Capability, args ...uint64) error {
	e := enableCap{Cap: uint32(cap)}
	copy(e.Args[:], args)
	if _, err := ioctl(c.fd(), gokvm.IIOW(nrEnableCap, unsafe.Sizeof(e)), unsafe.Pointer(&e)); err != nil {
		return fmt.Errorf("vcpu %d: KVM_ENABLE_CAP %d: %w", c.id, cap, err)
	}
	return nil
}

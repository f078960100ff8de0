package uffd

import (
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The structs below mirror include/uapi/linux/userfaultfd.h (Linux 6.x);
// field order and sizes must match the kernel's exactly.

// uffdioAPI mirrors struct uffdio_api.
type uffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// uffdioRange mirrors struct uffdio_range.
type uffdioRange struct {
	Start uint64
	Len   uint64
}

// uffdioRegister mirrors struct uffdio_register.
type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

// uffdioCopy mirrors struct uffdio_copy.
type uffdioCopy struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64
}

// uffdioZeropage mirrors struct uffdio_zeropage.
type uffdioZeropage struct {
	Range    uffdioRange
	Mode     uint64
	Zeropage int64
}

// uffdioWriteprotect mirrors struct uffdio_writeprotect.
type uffdioWriteprotect struct {
	Range uffdioRange
	Mode  uint64
}

// uffdMsg mirrors struct uffd_msg (packed, 32 bytes) for the pagefault
// member of its union, the only event this package enables.
type uffdMsg struct {
	Event   uint8
	_       uint8
	_       uint16
	_       uint32
	Flags   uint64 // arg.pagefault.flags
	Address uint64 // arg.pagefault.address
	PTID    uint32 // arg.pagefault.feat.ptid
	_       uint32
}

const msgSize = int(unsafe.Sizeof(uffdMsg{}))

// Linux _IOC encoding for x86-64.
func ioc(dir, typ, nr, size uintptr) uintptr { return dir<<30 | size<<16 | typ<<8 | nr }

const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
	uffdType = 0xAA
)

var (
	ioctlNew          = ioc(iocNone, uffdType, 0x00, 0) // USERFAULTFD_IOC_NEW on /dev/userfaultfd
	ioctlAPI          = ioc(iocRead|iocWrite, uffdType, 0x3F, unsafe.Sizeof(uffdioAPI{}))
	ioctlRegister     = ioc(iocRead|iocWrite, uffdType, 0x00, unsafe.Sizeof(uffdioRegister{}))
	ioctlUnregister   = ioc(iocRead, uffdType, 0x01, unsafe.Sizeof(uffdioRange{}))
	ioctlWake         = ioc(iocRead, uffdType, 0x02, unsafe.Sizeof(uffdioRange{}))
	ioctlCopy         = ioc(iocRead|iocWrite, uffdType, 0x03, unsafe.Sizeof(uffdioCopy{}))
	ioctlZeropage     = ioc(iocRead|iocWrite, uffdType, 0x04, unsafe.Sizeof(uffdioZeropage{}))
	ioctlWriteprotect = ioc(iocRead|iocWrite, uffdType, 0x06, unsafe.Sizeof(uffdioWriteprotect{}))
)

func ioctlPtr(fd, op uintptr, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, fd, op, uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}

// Addr returns the host virtual address of b's first byte.
func Addr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

func bytesAddr(b []byte) uint64 { return uint64(Addr(b)) }

func decodeMsgs(buf []byte, out []Event) int {
	n := 0
	for off := 0; off+msgSize <= len(buf) && n < len(out); off += msgSize {
		m := (*uffdMsg)(unsafe.Pointer(&buf[off]))
		out[n] = Event{Kind: m.Event, Flags: m.Flags, Address: m.Address, TID: m.PTID}
		n++
	}
	return n
}

// ioctlOn runs a userfaultfd ioctl whose argument is *arg, unless the FD
// is closed.
func ioctlOn[T any](u *FD, op uintptr, arg *T) error {
	u.mu.RLock()
	defer u.mu.RUnlock()
	if u.closed.Load() {
		return ErrClosed
	}
	err := ioctlPtr(uintptr(u.fd), op, unsafe.Pointer(arg))
	runtime.KeepAlive(arg)
	return err
}

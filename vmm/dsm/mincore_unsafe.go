package dsm

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// mincore reports which pages of b are resident (bit 0 of each vec byte);
// mincore(2) with vec one byte per page.
func mincore(b []byte, vec []byte) error {
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)), uintptr(unsafe.Pointer(unsafe.SliceData(vec))))
	if e != 0 {
		return e
	}
	return nil
}

package machine

import "unsafe"

// hostAddr is the user address of a guest RAM mapping, for KVM memory slots.
func hostAddr(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

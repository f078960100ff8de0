package kvm

import "unsafe"

// uintptrOf returns the address of a byte slice's first element for an ioctl argument.
func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

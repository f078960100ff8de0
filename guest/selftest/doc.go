// Package selftest boots the guest artifacts (guest/kernel, guest/initramfs,
// guest/cloud) under plain QEMU TCG (-M microvm, no KVM) and checks the /init
// protocol on the serial console. Run it with `make guest-selftest`; under a
// plain `go test ./...` it skips unless HPCVM_GUEST_SELFTEST=1.
package selftest

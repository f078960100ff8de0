# Guest artifacts booted by the VMM and the e2e tests (see docs/guest.md).
# Outputs live in $(HPCVM_CACHE)/guest, keyed by hashes of their inputs.
GUEST_OUT := $(HPCVM_CACHE)/guest

.PHONY: guest guest-kernel guest-initramfs guest-cloud-kernel guest-selftest

guest: guest-kernel guest-initramfs guest-cloud-kernel

# Minimal kernel: $(GUEST_OUT)/bzImage and $(GUEST_OUT)/vmlinux (PVH ELF).
guest-kernel:
	guest/kernel/build.sh

# Test initramfs: busybox + hpcvm-testguest + /init.
guest-initramfs:
	guest/initramfs/build.sh $(GUEST_OUT)/test-initramfs.cpio.gz

# Debian's cloud kernel (pinned) + initramfs with its virtio/vsock modules.
guest-cloud-kernel:
	guest/cloud/build.sh

# Boot every artifact under plain QEMU TCG (-M microvm) and check the console
# protocol and the ACPI poweroff; skips with the reason if qemu is missing.
guest-selftest: guest-kernel guest-initramfs guest-cloud-kernel
	HPCVM_GUEST_SELFTEST=1 $(GO) test -count=1 -v -timeout 40m ./guest/selftest

# deps: install what a fresh Debian 12 machine lacks (root; apt-get + Go modules).
# Each package is installed only when missing, so this is quick when all is there.
APT_PACKAGES := qemu-system-x86 busybox-static cpio kmod iproute2 xz-utils lz4 e2fsprogs socat \
	linux-source-6.1 bc flex bison libelf-dev libssl-dev make gcc build-essential acpica-tools util-linux
DEPS_STAMP := $(HPCVM_CACHE)/deps-$(shell echo $(APT_PACKAGES) | sha256sum | cut -c1-12).stamp

.PHONY: deps
# Subsystems add their own package sets: slurm-deps (mk/slurm.mk), image-deps (mk/images.mk).
deps: $(DEPS_STAMP) slurm-deps image-deps
$(DEPS_STAMP):
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing $$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "deps: need root to apt-get install: $$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(GO) mod download
	@mkdir -p $(dir $@) && touch $@

# demo-vm: the VM-only demo (see test/demo): one virt node boots a Linux guest
# with `hpcvm vm run`. `make demo`, the README's main job, is in mk/slurm.mk.
.PHONY: demo-vm
demo-vm: deps build node-assets guest-kernel guest-initramfs
	$(GO) run ./test/demo --hpcvm $(BIN)/hpcvm

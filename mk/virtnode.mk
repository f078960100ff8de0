# Virt-node harness and the e2e tier (see docs/testing.md).
#   make node-assets   node kernel + initramfs into $(HPCVM_CACHE)/node/<version>
#   make e2e           the virt-node tier alone (boots QEMU TCG nodes)
#   make bench         boot-time benchmark in a virt node -> docs/benchmarks.md
#   make e2e E2E_RUN=TestBoot/minimal-pvh-1cpu   one test (go test -run syntax)
#   make e2e-dsm-linux Linux across `hpcvm slice` processes, in one node and on 2 nodes (issue 7; opt-in)
#   make e2e-reset-rate  guest resets in nodes, hpcvm vs QEMU microvm (TF_KERNEL, TF_RUNS)

# Debian packages the harness needs on the host (installed by virtnode-deps
# when missing).
VIRTNODE_APT := qemu-system-x86 busybox-static cpio kmod iproute2 xz-utils zstd util-linux e2fsprogs
E2E_RUN ?= .
E2E_TIMEOUT ?= 60m
E2E_PKGS ?= ./test/virtnode/ ./test/e2e/

.PHONY: virtnode-deps node-assets e2e bench e2e-dsm-linux

virtnode-deps:
	@missing=""; for p in $(VIRTNODE_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "virtnode-deps: installing$$missing"; \
		apt-get install -y --no-install-recommends $$missing || \
		{ apt-get update && apt-get install -y --no-install-recommends $$missing; }; \
	fi

node-assets: virtnode-deps
	test/virtnode/assets/mkassets.sh

# -p 1: one package at a time, the nodes already use both cores.
# HPCVM_E2E_REQUIRE=1: missing prerequisites fail instead of skipping.
e2e: build node-assets guest-kernel guest-cloud-kernel guest-initramfs
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm $(GO) test -tags e2e -count=1 -p 1 -v \
		-timeout $(E2E_TIMEOUT) -run '$(E2E_RUN)' $(E2E_PKGS)

e2e-dsm-linux: build node-assets guest-kernel guest-initramfs
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm $(GO) test -tags 'e2e dsmlinux' -count=1 -v \
		-timeout 90m -run 'TestLinuxAcrossSlices|TestSlicesAcrossNodes' ./test/e2e/

bench: build node-assets guest-kernel guest-initramfs
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm HPCVM_BENCH_DOC=$(CURDIR)/docs/benchmarks.md \
		$(GO) test -tags bench -count=1 -p 1 -timeout 60m -v -run 'TestBootBench' ./test/bench/

# e2e-reset-rate: how often a 2-vCPU guest fails to boot in a virt node
# (guest reset: triple fault or panic), hpcvm against QEMU's microvm booted
# alternately in one node (test/e2e/tfrate_test.go; docs/testing.md).
# TF_KERNEL=minimal|cloud, TF_RUNS boots of each.
TF_KERNEL ?= cloud
TF_RUNS ?= 8
.PHONY: e2e-reset-rate
e2e-reset-rate: build node-assets guest-kernel guest-cloud-kernel guest-initramfs
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm HPCVM_TF_KERNEL=$(TF_KERNEL) HPCVM_TF_RUNS=$(TF_RUNS) \
		$(GO) test -tags 'e2e tfrate' -count=1 -p 1 -v -timeout 90m -run TestGuestResetRate ./test/e2e/

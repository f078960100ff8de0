# hpcvm build and test entry points. Per-subsystem rules live in mk/*.mk.
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
# Downloads and builds that are slow to redo (kernels, node initramfs) are
# cached here, outside the work tree, so a second run starts in seconds.
HPCVM_CACHE ?= $(HOME)/.cache/hpcvm
export HPCVM_CACHE

.PHONY: all build test unit e2e bench clean
all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/hpcvm ./cmd/hpcvm

# unit: fast tier (unit tests + micro-guests on /dev/kvm). The micro-guest
# tests are listed one by one and must pass, not skip. On a host with no
# /dev/kvm at all (a host that is itself a PVM guest), the packages with
# KVM tests run inside a virt node instead, where KVM is real
# (kvm-in-node; docs/testing.md, "Where the KVM tests run").
# vmm/dsm is left out: nested in a node its slices' VMs are unstable (a node
# kernel panic in KVM_RUN, a VM teardown stuck in synchronize_srcu, a peer
# silent for 30 s; docs/testing.md); its protocol tests without KVM run above.
KVM_PKGS := ./vmm/kvm ./vmm/microguest ./vmm/uffd ./vmm/machine ./vmm/linuxvm ./vmm/boot ./cmd/hpcvm

unit:
	$(GO) vet ./...
	$(GO) test -count=1 ./...
	@if [ ! -c /dev/kvm ]; then \
		echo "unit: this host has no /dev/kvm: the KVM tests run in a virt node (make kvm-in-node)"; \
		$(MAKE) --no-print-directory kvm-in-node; exit; \
	fi; \
	mkdir -p $(BIN); echo "micro-guests on /dev/kvm:"; \
	set -o pipefail; $(GO) test -count=1 -v ./vmm/microguest/ ./vmm/kvm/ > $(BIN)/.microguest.log 2>&1 || { cat $(BIN)/.microguest.log; exit 1; }; \
		grep -E '^(--- |ok|FAIL)' $(BIN)/.microguest.log; \
		if grep -q -- '--- SKIP' $(BIN)/.microguest.log; then echo "micro-guest tests were skipped (no usable /dev/kvm?)" >&2; exit 1; fi

# kvm-in-node: every package of KVM_PKGS, compiled here and run in one
# virt node; a skip for want of KVM or userfaultfd fails it.
.PHONY: kvm-in-node
kvm-in-node: build node-assets
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm HPCVM_E2E_KVM_PKGS="$(KVM_PKGS)" $(GO) test -tags e2e -count=1 -v \
		-timeout 90m -run 'TestKVMTestsInNode' ./test/e2e/

-include mk/*.mk

# test: both tiers.
test: deps build unit e2e

clean:
	rm -rf $(BIN)

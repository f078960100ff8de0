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
# tests are listed one by one and must pass, not skip: they need /dev/kvm
# and root, which every machine of this project has.
unit:
	$(GO) vet ./...
	$(GO) test -count=1 ./...
	@mkdir -p $(BIN); echo "micro-guests on /dev/kvm:"
	@set -o pipefail; $(GO) test -count=1 -v ./vmm/microguest/ ./vmm/kvm/ > $(BIN)/.microguest.log 2>&1 || { cat $(BIN)/.microguest.log; exit 1; }; \
		grep -E '^(--- |ok|FAIL)' $(BIN)/.microguest.log; \
		if grep -q -- '--- SKIP' $(BIN)/.microguest.log; then echo "micro-guest tests were skipped (no usable /dev/kvm?)" >&2; exit 1; fi

-include mk/*.mk

# test: both tiers.
test: deps build unit e2e

clean:
	rm -rf $(BIN)

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

# unit: fast tier (unit tests + micro-guests on /dev/kvm).
unit:
	$(GO) vet ./...
	$(GO) test -count=1 ./...

-include mk/*.mk

# test: both tiers.
test: deps build unit e2e

clean:
	rm -rf $(BIN)

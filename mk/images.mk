# Guest agent and OS images (see docs/images.md, docs/agent.md).
#   make agent              static bin/hpcvm-agent (CGO_ENABLED=0)
#   make image-debian12     build images/debian12.toml into $(IMAGE_STORE)
#   make image-test         the real debootstrap build test (HPCVM_IMAGE_BUILD_TEST=1)
IMAGE_STORE ?= $(or $(HPCVM_IMAGE_STORE),/var/lib/hpcvm/images)
IMAGE_APT := debootstrap e2fsprogs

.PHONY: agent image-deps image-debian12 image-test

agent:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=false -ldflags "-X main.version=$$(sh guest/agent/version.sh)" \
		-o $(BIN)/hpcvm-agent ./guest/agent

image-deps:
	@missing=""; for p in $(IMAGE_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "image-deps: installing$$missing"; \
		apt-get install -y --no-install-recommends $$missing || \
		{ apt-get update && apt-get install -y --no-install-recommends $$missing; }; \
	fi

# Cached: a second run with the same definition and agent returns at once.
image-debian12: build agent image-deps
	$(BIN)/hpcvm image build --store $(IMAGE_STORE) --agent $(BIN)/hpcvm-agent images/debian12.toml

image-test: agent image-deps
	HPCVM_IMAGE_BUILD_TEST=1 HPCVM_AGENT=$(BIN)/hpcvm-agent HPCVM_IMAGE_TEST_STORE=$(HPCVM_CACHE)/images/test-store \
		$(GO) test -count=1 -v -timeout 60m -run TestRealBuild ./images/

# `make e2e` runs TestRun on a tiny image (minimal kernel); with the
# e2eimages tag it also boots the default Debian image, which Debian
# kernels' occasional nested-virt failures keep out of `make test`
# (docs/testing.md). The benchmark boots it too.
bench: image-debian12
# TestRun's tiny image carries the real agent.
e2e: agent

.PHONY: e2e-images
e2e-images: build node-assets guest-kernel guest-initramfs image-debian12
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm HPCVM_IMAGE_STORE=$(IMAGE_STORE) $(GO) test -tags e2e,e2eimages -count=1 -p 1 -v \
		-timeout 60m -run 'TestRun' ./test/e2e/

# e2e-images-loop: the Debian-guest stability measurement of docs/testing.md,
# rerunnable: TestRun with the Debian image LOOP times (default 4), each in
# fresh nodes; prints every run's outcome, its retries (a guest triple
# fault) and node failures, and a pass count. Exits non-zero unless all pass.
LOOP ?= 4
.PHONY: e2e-images-loop
e2e-images-loop: build node-assets guest-kernel guest-initramfs image-debian12
	@pass=0; mkdir -p $(BIN)/loop; for i in $$(seq 1 $(LOOP)); do \
		start=$$(date +%s); \
		HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm HPCVM_IMAGE_STORE=$(IMAGE_STORE) $(GO) test -tags e2e,e2eimages -count=1 -p 1 -v \
			-timeout 30m -run 'TestRun$$' ./test/e2e/ >$(BIN)/loop/run$$i.log 2>&1 && { pass=$$((pass+1)); r=PASS; } || r=FAIL; \
		echo "run $$i: $$r after $$(( $$(date +%s) - start )) s; guest resets retried: $$(grep -c 'triple-faulted' $(BIN)/loop/run$$i.log);" \
			"node failures: $$(grep -cE 'virt node hung|died while running' $(BIN)/loop/run$$i.log) ($(BIN)/loop/run$$i.log)"; \
	done; echo "e2e-images-loop: $$pass of $(LOOP) runs passed"; [ $$pass -eq $(LOOP) ]

# Slurm integration (see docs/slurm.md).
#   make slurm-deps   Debian's Slurm 22.05 daemons, slurmdbd, client, headers, munge and MariaDB (apt, when missing)
#   make spank        the C SPANK plugin: bin/hpcvm_spank.so
#   make spank-test   the plugin's fast e2e test (namespaced slurmd nodes on this host, no VMs)
#   make lab-up / lab-status / lab-down   a Slurm cluster of virt nodes (hpcvm lab)
#   make e2e-slurm-vm  the real-guest Slurm job test (opt-in: minutes under TCG)
#   make e2e-slurm-span  sbatch -N 2 and -N 3 with span=nodes: one guest over all nodes (opt-in, slow)
#   make bench-slurm   submit-to-first-output latency -> docs/benchmarks.md
#   make demo         the README's main job: sbatch -N 2 --vm-image=debian12 examples/hello.sbatch
SLURM_APT := slurmctld slurmd slurm-client munge libslurm-dev slurmdbd mariadb-server
SPANK_SO := $(BIN)/hpcvm_spank.so
SPANK_SRC := $(wildcard slurm-spank/*.c)
SPANK_HDR := $(wildcard slurm-spank/*.h)
SPANK_CFLAGS ?= -O2 -g -Wall -Wextra -Werror -std=gnu11 -D_GNU_SOURCE
LAB_DIR ?= $(HPCVM_CACHE)/lab

.PHONY: slurm-deps spank spank-test e2e-slurm-vm e2e-slurm-span lab-up lab-status lab-down demo bench-slurm

slurm-deps:
	@missing=""; for p in $(SLURM_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "slurm-deps: installing$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "slurm-deps: need root to apt-get install:$$missing" >&2; exit 1; fi; \
		rcd=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\n# slurm-deps: no service starts during its apt-get (the lab runs its own daemons)\nexit 101\n' >/usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; rcd=1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
		st=$$?; [ -z "$$rcd" ] || rm -f /usr/sbin/policy-rc.d; exit $$st; \
	fi

# The plugin is C and links against nothing but libc: Slurm resolves the
# spank_* and slurm_* symbols from the loading process. It must be rebuilt
# for each Slurm release (plugin_version is the headers' SLURM_VERSION_NUMBER).
spank: $(SPANK_SO)
$(SPANK_SO): $(SPANK_SRC) $(SPANK_HDR) slurm-spank/hpcvm_spank.map mk/slurm.mk
	@test -f /usr/include/slurm/spank.h || { echo "spank: /usr/include/slurm/spank.h missing: run make slurm-deps" >&2; exit 1; }
	@mkdir -p $(BIN)
	$(CC) $(SPANK_CFLAGS) -fPIC -shared \
		-Wl,--version-script=slurm-spank/hpcvm_spank.map \
		-o $@ $(SPANK_SRC)

# The Slurm e2e tests (test/lab, build tag e2e) run in `make e2e`: the plugin
# and the launcher in a namespaced Slurm cluster on this host with a fake VMM
# (~2 min), and the lab brought up in 2 virt nodes. The real-guest job
# (debian12 booted in the virt nodes, minutes under TCG) is opt-in:
# make e2e-slurm-vm.
e2e: slurm-deps spank
e2e: E2E_PKGS += ./test/lab/

spank-test: slurm-deps spank build
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm $(GO) test -tags e2e -count=1 -v -timeout 20m -run 'TestSpank|TestLaunch' ./test/lab/

e2e-slurm-vm: slurm-deps spank build node-assets image-debian12
	HPCVM_E2E_REQUIRE=1 HPCVM_IMAGE_STORE=$(IMAGE_STORE) HPCVM_BIN=$(BIN)/hpcvm \
		$(GO) test -tags 'e2e slurmvm' -count=1 -v -timeout 40m -run 'TestVirtLabDebian12Job' ./test/lab/

e2e-slurm-span: slurm-deps spank build agent node-assets guest-kernel guest-initramfs
	HPCVM_E2E_REQUIRE=1 HPCVM_BIN=$(BIN)/hpcvm \
		$(GO) test -tags 'e2e slurmspan' -count=1 -v -timeout 180m -run 'TestVirtLabSpanJob' ./test/lab/

# demo: the README's main job on a fresh machine (everything it needs is a
# prerequisite; see test/lab/demo): a 2-node lab, sbatch -N 2
# --vm-image=debian12 examples/hello.sbatch, the job's output, scontrol show
# job / sacct / the jobcomp record, teardown. The VM-only demo is demo-vm.
demo: deps build spank node-assets image-debian12
	HPCVM_IMAGE_STORE=$(IMAGE_STORE) $(GO) run ./test/lab/demo --image-store $(IMAGE_STORE)

# Submit-to-first-output latency with and without --vm-image in the same
# lab; rewrites the "## Slurm" section of docs/benchmarks.md.
bench-slurm: slurm-deps spank build node-assets image-debian12
	HPCVM_E2E_REQUIRE=1 HPCVM_IMAGE_STORE=$(IMAGE_STORE) HPCVM_BIN=$(BIN)/hpcvm HPCVM_BENCH_DOC=$(CURDIR)/docs/benchmarks.md \
		$(GO) test -tags bench -count=1 -v -timeout 60m -run 'TestSlurmBench' ./test/lab/

lab-up: slurm-deps spank build node-assets
	$(BIN)/hpcvm lab up --dir $(LAB_DIR) --image-store $(IMAGE_STORE)
lab-status:
	$(BIN)/hpcvm lab status --dir $(LAB_DIR)
lab-down:
	$(BIN)/hpcvm lab down --dir $(LAB_DIR)

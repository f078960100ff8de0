# Slurm integration (see docs/slurm.md).
#   make slurm-deps   Debian's Slurm 22.05 daemons, client, headers and munge (apt, when missing)
#   make spank        the C SPANK plugin: bin/hpcvm_spank.so
#   make spank-test   the plugin's fast e2e test (namespaced slurmd nodes on this host, no VMs)
#   make lab-up / lab-status / lab-down   a Slurm cluster of virt nodes (hpcvm lab)
#   make demo-slurm   the README's main job: sbatch -N 2 --vm-image=debian12 examples/hello.sbatch
SLURM_APT := slurmctld slurmd slurm-client munge libslurm-dev
SPANK_SO := $(BIN)/hpcvm_spank.so
SPANK_SRC := $(wildcard slurm-spank/*.c)
SPANK_HDR := $(wildcard slurm-spank/*.h)
SPANK_CFLAGS ?= -O2 -g -Wall -Wextra -Werror -std=gnu11 -D_GNU_SOURCE
LAB_DIR ?= $(HPCVM_CACHE)/lab

.PHONY: slurm-deps spank spank-test lab-up lab-status lab-down demo-slurm

slurm-deps:
	@missing=""; for p in $(SLURM_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "slurm-deps: installing$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "slurm-deps: need root to apt-get install:$$missing" >&2; exit 1; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
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

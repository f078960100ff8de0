/*
 * The user's --vm-* options. Values are only syntax-checked here (so a typo
 * fails at once in sbatch); what they may be is the site policy's business
 * (`hpcvm policy admit`).
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "hpcvm_spank.h"

enum {
	OPT_IMAGE = 1,
	OPT_MEM,
	OPT_CPUS,
	OPT_CKPT_INTERVAL,
	OPT_CONSOLE,
};

/* A value may not be empty, and may not contain whitespace or control
 * characters: it becomes one argument of hpcvm on the command line. */
static int plain_word(const char *s)
{
	if (s == NULL || *s == '\0')
		return 0;
	for (; *s; s++)
		if (isspace((unsigned char)*s) || iscntrl((unsigned char)*s))
			return 0;
	return 1;
}

static int store(char **dst, const char *name, const char *val)
{
	char *copy;

	if (!plain_word(val)) {
		slurm_error("%s: --%s needs a value without spaces", HPCVM_PLUGIN, name);
		return -1;
	}
	copy = strdup(val);
	if (copy == NULL) {
		slurm_error("%s: --%s: out of memory", HPCVM_PLUGIN, name);
		return -1;
	}
	free(*dst); /* callbacks may run more than once */
	*dst = copy;
	return 0;
}

static int opt_cb(int val, const char *optarg, int remote)
{
	struct hpcvm_options *o = &hpcvm_state()->opts;

	(void)remote;
	switch (val) {
	case OPT_IMAGE:
		return store(&o->image, "vm-image", optarg);
	case OPT_MEM:
		return store(&o->mem, "vm-mem", optarg);
	case OPT_CPUS:
		return store(&o->cpus, "vm-cpus", optarg);
	case OPT_CKPT_INTERVAL:
		return store(&o->checkpoint_interval, "vm-checkpoint-interval", optarg);
	case OPT_CONSOLE:
		if (optarg == NULL || optarg[0] != '/') {
			slurm_error("%s: --vm-console needs an absolute path", HPCVM_PLUGIN);
			return -1;
		}
		return store(&o->console, "vm-console", optarg);
	}
	slurm_error("%s: unknown option value %d", HPCVM_PLUGIN, val);
	return -1;
}

static struct spank_option options[] = {
	{"vm-image", "NAME",
	 "[hpcvm] run the job in a virtual machine booted from image NAME (see `hpcvm image list`)",
	 1, OPT_IMAGE, opt_cb},
	{"vm-mem", "SIZE",
	 "[hpcvm] guest memory per node, e.g. 4GiB (default: the job's memory per node minus the VMM reserve)",
	 1, OPT_MEM, opt_cb},
	{"vm-cpus", "N",
	 "[hpcvm] vCPUs of the whole VM (default: every CPU allocated to the job)",
	 1, OPT_CPUS, opt_cb},
	{"vm-checkpoint-interval", "DURATION",
	 "[hpcvm] checkpoint the VM at least this often, e.g. 30m, or off (the site policy may bound it)",
	 1, OPT_CKPT_INTERVAL, opt_cb},
	{"vm-console", "FILE",
	 "[hpcvm] write the guest's serial console to FILE (absolute path; for debugging)",
	 1, OPT_CONSOLE, opt_cb},
};

int hpcvm_options_register(spank_t sp)
{
	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
		spank_err_t rc = spank_option_register(sp, &options[i]);

		if (rc != ESPANK_SUCCESS) {
			slurm_error("%s: cannot register --%s: %s", HPCVM_PLUGIN, options[i].name, spank_strerror(rc));
			return -1;
		}
	}
	return 0;
}

void hpcvm_options_free(struct hpcvm_options *o)
{
	free(o->image);
	free(o->mem);
	free(o->cpus);
	free(o->checkpoint_interval);
	free(o->console);
	memset(o, 0, sizeof(*o));
}

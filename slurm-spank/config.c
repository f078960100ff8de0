/*
 * plugstack.conf arguments:
 *
 *   required /usr/lib/slurm/hpcvm_spank.so hpcvm=/usr/bin/hpcvm \
 *       policy_dir=/etc/hpcvm/policy.d image_store=/var/lib/hpcvm/images \
 *       runtime_dir=/run/hpcvm [vmm=/usr/bin/hpcvm] [disk=copy|ro] [boot_timeout=10m] \
 *       [span=single|nodes]
 *
 * Every argument is KEY=VALUE, paths absolute; an unknown key is an error,
 * so a misspelt setting never silently falls back to a default.
 */
#include <stdio.h>
#include <string.h>

#include "hpcvm_spank.h"

static int set_path(char *dst, size_t cap, const char *key, const char *val)
{
	if (val[0] != '/') {
		slurm_error("%s: plugstack argument %s=%s: not an absolute path", HPCVM_PLUGIN, key, val);
		return -1;
	}
	if (strlen(val) >= cap) {
		slurm_error("%s: plugstack argument %s: path too long", HPCVM_PLUGIN, key);
		return -1;
	}
	strcpy(dst, val);
	return 0;
}

int hpcvm_config_parse(struct hpcvm_config *cfg, int ac, char **av)
{
	memset(cfg, 0, sizeof(*cfg));
	strcpy(cfg->hpcvm, "/usr/bin/hpcvm");
	strcpy(cfg->policy_dir, "/etc/hpcvm/policy.d");
	strcpy(cfg->image_store, "/var/lib/hpcvm/images");
	strcpy(cfg->runtime_dir, "/run/hpcvm");
	strcpy(cfg->disk_mode, "copy");
	strcpy(cfg->span, "single");

	for (int i = 0; i < ac; i++) {
		const char *eq = strchr(av[i], '=');
		size_t klen = eq ? (size_t)(eq - av[i]) : strlen(av[i]);
		const char *val = eq ? eq + 1 : "";
		struct {
			const char *key;
			char *dst;
		} keys[] = {
			{"hpcvm", cfg->hpcvm},
			{"policy_dir", cfg->policy_dir},
			{"image_store", cfg->image_store},
			{"runtime_dir", cfg->runtime_dir},
			{"vmm", cfg->vmm},
		};
		int found = 0;

		if (klen == 12 && strncmp(av[i], "boot_timeout", 12) == 0) {
			size_t n = eq ? strlen(val) : 0;

			if (n == 0 || n >= sizeof(cfg->boot_timeout) || strspn(val, "0123456789.hms") != n) {
				slurm_error("%s: plugstack argument %s: want boot_timeout=DURATION such as 10m or 1h30m", HPCVM_PLUGIN, av[i]);
				return -1;
			}
			strcpy(cfg->boot_timeout, val);
			continue;
		}
		if (klen == 4 && strncmp(av[i], "disk", 4) == 0) {
			if (!eq || (strcmp(val, "copy") != 0 && strcmp(val, "ro") != 0)) {
				slurm_error("%s: plugstack argument %s: want disk=copy or disk=ro", HPCVM_PLUGIN, av[i]);
				return -1;
			}
			strcpy(cfg->disk_mode, val);
			continue;
		}

		if (klen == 4 && strncmp(av[i], "span", 4) == 0) {
			if (!eq || (strcmp(val, "single") != 0 && strcmp(val, "nodes") != 0)) {
				slurm_error("%s: plugstack argument %s: want span=single or span=nodes", HPCVM_PLUGIN, av[i]);
				return -1;
			}
			strcpy(cfg->span, val);
			continue;
		}

		for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
			if (strlen(keys[k].key) != klen || strncmp(av[i], keys[k].key, klen) != 0)
				continue;
			found = 1;
			if (!eq) {
				slurm_error("%s: plugstack argument %s: want %s=PATH", HPCVM_PLUGIN, av[i], keys[k].key);
				return -1;
			}
			if (set_path(keys[k].dst, sizeof(cfg->hpcvm), keys[k].key, val) != 0)
				return -1;
		}
		if (!found) {
			slurm_error("%s: unknown plugstack argument \"%s\" (known: hpcvm=, policy_dir=, image_store=, runtime_dir=, vmm=, disk=, boot_timeout=, span=)",
				    HPCVM_PLUGIN, av[i]);
			return -1;
		}
	}
	return 0;
}

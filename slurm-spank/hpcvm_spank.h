/*
 * hpcvm SPANK plugin: shared declarations.
 *
 * The plugin is deliberately thin: it registers the --vm-* options, asks
 * `hpcvm policy admit` at submission, and on compute nodes replaces the task
 * with `hpcvm launch ... -- <original argv>`. No Go code ever runs inside a
 * Slurm process (a Go runtime does not survive the fork of the task child).
 */
#ifndef HPCVM_SPANK_H
#define HPCVM_SPANK_H

#include <stddef.h>
#include <slurm/spank.h>

#define HPCVM_PLUGIN "hpcvm"

/* plugstack.conf arguments (config.c). */
struct hpcvm_config {
	char hpcvm[4096];        /* hpcvm binary */
	char policy_dir[4096];   /* site policy directory */
	char image_store[4096];  /* image store */
	char runtime_dir[4096];  /* per-job runtime files on compute nodes */
	char vmm[4096];          /* binary the VMM slices run (`vmm run`); empty: hpcvm */
	char disk_mode[8];       /* "copy" (private copy of the image disk) or "ro" */
	char boot_timeout[32];   /* Go duration, e.g. "10m"; empty: the launcher's default */
	char span[8];            /* "single" (default) or "nodes": one VM spanning a multi-node step */
};

/* Values of the user's --vm-* options (options.c); NULL when not given. */
struct hpcvm_options {
	char *image;
	char *mem;
	char *cpus;
	char *checkpoint_interval;
	char *console;
};

/* The plugin's whole state: one per process that loads the plugin. */
struct hpcvm_state {
	struct hpcvm_config config;
	struct hpcvm_options opts;
};

struct hpcvm_state *hpcvm_state(void);

/* config.c */
int hpcvm_config_parse(struct hpcvm_config *cfg, int ac, char **av);

/* options.c */
int hpcvm_options_register(spank_t sp);
void hpcvm_options_free(struct hpcvm_options *o);

/* admit.c: submission contexts (sbatch, salloc, srun). */
int hpcvm_admit(spank_t sp, const struct hpcvm_state *st);

/* task.c: remote context, in the forked task child. */
int hpcvm_exec_launcher(spank_t sp, const struct hpcvm_state *st);

/* spawn.c: run argv, wait, collect its standard error (at most cap-1 bytes,
 * NUL-terminated). Returns the exit status (0-255), 128+signal if it was
 * killed, or -1 with errno set if it could not be run. */
int hpcvm_spawn(char *const argv[], char *err, size_t cap);

/* argv.c: a growable NULL-terminated argument vector. */
struct hpcvm_argv {
	char **v;
	size_t n, cap;
	int failed; /* an allocation failed: the vector must not be used */
};
void hpcvm_argv_add(struct hpcvm_argv *a, const char *s);
void hpcvm_argv_addf(struct hpcvm_argv *a, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void hpcvm_argv_free(struct hpcvm_argv *a);

#endif

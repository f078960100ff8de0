/*
 * Compute node (S_CTX_REMOTE), in the forked task child, as the job's user:
 * replace the task by `hpcvm launch [options] -- <original argv>`.
 *
 * Slurm 22.05 has no spank_prepend_task_argv (23.11+), so the plugin execs
 * the launcher itself with the task's environment. If the exec fails, the
 * task fails with the reason on its standard error and in slurmd's log.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <slurm/slurm.h> /* SLURM_BATCH_SCRIPT */

#include "hpcvm_spank.h"

/* Set by `hpcvm launch` on the steps it starts itself (the VMMs): those are
 * not VM jobs, whatever options they inherited. */
#define INNER_ENV "HPCVM_LAUNCH_INNER="

static int is_inner(char **env)
{
	for (; env && *env; env++)
		if (strncmp(*env, INNER_ENV, strlen(INNER_ENV)) == 0)
			return 1;
	return 0;
}

int hpcvm_exec_launcher(spank_t sp, const struct hpcvm_state *st)
{
	const struct hpcvm_config *c = &st->config;
	const struct hpcvm_options *o = &st->opts;
	struct hpcvm_argv a = {0};
	int argc = 0;
	char **argv = NULL, **env = NULL;
	uint32_t stepid = 0;
	spank_err_t rc;

	if ((rc = spank_get_item(sp, S_JOB_ENV, &env)) != ESPANK_SUCCESS) {
		slurm_error("%s: cannot get the task's environment: %s", HPCVM_PLUGIN, spank_strerror(rc));
		return -1;
	}
	if (is_inner(env))
		return 0;
	if ((rc = spank_get_item(sp, S_JOB_ARGV, &argc, &argv)) != ESPANK_SUCCESS || argc < 1) {
		slurm_error("%s: cannot get the task's argv: %s", HPCVM_PLUGIN, spank_strerror(rc));
		return -1;
	}

	if ((rc = spank_get_item(sp, S_JOB_STEPID, &stepid)) != ESPANK_SUCCESS) {
		slurm_error("%s: cannot get the step id: %s", HPCVM_PLUGIN, spank_strerror(rc));
		return -1;
	}

	hpcvm_argv_add(&a, c->hpcvm);
	hpcvm_argv_add(&a, "launch");
	if (stepid == SLURM_BATCH_SCRIPT)
		hpcvm_argv_add(&a, "--batch");
	if (c->boot_timeout[0])
		hpcvm_argv_addf(&a, "--boot-timeout=%s", c->boot_timeout);
	if (c->vmm[0])
		hpcvm_argv_addf(&a, "--vmm=%s", c->vmm);
	hpcvm_argv_addf(&a, "--policy-dir=%s", c->policy_dir);
	hpcvm_argv_addf(&a, "--image-store=%s", c->image_store);
	hpcvm_argv_addf(&a, "--runtime-dir=%s", c->runtime_dir);
	hpcvm_argv_addf(&a, "--disk-mode=%s", c->disk_mode);
	hpcvm_argv_addf(&a, "--span=%s", c->span);
	hpcvm_argv_addf(&a, "--image=%s", o->image);
	if (o->mem)
		hpcvm_argv_addf(&a, "--mem=%s", o->mem);
	if (o->cpus)
		hpcvm_argv_addf(&a, "--cpus=%s", o->cpus);
	if (o->checkpoint_interval)
		hpcvm_argv_addf(&a, "--checkpoint-interval=%s", o->checkpoint_interval);
	if (o->console)
		hpcvm_argv_addf(&a, "--console=%s", o->console);
	hpcvm_argv_add(&a, "--");
	for (int i = 0; i < argc; i++)
		hpcvm_argv_add(&a, argv[i]);
	if (a.failed) {
		slurm_error("%s: out of memory building the launcher's command line", HPCVM_PLUGIN);
		hpcvm_argv_free(&a);
		return -1;
	}
	execve(a.v[0], a.v, env);
	{
		int e = errno;

		slurm_error("%s: cannot execute %s: %s", HPCVM_PLUGIN, a.v[0], strerror(e));
		fprintf(stderr, "hpcvm: cannot start the VM launcher %s: %s\n", a.v[0], strerror(e));
	}
	hpcvm_argv_free(&a);
	return -1;
}

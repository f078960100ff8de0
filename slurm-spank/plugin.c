/*
 * hpcvm SPANK plugin: entry points. Each Slurm context has its own file:
 * admit.c (sbatch/salloc/srun at submission), task.c (slurmstepd, in the task
 * child). The exported symbols are limited by hpcvm_spank.map.
 */
#include <stdlib.h>
#include <string.h>

#include "hpcvm_spank.h"

SPANK_PLUGIN(hpcvm, 1);

static struct hpcvm_state state;

struct hpcvm_state *hpcvm_state(void)
{
	return &state;
}

/*
 * slurm_spank_init runs in every context. Plugstack arguments are checked
 * everywhere (a typo must fail loudly, not only on compute nodes); options are
 * registered where users can give them and where their values arrive.
 */
int slurm_spank_init(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();

	if (hpcvm_config_parse(&state.config, ac, av) != 0)
		return -1;
	switch (ctx) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
	case S_CTX_REMOTE:
		return hpcvm_options_register(sp);
	default:
		return 0;
	}
}

/* After option parsing: decide the request at submission. */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (state.opts.image == NULL)
		return 0; /* not an hpcvm job: untouched */
	switch (spank_context()) {
	case S_CTX_LOCAL:
		/* The launcher's own srun of the VMM slices: not a VM job. */
		if (getenv("HPCVM_LAUNCH_INNER") != NULL)
			return 0;
		return hpcvm_admit(sp, &state);
	case S_CTX_ALLOCATOR:
		return hpcvm_admit(sp, &state);
	default:
		return 0;
	}
}

/* In the task child, as the user, just before Slurm would exec the task. */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	if (state.opts.image == NULL || !spank_remote(sp))
		return 0;
	return hpcvm_exec_launcher(sp, &state);
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	hpcvm_options_free(&state.opts);
	return 0;
}

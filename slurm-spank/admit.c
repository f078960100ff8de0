/*
 * Submission (sbatch, salloc: S_CTX_ALLOCATOR; srun: S_CTX_LOCAL): ask the
 * site policy whether this VM request may run, and check that the image
 * exists, before anything is queued. A refusal makes sbatch/srun fail with the
 * policy's message.
 *
 * What sbatch knows at this point is limited: the user, their groups, the
 * --vm-* options, and what the environment says (SBATCH_* / SLURM_* input
 * variables). `hpcvm launch` decides again on the compute node with the full
 * allocation (node count, CPUs, memory, walltime).
 */
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hpcvm_spank.h"

/* Log a helper's standard error to the user, line by line. */
static void log_lines(const char *text)
{
	const char *p = text;

	while (*p) {
		const char *nl = strchr(p, '\n');
		int n = nl ? (int)(nl - p) : (int)strlen(p);

		if (n > 0)
			slurm_spank_log("%.*s", n, p);
		p += n + (nl ? 1 : 0);
	}
}

/* The first variable of names that is set and non-empty, or NULL. */
static const char *first_env(const char *const names[])
{
	for (; *names; names++) {
		const char *v = getenv(*names);

		if (v && *v)
			return v;
	}
	return NULL;
}

static void add_request(struct hpcvm_argv *a, const struct hpcvm_state *st)
{
	const struct hpcvm_options *o = &st->opts;
	struct passwd *pw = getpwuid(getuid());
	gid_t groups[256];
	int ng;
	static const char *const partition[] = {"SBATCH_PARTITION", "SLURM_PARTITION", NULL};
	static const char *const account[] = {"SBATCH_ACCOUNT", "SLURM_ACCOUNT", NULL};
	static const char *const qos[] = {"SBATCH_QOS", "SLURM_QOS", NULL};
	const char *v;

	if (pw)
		hpcvm_argv_addf(a, "--user=%s", pw->pw_name);
	else
		hpcvm_argv_addf(a, "--user=%u", (unsigned)getuid());
	ng = getgroups(sizeof(groups) / sizeof(groups[0]), groups);
	for (int i = -1; i < ng; i++) {
		struct group *gr = getgrgid(i < 0 ? getgid() : groups[i]);

		if (gr)
			hpcvm_argv_addf(a, "--group=%s", gr->gr_name);
	}
	hpcvm_argv_addf(a, "--image=%s", o->image);
	if (o->mem)
		hpcvm_argv_addf(a, "--mem=%s", o->mem);
	if (o->cpus)
		hpcvm_argv_addf(a, "--cpus=%s", o->cpus);
	if (o->checkpoint_interval)
		hpcvm_argv_addf(a, "--checkpoint-interval=%s", o->checkpoint_interval);
	if ((v = first_env(partition)))
		hpcvm_argv_addf(a, "--partition=%s", v);
	if ((v = first_env(account)))
		hpcvm_argv_addf(a, "--account=%s", v);
	if ((v = first_env(qos)))
		hpcvm_argv_addf(a, "--qos=%s", v);
	/* No --walltime: the time limit is not known here in 22.05 (and
	 * SBATCH_TIMELIMIT uses Slurm's syntax); `hpcvm launch` checks it. */
}

static int run_checked(struct hpcvm_argv *a, const char *what)
{
	char err[8192];
	int rc;

	if (a->failed) {
		slurm_error("%s: out of memory building the %s command", HPCVM_PLUGIN, what);
		return -1;
	}
	rc = hpcvm_spawn(a->v, err, sizeof(err));
	if (rc < 0) {
		slurm_error("%s: cannot run %s: %m", HPCVM_PLUGIN, a->v[0]);
		return -1;
	}
	log_lines(err); /* refusal messages, and warnings of an admitted request */
	return rc;
}

int hpcvm_admit(spank_t sp, const struct hpcvm_state *st)
{
	const struct hpcvm_config *c = &st->config;
	struct hpcvm_argv a = {0};
	int rc;

	(void)sp;
	hpcvm_argv_add(&a, c->hpcvm);
	hpcvm_argv_add(&a, "policy");
	hpcvm_argv_add(&a, "admit");
	hpcvm_argv_addf(&a, "--policy-dir=%s", c->policy_dir);
	add_request(&a, st);
	rc = run_checked(&a, "policy admit");
	hpcvm_argv_free(&a);
	if (rc == 1) {
		slurm_error("%s: --vm-image=%s refused by the site policy", HPCVM_PLUGIN, st->opts.image);
		return -1;
	}
	if (rc != 0) {
		slurm_error("%s: `hpcvm policy admit` failed (exit status %d); the job is not submitted", HPCVM_PLUGIN, rc);
		return -1;
	}

	hpcvm_argv_add(&a, c->hpcvm);
	hpcvm_argv_add(&a, "image");
	hpcvm_argv_add(&a, "inspect");
	hpcvm_argv_addf(&a, "--store=%s", c->image_store);
	hpcvm_argv_add(&a, st->opts.image);
	{
		char err[8192];

		rc = a.failed ? -1 : hpcvm_spawn(a.v, err, sizeof(err));
		if (rc != 0) {
			if (rc > 0)
				log_lines(err);
			slurm_error("%s: --vm-image=%s: no such image in %s (see `hpcvm image list --store %s`)", HPCVM_PLUGIN,
				    st->opts.image, c->image_store, c->image_store);
			slurm_spank_log("hpcvm: --vm-image=%s: no such image in %s", st->opts.image, c->image_store);
		}
	}
	hpcvm_argv_free(&a);
	return rc == 0 ? 0 : -1;
}

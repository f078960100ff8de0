/* A small growable argument vector for building hpcvm command lines. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hpcvm_spank.h"

void hpcvm_argv_add(struct hpcvm_argv *a, const char *s)
{
	char *copy;

	if (a->failed)
		return;
	if (a->n + 2 > a->cap) {
		size_t cap = a->cap ? 2 * a->cap : 32;
		char **v = realloc(a->v, cap * sizeof(*v));

		if (v == NULL) {
			a->failed = 1;
			return;
		}
		a->v = v;
		a->cap = cap;
	}
	copy = strdup(s);
	if (copy == NULL) {
		a->failed = 1;
		return;
	}
	a->v[a->n++] = copy;
	a->v[a->n] = NULL;
}

void hpcvm_argv_addf(struct hpcvm_argv *a, const char *fmt, ...)
{
	va_list ap;
	char *s;
	int rc;

	va_start(ap, fmt);
	rc = vasprintf(&s, fmt, ap);
	va_end(ap);
	if (rc < 0) {
		a->failed = 1;
		return;
	}
	hpcvm_argv_add(a, s);
	free(s);
}

void hpcvm_argv_free(struct hpcvm_argv *a)
{
	for (size_t i = 0; i < a->n; i++)
		free(a->v[i]);
	free(a->v);
	memset(a, 0, sizeof(*a));
}

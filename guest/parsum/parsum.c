// parsum: the multi-threaded workload of hpcvm's spread-VM tests and
// benchmarks (docs/dsm.md). An unmodified pthreads program: it starts one
// thread per online CPU (or -t N), sets no affinity, and lets the guest's
// scheduler place the threads, unless -b: then thread k binds itself to
// the k-th CPU it may use (round robin), as OpenMP's OMP_PROC_BIND=spread
// would. Thread k sums i*i (mod 2^64) over its
// share of [0, n); the total must equal the closed form n(n-1)(2n-1)/6.
// Every 2^16 iterations a thread notes the CPU it runs on, so the output
// shows which vCPUs (and so which slices) the threads ran on.
//
//   parsum [-b] [-t threads] [-n iterations]
//   PARSUM threads=2 bind=0 n=400000000 sum=... expected=... ok=1 cpus=0,1 seconds=3.21 t0=0 t1=0,1
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS 1024

struct worker {
	pthread_t tid;
	int bind; // CPU to bind to, or -1
	uint64_t from, to, sum;
	unsigned char ran[MAX_CPUS]; // CPUs this thread was seen on
};

static void *work(void *arg) {
	struct worker *w = arg;
	if (w->bind >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(w->bind, &set);
		int err = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
		if (err) {
			fprintf(stderr, "parsum: binding a thread to CPU %d: %s\n", w->bind, strerror(err));
			exit(1);
		}
	}
	// The CPUs seen are noted on this thread's own stack and copied out at
	// the end: threads writing into one shared page while they run would
	// make it bounce between the vCPUs (between nodes, in a spread VM).
	unsigned char ran[MAX_CPUS] = {0};
	uint64_t acc = 0;
	for (uint64_t i = w->from; i < w->to; i++) {
		acc += i * i;
		// Keep the compiler from replacing the loop by its closed form.
		__asm__ volatile("" : "+r"(acc));
		if ((i & 0xffff) == 0) {
			int cpu = sched_getcpu();
			if (cpu >= 0 && cpu < MAX_CPUS)
				ran[cpu] = 1;
		}
	}
	int cpu = sched_getcpu();
	if (cpu >= 0 && cpu < MAX_CPUS)
		ran[cpu] = 1;
	memcpy(w->ran, ran, sizeof ran);
	w->sum = acc;
	return NULL;
}

// cpus prints the CPUs marked in ran as a comma-separated list.
static void cpus(const unsigned char *ran) {
	int first = 1;
	for (int c = 0; c < MAX_CPUS; c++) {
		if (ran[c]) {
			printf("%s%d", first ? "" : ",", c);
			first = 0;
		}
	}
	if (first)
		printf("none");
}

int main(int argc, char **argv) {
	long threads = sysconf(_SC_NPROCESSORS_ONLN);
	uint64_t n = 400000000;
	int opt, bind = 0;
	while ((opt = getopt(argc, argv, "bt:n:")) != -1) {
		char *end;
		switch (opt) {
		case 'b':
			bind = 1;
			break;
		case 't':
			threads = strtol(optarg, &end, 10);
			if (*end || threads < 1 || threads > 4096) {
				fprintf(stderr, "parsum: -t %s: want 1..4096 threads\n", optarg);
				return 2;
			}
			break;
		case 'n':
			n = strtoull(optarg, &end, 10);
			if (*end || n < 1 || n > (1ULL << 40)) {
				fprintf(stderr, "parsum: -n %s: want 1..2^40 iterations\n", optarg);
				return 2;
			}
			break;
		default:
			fprintf(stderr, "usage: parsum [-b] [-t threads] [-n iterations]\n");
			return 2;
		}
	}
	struct worker *w = calloc(threads, sizeof *w);
	if (!w) {
		perror("parsum: calloc");
		return 1;
	}
	// The CPUs this process may use, in order, for -b.
	cpu_set_t allowed;
	int usable[MAX_CPUS], nusable = 0;
	if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) {
		perror("parsum: sched_getaffinity");
		return 1;
	}
	for (int c = 0; c < MAX_CPUS && c < CPU_SETSIZE; c++)
		if (CPU_ISSET(c, &allowed))
			usable[nusable++] = c;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long k = 0; k < threads; k++) {
		w[k].from = n / threads * k;
		w[k].to = k == threads - 1 ? n : n / threads * (k + 1);
		w[k].bind = bind && nusable > 0 ? usable[k % nusable] : -1;
		int err = pthread_create(&w[k].tid, NULL, work, &w[k]);
		if (err) {
			fprintf(stderr, "parsum: pthread_create: %s\n", strerror(err));
			return 1;
		}
	}
	uint64_t sum = 0;
	unsigned char all[MAX_CPUS] = {0};
	for (long k = 0; k < threads; k++) {
		pthread_join(w[k].tid, NULL);
		sum += w[k].sum;
		for (int c = 0; c < MAX_CPUS; c++)
			all[c] |= w[k].ran[c];
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	unsigned __int128 m = n;
	uint64_t expected = (uint64_t)(m * (m - 1) * (2 * m - 1) / 6);
	printf("PARSUM threads=%ld bind=%d n=%llu sum=%llu expected=%llu ok=%d cpus=", threads, bind,
	       (unsigned long long)n, (unsigned long long)sum, (unsigned long long)expected, sum == expected);
	cpus(all);
	printf(" seconds=%.3f", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
	for (long k = 0; k < threads; k++) {
		printf(" t%ld=", k);
		cpus(w[k].ran);
	}
	printf("\n");
	return sum == expected ? 0 : 1;
}

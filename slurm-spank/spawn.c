/* Run a helper (hpcvm policy admit, hpcvm image inspect) from sbatch/srun. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hpcvm_spank.h"

int hpcvm_spawn(char *const argv[], char *err, size_t cap)
{
	int pfd[2];
	size_t len = 0;
	int status;
	pid_t pid;

	if (cap == 0)
		return -1;
	err[0] = '\0';
	if (pipe2(pfd, O_CLOEXEC) != 0)
		return -1;
	pid = fork();
	if (pid < 0) {
		int e = errno;

		close(pfd[0]);
		close(pfd[1]);
		errno = e;
		return -1;
	}
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);

		if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(pfd[1], 2) < 0)
			_exit(127);
		/* The caller (srun) may block or ignore signals; the helper must not inherit that. */
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		execv(argv[0], argv);
		{
			const char *m = "cannot execute ";
			ssize_t w = write(2, m, strlen(m));

			w = write(2, argv[0], strlen(argv[0]));
			m = ": ";
			w = write(2, m, strlen(m));
			m = strerror(errno);
			w = write(2, m, strlen(m));
			(void)w;
		}
		_exit(127);
	}
	close(pfd[1]);
	for (;;) {
		char buf[512];
		ssize_t r = read(pfd[0], buf, sizeof(buf));

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		for (ssize_t i = 0; i < r && len + 1 < cap; i++)
			err[len++] = buf[i];
		err[len] = '\0';
	}
	close(pfd[0]);
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return -1;
}

/* interleave: runs several commands round-robin (rotating which goes first each round) and times each
 * whole process with CLOCK_MONOTONIC from fork to waitpid — start-up, guest and tear-down included.
 * Interleaving makes the commands share the same load conditions on a busy host.
 *
 *   interleave [-r ROUNDS] [-w WARMUP] [-x EXIT] [-o RAW] [-t SECONDS] -- LABEL 'CMD ARGS' [LABEL 'CMD ARGS' ...]
 *
 * CMD is split on blanks (no shell, no quoting) and run with stdin, stdout and stderr on /dev/null.
 * A run whose exit status differs from EXIT (default 1, the isa-debug-exit code of a write of 0)
 * is counted as failed and left out. -t: a run still going after SECONDS is killed (SIGKILL, status
 * 137) and counted as failed, so that one hung VMM does not stop the whole benchmark. Prints one TSV line per label:
 *   label  runs  failed  median_ms  q1_ms  q3_ms  min_ms  max_ms  cpu_median_ms
 *   ... cpu_median_ms  (user + system CPU time of the process and its waited-for children, wait4)
 * and, with -o, every sample as "round label wall_ns status cpu_ns" lines.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXCMD 16
#define MAXARG 64

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double quantile(uint64_t *v, int n, double q)
{
    double pos = q * (n - 1);
    int i = (int)pos;
    double f = pos - i;
    return i + 1 < n ? v[i] * (1 - f) + v[i + 1] * f : v[i];
}

static volatile pid_t child;
static unsigned timeout_s;

static void on_alarm(int sig)
{
    (void)sig;
    if (child > 0)
        kill(child, SIGKILL);
}

static int run(char **argv, uint64_t *ns, uint64_t *cpu)
{
    uint64_t t0 = now_ns();
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); exit(2); }
    if (pid == 0) {
        int fd = open("/dev/null", O_RDWR);
        dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    int status;
    struct rusage ru;
    child = pid;
    if (timeout_s)
        alarm(timeout_s);
    while (wait4(pid, &status, 0, &ru) < 0) {
        if (errno != EINTR) { perror("wait4"); exit(2); }
    }
    *ns = now_ns() - t0;
    alarm(0);
    child = 0;
    *cpu = (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000u
         + (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000u;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(int argc, char **argv)
{
    int rounds = 10, warmup = 1, expect = 1, opt;
    const char *raw = NULL;
    struct sigaction sa = { .sa_handler = on_alarm };   /* no SA_RESTART: wait4 returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    while ((opt = getopt(argc, argv, "r:w:x:o:t:")) != -1) {
        switch (opt) {
        case 'r': rounds = atoi(optarg); break;
        case 'w': warmup = atoi(optarg); break;
        case 'x': expect = atoi(optarg); break;
        case 'o': raw = optarg; break;
        case 't': timeout_s = (unsigned)atoi(optarg); break;
        default: return 2;
        }
    }
    int n = 0;
    char *label[MAXCMD], *args[MAXCMD][MAXARG];
    for (int i = optind; i + 1 < argc && n < MAXCMD; i += 2, n++) {
        label[n] = argv[i];
        int k = 0;
        for (char *tok = strtok(strdup(argv[i + 1]), " \t"); tok && k < MAXARG - 1; tok = strtok(NULL, " \t"))
            args[n][k++] = tok;
        args[n][k] = NULL;
    }
    if (n == 0) { fprintf(stderr, "usage: interleave [-r R] [-w W] [-x EXIT] [-o RAW] [-t SECONDS] -- LABEL CMD ...\n"); return 2; }
    FILE *rf = raw ? fopen(raw, "w") : NULL;
    uint64_t *samples[MAXCMD], *cpus[MAXCMD];
    int count[MAXCMD] = { 0 }, failed[MAXCMD] = { 0 };
    for (int c = 0; c < n; c++)
        samples[c] = calloc(rounds, sizeof(uint64_t)), cpus[c] = calloc(rounds, sizeof(uint64_t));
    for (int r = -warmup; r < rounds; r++) {
        for (int j = 0; j < n; j++) {
            int c = (j + (r < 0 ? 0 : r)) % n;
            uint64_t ns, cpu;
            int st = run(args[c], &ns, &cpu);
            if (r < 0)
                continue;
            if (rf)
                fprintf(rf, "%d %s %llu %d %llu\n", r, label[c], (unsigned long long)ns, st, (unsigned long long)cpu), fflush(rf);
            if (st != expect) {
                failed[c]++;
                fprintf(stderr, "interleave: %s exited with %d (expected %d)\n", label[c], st, expect);
            } else {
                cpus[c][count[c]] = cpu;
                samples[c][count[c]++] = ns;
            }
        }
    }
    for (int c = 0; c < n; c++) {
        int k = count[c];
        if (k == 0) { printf("%s\t0\t%d\tnan\tnan\tnan\tnan\tnan\tnan\n", label[c], failed[c]); continue; }
        qsort(samples[c], k, sizeof(uint64_t), cmp);
        qsort(cpus[c], k, sizeof(uint64_t), cmp);
        printf("%s\t%d\t%d\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\n", label[c], k, failed[c], quantile(samples[c], k, 0.5) / 1e6,
               quantile(samples[c], k, 0.25) / 1e6, quantile(samples[c], k, 0.75) / 1e6, samples[c][0] / 1e6,
               samples[c][k - 1] / 1e6, quantile(cpus[c], k, 0.5) / 1e6);
    }
    if (rf) fclose(rf);
    return 0;
}

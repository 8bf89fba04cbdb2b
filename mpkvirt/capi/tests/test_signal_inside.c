/* mpk_* calls from a signal handler that interrupted an mpk_* call.
 *
 * A thread waits in mpk_begin for a key (every key is pinned by a helper thread's begun
 * domains) and gets SIGUSR1 there (pthread_kill, once /proc shows it sleeping in the
 * library: no timing). The handler is an ordinary one (no SA_ONSTACK), as most programs
 * write them. Its mpk_begin, mpk_end, mpk_malloc, mpk_mmap and mpk_free fail with EDEADLK
 * and change nothing; nothing is printed. After the handler returns, the interrupted
 * mpk_begin goes on waiting and succeeds once the helper exits (its views end with it).
 * The C library's heap and the domains' allocator are intact afterwards.
 *
 * test_signal_inside_onstack.c runs the same with the handler on an alternate signal stack
 * (sigaltstack, SA_ONSTACK).
 *
 * With the hardware backend an ordinary handler cannot run while its thread is inside an
 * mpk_* call (the thread is on the library's stack, which the handler's initial PKRU cannot
 * write; the header documents the SA_ONSTACK requirement): there the scenario runs in a
 * child process, which must die of that SIGSEGV — and nothing worse. */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include "waiting.h"
#include "mpkvirt.h"

#ifndef TEST_SIGNAL_ONSTACK
#define TEST_SIGNAL_ONSTACK 0
#define NAME "test_signal_inside"
#else
#define NAME "test_signal_inside_onstack"
#endif

#define OWN 1       /* a domain the handler uses */
#define EXTRA 1000  /* the domain the interrupted thread waits for */
#define PINNED 2000 /* the helper's domains: PINNED + 0 .. keys - 1 */

static int keys;
static uint64_t *own_block, *extra_mem;

static atomic_int entering, handled, returned;
static int begin_rc, begin_errno;
static int h_begin, h_begin_err, h_end, h_end_err, h_free, h_free_err, h_malloc_err, h_mmap_err;
static void *h_malloc, *h_mmap;
static int ready_pipe[2], release_pipe[2];

static void on_usr1(int sig) {
    (void)sig;
    int saved = errno;
    errno = 0;
    h_begin = mpk_begin(OWN, PROT_READ | PROT_WRITE);
    h_begin_err = errno;
    errno = 0;
    h_end = mpk_end(OWN);
    h_end_err = errno;
    errno = 0;
    h_malloc = mpk_malloc(OWN, 32);
    h_malloc_err = errno;
    errno = 0;
    h_mmap = mpk_mmap(OWN, NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    h_mmap_err = errno;
    errno = 0;
    h_free = mpk_free(own_block);
    h_free_err = errno;
    atomic_store(&handled, 1);
    errno = saved;
}

static void *pinner(void *arg) {
    (void)arg;
    for (int k = 0; k < keys; k++) CHECK(mpk_begin(PINNED + k, PROT_READ) == 0);
    char c;
    CHECK(write(ready_pipe[1], "r", 1) == 1);
    CHECK(read(release_pipe[0], &c, 1) == 1);
    return NULL; /* thread exit ends the views: the keys are free again */
}

static void *waiter(void *arg) {
    (void)arg;
#if TEST_SIGNAL_ONSTACK
    stack_t ss = {.ss_sp = malloc(1 << 16), .ss_size = 1 << 16, .ss_flags = 0};
    CHECK(ss.ss_sp != NULL && sigaltstack(&ss, NULL) == 0);
#endif
    atomic_store(&entering, current_tid());
    begin_rc = mpk_begin(EXTRA, PROT_READ | PROT_WRITE);
    begin_errno = errno;
    atomic_store(&returned, 1);
    if (begin_rc == 0) {
        extra_mem[0] = 99;
        CHECK(mpk_end(EXTRA) == 0);
    }
    return NULL;
}

/* The heap (the C library's and the domains') is intact: allocate, fill, check, free. */
static void heap_intact(void) {
    enum { N = 500 };
    static uint64_t *c[N], *d[N];
    CHECK(mpk_begin(OWN, PROT_READ | PROT_WRITE) == 0);
    for (int i = 0; i < N; i++) {
        size_t words = 1 + (size_t)(i * 7) % 97;
        CHECK((c[i] = malloc(words * 8)) != NULL);
        CHECK((d[i] = mpk_malloc(OWN, words * 8)) != NULL);
        for (size_t j = 0; j < words; j++) c[i][j] = d[i][j] = (uint64_t)i * 1000 + j;
    }
    for (int i = 0; i < N; i++) {
        size_t words = 1 + (size_t)(i * 7) % 97;
        for (size_t j = 0; j < words; j++) {
            CHECK(c[i][j] == (uint64_t)i * 1000 + j);
            CHECK(d[i][j] == (uint64_t)i * 1000 + j);
        }
        free(c[i]);
        CHECK(mpk_free(d[i]) == 0);
    }
    CHECK(mpk_end(OWN) == 0);
}

static int scenario(void) {
    CHECK(mpk_init(-1) == 0);
    keys = mpkvirt_key_count();
    CHECK(keys >= 1 && keys <= 15);
    CHECK(mpk_malloc(OWN, sizeof(uint64_t)) != NULL);
    CHECK((own_block = mpk_malloc(OWN, 64)) != NULL);
    CHECK((extra_mem = mpk_malloc(EXTRA, sizeof(uint64_t))) != NULL);
    for (int k = 0; k < keys; k++) CHECK(mpk_malloc(PINNED + k, 8) != NULL);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = TEST_SIGNAL_ONSTACK ? SA_ONSTACK : 0;
    CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);

    /* The helper pins every key, then waits on a pipe (outside the library). */
    CHECK(pipe(ready_pipe) == 0 && pipe(release_pipe) == 0);
    pthread_t helper, w;
    CHECK(pthread_create(&helper, NULL, pinner, NULL) == 0);
    char c;
    CHECK(read(ready_pipe[0], &c, 1) == 1);

    capture_stderr_begin();
    CHECK(pthread_create(&w, NULL, waiter, NULL) == 0);
    wait_until_waiting_in_library(&entering);
    CHECK(pthread_kill(w, SIGUSR1) == 0);
    while (!atomic_load(&handled)) sleep_ms(1);
    int interrupted_call_still_waiting = !atomic_load(&returned);
    CHECK(write(release_pipe[1], "g", 1) == 1); /* the helper exits */
    CHECK(pthread_join(helper, NULL) == 0);
    CHECK(pthread_join(w, NULL) == 0);
    char *text = capture_stderr_end();
    CHECK_NO_STDERR(text);
    free(text);

    /* Precondition (the pin wait is long): the handler ran while the call waited. */
    CHECK(interrupted_call_still_waiting);
    errno = h_begin_err;
    CHECK(h_begin == -1 && h_begin_err == EDEADLK);
    errno = h_end_err;
    CHECK(h_end == -1 && h_end_err == EDEADLK);
    errno = h_malloc_err;
    CHECK(h_malloc == NULL && h_malloc_err == EDEADLK);
    errno = h_mmap_err;
    CHECK(h_mmap == MAP_FAILED && h_mmap_err == EDEADLK);
    errno = h_free_err;
    CHECK(h_free == -1 && h_free_err == EDEADLK);
    /* The interrupted mpk_begin completed normally once the helper's keys were free. */
    errno = begin_errno;
    CHECK(begin_rc == 0);
    CHECK(mpk_begin(EXTRA, PROT_READ) == 0 && extra_mem[0] == 99 && mpk_end(EXTRA) == 0);
    /* The handler's failed mpk_free changed nothing. */
    CHECK(mpk_free(own_block) == 0);
    CHECK_ERR(mpk_free(own_block), EINVAL);
    heap_intact();
    printf(NAME ": mpk_* from a handler that interrupted mpk_begin: EDEADLK (%s backend): ok\n",
           mpkvirt_backend());
    return 0;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "10000", 1) == 0);
    const char *mode = getenv("MPKVIRT_MODE");
    if (TEST_SIGNAL_ONSTACK || !mode || strcmp(mode, "hardware") != 0) return scenario();
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) _exit(scenario());
    int status;
    CHECK(waitpid(child, &status, 0) == child);
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGSEGV) {
        fprintf(stderr, NAME ": expected the child to die of SIGSEGV, status %#x\n", status);
        return 1;
    }
    printf(NAME ": an ordinary handler inside an mpk_* call on PKU hardware: SIGSEGV, as "
           "documented (SA_ONSTACK needed): ok\n");
    return 0;
}

/* A handler re-entered by a second signal cannot end what its outer run has begun (hardware
 * backend).
 *
 * The common idiom mpk_begin(X) ... mpk_end(X) in a handler, with the handler installed
 * SA_NODEFER and the signal arriving again while the outer run is between the two calls:
 * the inner run's mpk_begin(X) succeeds (X is begun already) but its mpk_end(X) must fail
 * with EDEADLK — the outer run resumes with X's rights, so X's key must stay pinned for it.
 * While the outer run still holds X, the main thread cannot take every key for other
 * domains; the outer run still writes X, ends it normally (0), and afterwards no key stays
 * pinned (the main thread begins as many other domains as there are keys).
 *
 * With the emulated backend the library cannot tell a handler from other code: nothing to
 * check there. */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define X 2
#define OTHER 100 /* OTHER + 0 .. keys - 1 */

static uint64_t *x_mem;
static int depth;
static atomic_int stage;
static int inner_begin = 1, inner_begin_err, inner_end = 1, inner_end_err;
static int outer_write = 1, outer_write_err, outer_end = 1, outer_end_err;

static void write_x(void *p) { *(volatile uint64_t *)p = 2; }

static void on_usr1(int sig) {
    (void)sig;
    int saved = errno;
    if (depth++ == 0) {
        CHECK(mpk_begin(X, PROT_READ | PROT_WRITE) == 0);
        x_mem[0] = 1;
        raise(SIGUSR1); /* SA_NODEFER: the same handler again, on top of this run */
        atomic_store(&stage, 1);
        while (atomic_load(&stage) != 2) sleep_ms(1);
        struct mpkvirt_fault f = {0, 0, 0, 0, 0};
        errno = 0;
        outer_write = mpkvirt_guarded_call(write_x, x_mem, &f);
        outer_write_err = errno;
        errno = 0;
        outer_end = mpk_end(X);
        outer_end_err = errno;
    } else {
        errno = 0;
        inner_begin = mpk_begin(X, PROT_READ | PROT_WRITE);
        inner_begin_err = errno;
        errno = 0;
        inner_end = mpk_end(X);
        inner_end_err = errno;
    }
    depth--;
    errno = saved;
}

static void *worker(void *arg) {
    (void)arg;
    /* A first call of the thread outside the handler (a thread's first call is taken for its
     * normal context: its rights until then were inherited). */
    CHECK(mpk_begin(OTHER, PROT_READ) == 0 && mpk_end(OTHER) == 0);
    raise(SIGUSR1);
    return NULL;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "200", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    if (strcmp(mpkvirt_backend(), "hardware") != 0) {
        printf("test_signal_nested: %s backend cannot tell handlers apart: nothing to check\n",
               mpkvirt_backend());
        return 0;
    }
    int keys = mpkvirt_key_count();
    CHECK((x_mem = mpk_malloc(X, sizeof(uint64_t))) != NULL);
    for (int k = 0; k < keys; k++) CHECK(mpk_malloc(OTHER + k, 8) != NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_NODEFER;
    CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);

    pthread_t w;
    CHECK(pthread_create(&w, NULL, worker, NULL) == 0);
    while (atomic_load(&stage) != 1) sleep_ms(1);
    /* The outer run holds X: one key is not ours to take. */
    int began = 0;
    while (began < keys && mpk_begin(OTHER + began, PROT_READ) == 0) began++;
    for (int k = 0; k < began; k++) CHECK(mpk_end(OTHER + k) == 0);
    atomic_store(&stage, 2);
    CHECK(pthread_join(w, NULL) == 0);

    errno = inner_begin_err;
    CHECK(inner_begin == 0);
    if (inner_end != -1 || inner_end_err != EDEADLK)
        fprintf(stderr, "test_signal_nested: the inner run's mpk_end(X) returned %d, errno %d (%s)\n",
                inner_end, inner_end_err, strerror(inner_end_err));
    CHECK(inner_end == -1 && inner_end_err == EDEADLK);
    if (began == keys)
        fprintf(stderr, "test_signal_nested: the main thread took every key while the outer run held X\n");
    CHECK(began == keys - 1);
    errno = outer_write_err;
    CHECK(outer_write == 0);
    errno = outer_end_err;
    CHECK(outer_end == 0);
    for (int k = 0; k < keys; k++) CHECK(mpk_begin(OTHER + k, PROT_READ) == 0);
    for (int k = 0; k < keys; k++) CHECK(mpk_end(OTHER + k) == 0);
    CHECK(mpk_begin(X, PROT_READ) == 0 && x_mem[0] == 2 && mpk_end(X) == 0);
    printf("test_signal_nested: a re-entered handler's mpk_end of the outer run's domain: EDEADLK: ok\n");
    return 0;
}

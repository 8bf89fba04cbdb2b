/* mpk_* calls from a signal handler that interrupted code outside any mpk_* call.
 *
 * Such a handler may use the library: in the main thread (raise(), between calls) and in a
 * thread spinning inside a begun domain (pthread_kill), it begins and ends a domain of its
 * own, allocates and frees. The interrupted thread keeps its begun domain and ends it
 * normally afterwards. Nothing is printed on stderr. (A handler ending a domain the
 * interrupted code has begun: test_signal_end_interrupted.c.) */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define OWN 1   /* a domain the handlers use */
#define SPIN 2  /* the spinning thread's domain */

static uint64_t *own_mem, *spin_mem;
static atomic_int ok_count, failed_step, spin_ready, spin_handled;

static void on_usr2(int sig) {
    (void)sig;
    int saved = errno;
    int step = 1;
    uint64_t *p = NULL;
    if (mpk_begin(OWN, PROT_READ | PROT_WRITE) != 0) goto out;
    step++;
    own_mem[0] += 1;
    if (mpk_end(OWN) != 0) goto out;
    step++;
    if ((p = mpk_malloc(OWN, 64)) == NULL) goto out;
    step++;
    if (mpk_free(p) != 0) goto out;
    step = 0;
    atomic_fetch_add(&ok_count, 1);
out:
    if (step) atomic_store(&failed_step, step);
    atomic_store(&spin_handled, 1);
    errno = saved;
}

static void *spinner(void *arg) {
    (void)arg;
    CHECK(mpk_begin(SPIN, PROT_READ | PROT_WRITE) == 0);
    spin_mem[0] += 1;
    atomic_store(&spin_ready, 1);
    while (!atomic_load(&spin_handled)) {
    } /* plain code inside a begun domain, no library call */
    spin_mem[0] += 1; /* the interrupted thread's domain is still begun */
    CHECK(mpk_end(SPIN) == 0);
    return NULL;
}

static void spin_round(void) {
    atomic_store(&spin_handled, 0);
    pthread_t s;
    CHECK(pthread_create(&s, NULL, spinner, NULL) == 0);
    while (!atomic_load(&spin_ready)) sleep_ms(1);
    CHECK(pthread_kill(s, SIGUSR2) == 0);
    CHECK(pthread_join(s, NULL) == 0);
}

int main(void) {
    CHECK(mpk_init(-1) == 0);
    CHECK((own_mem = mpk_malloc(OWN, sizeof(uint64_t))) != NULL);
    CHECK((spin_mem = mpk_malloc(SPIN, sizeof(uint64_t))) != NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    CHECK(sigaction(SIGUSR2, &sa, NULL) == 0);

    capture_stderr_begin();
    CHECK(raise(SIGUSR2) == 0); /* the main thread, between calls */
    int main_ok = atomic_load(&ok_count), main_failed = atomic_load(&failed_step);
    spin_round(); /* a thread inside a begun domain */
    int spin_ok = atomic_load(&ok_count) - main_ok, spin_failed = atomic_load(&failed_step);
    char *text = capture_stderr_end();
    CHECK_NO_STDERR(text);
    free(text);

    if (main_ok != 1) fprintf(stderr, "test_signal_outside: handler in the main thread failed at step %d\n", main_failed);
    CHECK(main_ok == 1);
    if (spin_ok != 1) fprintf(stderr, "test_signal_outside: handler in the spinning thread failed at step %d\n", spin_failed);
    CHECK(spin_ok == 1);
    CHECK(mpk_begin(OWN, PROT_READ) == 0 && own_mem[0] == 2 && mpk_end(OWN) == 0);
    CHECK(mpk_begin(SPIN, PROT_READ) == 0);
    CHECK(spin_mem[0] == 2);
    CHECK(mpk_end(SPIN) == 0);
    printf("test_signal_outside: mpk_* from handlers between calls (%s backend): ok\n", mpkvirt_backend());
    return 0;
}

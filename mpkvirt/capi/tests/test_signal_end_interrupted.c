/* A signal handler cannot end a domain the code it interrupted has begun (hardware backend).
 *
 * That code resumes with the rights the kernel saved in the signal frame, so the library must
 * keep its view (and the view's pins): the handler's mpk_end fails with EDEADLK and changes
 * nothing. The interrupted thread then still reaches its domain, ends it normally (0), has
 * no access afterwards, and no key stays pinned for it (the main thread begins as many other
 * domains as there are keys while it is still alive).
 *
 * With the emulated backend the library cannot tell a handler from other code (no PKRU to
 * compare): there such an mpk_end ends the domain for real and the interrupted code would
 * fault on its next access. The test says so and checks nothing there. */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define SPIN 2
#define OTHER 100 /* OTHER + 0 .. keys - 1 */

static uint64_t *spin_mem;
static atomic_int spin_ready, handled, checked;
static int h_end = 1, h_end_err, end_rc = 1, end_err, guarded_rc = 1, guarded_err, fault_vkey;

static void on_usr2(int sig) {
    (void)sig;
    int saved = errno;
    errno = 0;
    h_end = mpk_end(SPIN);
    h_end_err = errno;
    atomic_store(&handled, 1);
    errno = saved;
}

static void read_word(void *p) { (void)*(volatile uint64_t *)p; }

static void *spinner(void *arg) {
    (void)arg;
    CHECK(mpk_begin(SPIN, PROT_READ | PROT_WRITE) == 0);
    spin_mem[0] = 1;
    atomic_store(&spin_ready, 1);
    while (!atomic_load(&handled)) {
    }
    spin_mem[0] = 2; /* the rights the kernel restored */
    errno = 0;
    end_rc = mpk_end(SPIN);
    end_err = errno;
    struct mpkvirt_fault f = {0, 0, 0, 0, 0};
    errno = 0;
    guarded_rc = mpkvirt_guarded_call(read_word, spin_mem, &f);
    guarded_err = errno;
    fault_vkey = f.vkey;
    atomic_store(&checked, 1);
    while (atomic_load(&checked) != 2) sleep_ms(1); /* alive while the keys are checked */
    return NULL;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "2000", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    if (strcmp(mpkvirt_backend(), "hardware") != 0) {
        printf("test_signal_end_interrupted: %s backend cannot tell handlers apart: nothing to check\n",
               mpkvirt_backend());
        return 0;
    }
    int keys = mpkvirt_key_count();
    CHECK((spin_mem = mpk_malloc(SPIN, sizeof(uint64_t))) != NULL);
    for (int k = 0; k < keys; k++) CHECK(mpk_malloc(OTHER + k, 8) != NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    CHECK(sigaction(SIGUSR2, &sa, NULL) == 0);

    pthread_t s;
    CHECK(pthread_create(&s, NULL, spinner, NULL) == 0);
    while (!atomic_load(&spin_ready)) sleep_ms(1);
    CHECK(pthread_kill(s, SIGUSR2) == 0);
    while (!atomic_load(&checked)) sleep_ms(1);

    if (h_end != -1)
        fprintf(stderr, "test_signal_end_interrupted: the handler's mpk_end(SPIN) returned %d, "
                        "errno %d (%s)\n", h_end, h_end_err, strerror(h_end_err));
    errno = h_end_err;
    CHECK(h_end == -1 && h_end_err == EDEADLK);
    errno = end_err;
    CHECK(end_rc == 0); /* the interrupted code's own mpk_end */
    errno = guarded_err;
    CHECK(guarded_rc == -1 && guarded_err == EFAULT && fault_vkey == SPIN);
    for (int k = 0; k < keys; k++) CHECK(mpk_begin(OTHER + k, PROT_READ) == 0);
    for (int k = 0; k < keys; k++) CHECK(mpk_end(OTHER + k) == 0);
    atomic_store(&checked, 2);
    CHECK(pthread_join(s, NULL) == 0);
    CHECK(mpk_begin(SPIN, PROT_READ) == 0 && spin_mem[0] == 2 && mpk_end(SPIN) == 0);
    printf("test_signal_end_interrupted: a handler's mpk_end of the interrupted domain: EDEADLK: ok\n");
    return 0;
}

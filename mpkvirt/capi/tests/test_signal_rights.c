/* After a signal handler began and ended a domain of its own, the interrupted thread's
 * rights are still exactly its begun domains.
 *
 * A thread has domain SPIN begun and spins (no library call); a handler interrupting it
 * begins and ends domain OWN. After the handler returns, the thread ends SPIN: it must then
 * have no access to SPIN any more (a guarded read faults; nobody else has SPIN begun, so
 * this holds with the emulated backend too), and no key may stay pinned for it: while the
 * thread is still alive, the main thread begins as many other domains as there are keys
 * (a key left pinned makes that fail with EBUSY after the pin wait). */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define OWN 1
#define SPIN 2
#define OTHER 100 /* OTHER + 0 .. keys - 1 */

static uint64_t *own_mem, *spin_mem;
static atomic_int spin_ready, handled, checked;
static int handler_ok, guarded_rc = 1, guarded_errno, fault_vkey;

static void on_usr2(int sig) {
    (void)sig;
    int saved = errno;
    handler_ok = mpk_begin(OWN, PROT_READ | PROT_WRITE) == 0;
    if (handler_ok) own_mem[0] = 7;
    handler_ok = handler_ok && mpk_end(OWN) == 0;
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
    spin_mem[0] = 2;
    CHECK(mpk_end(SPIN) == 0);
    struct mpkvirt_fault f = {0, 0, 0, 0, 0};
    errno = 0;
    guarded_rc = mpkvirt_guarded_call(read_word, spin_mem, &f);
    guarded_errno = errno;
    fault_vkey = f.vkey;
    atomic_store(&checked, 1);
    /* Stay alive while the main thread checks the keys. */
    while (atomic_load(&checked) != 2) sleep_ms(1);
    return NULL;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "2000", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    int keys = mpkvirt_key_count();
    CHECK((own_mem = mpk_malloc(OWN, sizeof(uint64_t))) != NULL);
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
    CHECK(handler_ok);
    if (guarded_rc != -1) {
        fprintf(stderr, "test_signal_rights: after mpk_end(SPIN) returned 0 the thread still reads "
                        "SPIN's memory (its view from before the signal survived)\n");
    }
    errno = guarded_errno;
    CHECK(guarded_rc == -1 && guarded_errno == EFAULT && fault_vkey == SPIN);
    /* No key is still pinned for SPIN while the spinner lives. */
    for (int k = 0; k < keys; k++) {
        if (mpk_begin(OTHER + k, PROT_READ) != 0) {
            fprintf(stderr, "test_signal_rights: mpk_begin of the %d-th of %d domains failed: "
                            "a key stays pinned by the spinning thread\n", k + 1, keys);
            CHECK(0);
        }
    }
    for (int k = 0; k < keys; k++) CHECK(mpk_end(OTHER + k) == 0);
    atomic_store(&checked, 2);
    CHECK(pthread_join(s, NULL) == 0);
    CHECK(mpk_begin(OWN, PROT_READ) == 0 && own_mem[0] == 7 && mpk_end(OWN) == 0);
    CHECK(mpk_begin(SPIN, PROT_READ) == 0 && spin_mem[0] == 2 && mpk_end(SPIN) == 0);
    printf("test_signal_rights: rights after a handler's own begin/end (%s backend): ok\n",
           mpkvirt_backend());
    return 0;
}

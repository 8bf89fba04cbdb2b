/* pthread_cancel of a thread blocked in mpk_begin, waiting for a key.
 *
 * The main thread pins every key (mpkvirt_key_count() domains begun), so a thread that
 * begins one more domain waits in the library for up to the pin wait (made long here). That
 * thread is cancelled while it waits. The C API disables cancellation while a call runs, so
 * the cancellation takes effect at the thread's next cancellation point after mpk_begin
 * returned (its pthread_testcancel): the process survives, pthread_join says
 * PTHREAD_CANCELED, and the library is intact afterwards — the main thread ends its domains
 * and another thread begins as many domains as there are keys (nothing of the cancelled
 * thread still pins a key). */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define EXTRA 1000 /* the domain the cancelled thread waits for */

static atomic_int entering, returned, cancel_sent;

static void *waiter(void *arg) {
    (void)arg;
    atomic_store(&entering, current_tid());
    int rc = mpk_begin(EXTRA, PROT_READ | PROT_WRITE); /* blocks: every key is pinned */
    (void)rc;
    atomic_store(&returned, 1);
    /* The cancellation was requested while mpk_begin ran; it is acted on here. */
    while (!atomic_load(&cancel_sent)) sleep_ms(1);
    pthread_testcancel();
    return (void *)(intptr_t)1; /* not cancelled */
}

static uint64_t *mem[16];
static uint64_t *extra_mem;

static void *second_user(void *arg) {
    int n = (int)(intptr_t)arg;
    /* As many domains as there are keys: only possible if no key is still pinned by the
     * cancelled thread (a leaked pin makes one of these wait and fail with EBUSY). */
    CHECK(mpk_begin(EXTRA, PROT_READ | PROT_WRITE) == 0);
    extra_mem[0] = 77;
    for (int k = 1; k < n; k++) {
        CHECK(mpk_begin(k, PROT_READ | PROT_WRITE) == 0);
        CHECK(mem[k][0] == (uint64_t)k);
    }
    for (int k = 1; k < n; k++) CHECK(mpk_end(k) == 0);
    CHECK(mpk_end(EXTRA) == 0);
    return NULL;
}

int main(void) {
    /* Long enough that the waiter is certainly still waiting when it is cancelled. */
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "5000", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    int n = mpkvirt_key_count();
    CHECK(n >= 1 && n <= 15);
    CHECK((extra_mem = mpk_malloc(EXTRA, sizeof(uint64_t))) != NULL);
    for (int k = 0; k < n; k++) {
        CHECK((mem[k] = mpk_malloc(k, sizeof(uint64_t))) != NULL);
        CHECK(mpk_begin(k, PROT_READ | PROT_WRITE) == 0);
        mem[k][0] = (uint64_t)k;
    }

    pthread_t t;
    CHECK(pthread_create(&t, NULL, waiter, NULL) == 0);
    wait_until_waiting_in_library(&entering);
    /* Precondition (not a timing assertion: the pin wait is far longer than this takes). */
    if (atomic_load(&returned)) {
        fprintf(stderr, "test_cancel: mpk_begin returned before the cancellation was sent\n");
        return 1;
    }
    CHECK(pthread_cancel(t) == 0);
    atomic_store(&cancel_sent, 1);

    /* The main thread ends its domains: the keys are free again. */
    for (int k = 0; k < n; k++) CHECK(mpk_end(k) == 0);
    void *ret = NULL;
    CHECK(pthread_join(t, &ret) == 0);
    CHECK(ret == PTHREAD_CANCELED);

    /* Everything still works: another thread begins n domains, the main thread too. */
    pthread_t u;
    CHECK(pthread_create(&u, NULL, second_user, (void *)(intptr_t)n) == 0);
    CHECK(pthread_join(u, NULL) == 0);
    for (int k = 0; k < n; k++) CHECK(mpk_begin(k, PROT_READ) == 0);
    for (int k = 0; k < n; k++) CHECK(mem[k][0] == (uint64_t)k);
    for (int k = 0; k < n; k++) CHECK(mpk_end(k) == 0);
    CHECK(mpk_begin(EXTRA, PROT_READ) == 0 && extra_mem[0] == 77 && mpk_end(EXTRA) == 0);
    CHECK(mpk_munmap(EXTRA) == 0);

    printf("test_cancel: a thread cancelled while waiting in mpk_begin (%d keys, %s backend): ok\n",
           n, mpkvirt_backend());
    return 0;
}

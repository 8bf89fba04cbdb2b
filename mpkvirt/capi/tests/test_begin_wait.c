/* A thread waiting in mpk_begin for a key gets it when the thread that pins it calls mpk_end.
 *
 * The main thread pins every key (mpkvirt_key_count() domains begun); another thread begins
 * one more domain and waits. While it waits (seen in /proc, no timing), the main thread ends
 * one of its domains: that frees a key, so the waiter's mpk_begin must return 0. The pin wait
 * is far longer than the whole exchange takes, so EBUSY can only mean that the key release
 * could not happen while the waiter waited. */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define EXTRA 1000

static atomic_int entering;
static int begin_rc, begin_errno;
static uint64_t *extra_mem;

static void *waiter(void *arg) {
    (void)arg;
    atomic_store(&entering, current_tid());
    begin_rc = mpk_begin(EXTRA, PROT_READ | PROT_WRITE);
    begin_errno = errno;
    if (begin_rc == 0) {
        extra_mem[0] = 5;
        CHECK(mpk_end(EXTRA) == 0);
    }
    return NULL;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "10000", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    int n = mpkvirt_key_count();
    CHECK(n >= 1 && n <= 15);
    CHECK((extra_mem = mpk_malloc(EXTRA, sizeof(uint64_t))) != NULL);
    for (int k = 0; k < n; k++) {
        CHECK(mpk_malloc(k, sizeof(uint64_t)) != NULL);
        CHECK(mpk_begin(k, PROT_READ | PROT_WRITE) == 0);
    }
    pthread_t t;
    CHECK(pthread_create(&t, NULL, waiter, NULL) == 0);
    wait_until_waiting_in_library(&entering);
    CHECK(mpk_end(0) == 0); /* frees a key for the waiter */
    CHECK(pthread_join(t, NULL) == 0);
    if (begin_rc != 0) {
        errno = begin_errno;
        fprintf(stderr,
                "test_begin_wait: the waiter's mpk_begin failed (errno %d: %s) although the main\n"
                "thread ended a domain while it waited: mpk_end could not release the key\n"
                "until the waiter's pin wait was over\n",
                begin_errno, strerror(begin_errno));
        return 1;
    }
    CHECK(mpk_begin(EXTRA, PROT_READ) == 0 && extra_mem[0] == 5 && mpk_end(EXTRA) == 0);
    for (int k = 1; k < n; k++) CHECK(mpk_end(k) == 0);
    printf("test_begin_wait: mpk_end by the key's holder lets a waiting mpk_begin through: ok\n");
    return 0;
}

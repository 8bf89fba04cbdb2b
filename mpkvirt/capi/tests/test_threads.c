/* Two threads, each with its own domain, switch in and out of it many times concurrently.
 * With hardware keys (per-thread rights) each thread is also checked to be unable to reach
 * the other's domain while the other is inside it. */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include "check.h"
#include "mpkvirt.h"

#define ROUNDS 20000

static uint64_t *data[2];
static pthread_barrier_t barrier;
static int hardware;

static void read_word(void *p) { (void)*(volatile uint64_t *)p; }

static void *worker(void *arg) {
    int me = (int)(intptr_t)arg, other = 1 - me;
    for (uint64_t i = 0; i < ROUNDS; i++) {
        CHECK(mpk_begin(me, PROT_READ | PROT_WRITE) == 0);
        if (i > 0) CHECK(data[me][0] == i - 1);
        data[me][0] = i;
        CHECK(mpk_end(me) == 0);
    }
    /* Cross check, in lockstep: `other` is inside its domain while we probe it. */
    for (int round = 0; round < 100; round++) {
        CHECK(mpk_begin(me, PROT_READ | PROT_WRITE) == 0);
        pthread_barrier_wait(&barrier);
        struct mpkvirt_fault f;
        int rc = mpkvirt_guarded_call(read_word, data[other], &f);
        if (hardware) {
            CHECK(rc == -1 && errno == EFAULT && f.vkey == other);
        } else {
            CHECK(rc == 0); /* emulated: rights are the union of the threads' views */
        }
        pthread_barrier_wait(&barrier);
        CHECK(mpk_end(me) == 0);
    }
    return NULL;
}

int main(void) {
    CHECK(mpk_init(-1) == 0);
    hardware = strcmp(mpkvirt_backend(), "hardware") == 0;
    for (int k = 0; k < 2; k++) CHECK((data[k] = mpk_malloc(k, sizeof(uint64_t))) != NULL);
    pthread_barrier_init(&barrier, NULL, 2);
    pthread_t t[2];
    for (intptr_t k = 0; k < 2; k++) CHECK(pthread_create(&t[k], NULL, worker, (void *)k) == 0);
    for (int k = 0; k < 2; k++) CHECK(pthread_join(t[k], NULL) == 0);
    printf("test_threads: 2 threads x %d switches (%s backend): ok\n", ROUNDS, mpkvirt_backend());
    return 0;
}

/* mpk_confine: a thread confined to its own domain names no other, and its children neither.
 *
 * The main thread creates domains OWN and VICTIM (a secret in VICTIM). Thread T confines
 * itself to OWN and then tries everything that names VICTIM: mpk_begin, mpk_malloc, mpk_mmap,
 * mpk_free of VICTIM's memory, mpk_munmap — each EPERM — and mpk_mprotect of its own domain
 * (process-wide: EPERM). Its own domain works, it creates no new vkey (EPERM), a second
 * mpk_confine only narrows, and a thread T creates with plain pthread_create is confined
 * too. Confining with a vkey begun is EBUSY; an unknown vkey EINVAL. The victim's secret is
 * intact afterwards, and unconfined threads still use it. */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include "check.h"
#include "mpkvirt.h"

#define OWN 1
#define VICTIM 2
#define NEW 3

static uint64_t *victim_mem;

#define CHECK_NULL_ERR(call, err)                                                       \
    do {                                                                                \
        errno = 0;                                                                      \
        CHECK((call) == NULL);                                                          \
        CHECK(errno == (err));                                                          \
    } while (0)

static void check_confined(void) {
    CHECK_ERR(mpk_begin(VICTIM, PROT_READ), EPERM);
    CHECK_NULL_ERR(mpk_malloc(VICTIM, 16), EPERM);
    errno = 0;
    CHECK(mpk_mmap(VICTIM, NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                   0) == MAP_FAILED);
    CHECK(errno == EPERM);
    CHECK_ERR(mpk_free(victim_mem), EPERM);
    CHECK_ERR(mpk_munmap(VICTIM), EPERM);
    CHECK_ERR(mpk_mprotect(OWN, PROT_READ), EPERM);
    /* Its own domain works. */
    uint64_t *p = mpk_malloc(OWN, 64);
    CHECK(p != NULL);
    CHECK(mpk_begin(OWN, PROT_READ | PROT_WRITE) == 0);
    p[0] = 7;
    CHECK(p[0] == 7);
    CHECK(mpk_end(OWN) == 0);
    CHECK(mpk_free(p) == 0);
}

static void *grandchild(void *arg) {
    (void)arg;
    check_confined();
    return NULL;
}

static void *confined_thread(void *arg) {
    (void)arg;
    int own = OWN, unknown = 99;
    CHECK(mpk_begin(OWN, PROT_READ) == 0);
    CHECK_ERR(mpk_confine(&own, 1), EBUSY);
    CHECK(mpk_end(OWN) == 0);
    CHECK_ERR(mpk_confine(&unknown, 1), EINVAL);
    CHECK(mpk_confine(&own, 1) == 0);
    check_confined();
    /* vkeys are the program's namespace: a confined thread creates none (it would own the
     * domain the program later fills under that number). */
    CHECK_NULL_ERR(mpk_malloc(NEW, 32), EPERM);
    /* A second confinement narrows: {OWN} ∩ {OWN, VICTIM} = {OWN}. */
    int both[2] = {OWN, VICTIM};
    CHECK(mpk_confine(both, 2) == 0);
    CHECK_ERR(mpk_begin(VICTIM, PROT_READ), EPERM);
    CHECK(mpk_begin(OWN, PROT_READ) == 0);
    CHECK(mpk_end(OWN) == 0);
    /* A thread it creates is confined too. */
    pthread_t g;
    CHECK(pthread_create(&g, NULL, grandchild, NULL) == 0);
    CHECK(pthread_join(g, NULL) == 0);
    return NULL;
}

int main(void) {
    CHECK(mpk_init(-1) == 0);
    CHECK(mpk_malloc(OWN, 8) != NULL);
    victim_mem = mpk_malloc(VICTIM, 64);
    CHECK(victim_mem != NULL);
    CHECK(mpk_begin(VICTIM, PROT_READ | PROT_WRITE) == 0);
    victim_mem[0] = 0x5ec2e7;
    CHECK(mpk_end(VICTIM) == 0);

    pthread_t t;
    CHECK(pthread_create(&t, NULL, confined_thread, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);

    /* Untouched, and still usable by unconfined threads. */
    CHECK(mpk_begin(VICTIM, PROT_READ) == 0);
    CHECK(victim_mem[0] == 0x5ec2e7);
    CHECK(mpk_end(VICTIM) == 0);
    CHECK(mpk_free(victim_mem) == 0);
    printf("test_confine: ok (%s)\n", mpkvirt_backend());
    return 0;
}

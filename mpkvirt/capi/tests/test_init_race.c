/* Concurrent mpk_init: 8 threads released by a barrier call it at once. Exactly one gets 0,
 * every other one -1 with EBUSY, and the winner holds every key it asked for: with the
 * hardware backend all the keys that were free before (but the library's own when its
 * metadata is protected, and at most MPKVIRT_MAX_KEYS), so none is left for pkey_alloc; with
 * the emulated backend MPKVIRT_MAX_KEYS (default 15). Every thread can use the library
 * afterwards. The race runs in ROUNDS fresh child processes (mpk_init works once per
 * process). */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "check.h"
#include "mpkvirt.h"

#define THREADS 8
#define ROUNDS 20

static pthread_barrier_t start, after;
static int rc[THREADS], err[THREADS];

static void *racer(void *arg) {
    int me = (int)(intptr_t)arg;
    pthread_barrier_wait(&start);
    errno = 0;
    rc[me] = mpk_init(-1);
    err[me] = errno;
    pthread_barrier_wait(&after);
    /* Winner or not, the thread can use the library. */
    int vkey = 100 + me;
    uint64_t *p = mpk_malloc(vkey, sizeof *p);
    CHECK(p != NULL);
    CHECK(mpk_begin(vkey, PROT_READ | PROT_WRITE) == 0);
    *p = (uint64_t)vkey;
    CHECK(mpk_end(vkey) == 0);
    CHECK(mpk_free(p) == 0);
    return NULL;
}

/* Keys the kernel would hand out now (allocated and freed again). */
static int free_hw_keys(void) {
    int keys[16], n = 0;
    long k;
    while (n < 16 && (k = syscall(SYS_pkey_alloc, 0, 0)) >= 0) keys[n++] = (int)k;
    for (int i = 0; i < n; i++) CHECK(syscall(SYS_pkey_free, keys[i]) == 0);
    return n;
}

static int env_int(const char *name, int dflt) {
    const char *v = getenv(name);
    return v ? atoi(v) : dflt;
}

/* Whether the library takes a key for its own metadata (protected mode, the default on
 * PKU hardware). */
static int library_key(void) {
    const char *m = getenv("MPKVIRT_METADATA");
    return !(m && (strcmp(m, "cooperative") == 0 || strcmp(m, "gate") == 0 ||
                   strcmp(m, "gate-only") == 0));
}

static int round_in_child(void) {
    int before = free_hw_keys();
    pthread_barrier_init(&start, NULL, THREADS);
    pthread_barrier_init(&after, NULL, THREADS);
    pthread_t t[THREADS];
    for (intptr_t i = 0; i < THREADS; i++) CHECK(pthread_create(&t[i], NULL, racer, (void *)i) == 0);
    for (int i = 0; i < THREADS; i++) CHECK(pthread_join(t[i], NULL) == 0);
    int winners = 0;
    for (int i = 0; i < THREADS; i++) {
        if (rc[i] == 0) {
            winners++;
        } else if (rc[i] != -1 || err[i] != EBUSY) {
            fprintf(stderr, "test_init_race: a losing mpk_init returned %d, errno %d (%s), not EBUSY\n",
                    rc[i], err[i], strerror(err[i]));
            return 1;
        }
    }
    CHECK(winners == 1);
    CHECK(mpkvirt_backend() != NULL);
    int max_keys = env_int("MPKVIRT_MAX_KEYS", 15);
    int keys = mpkvirt_key_count();
    if (strcmp(mpkvirt_backend(), "hardware") == 0) {
        int usable = before - library_key();
        int expected = usable < max_keys ? usable : max_keys;
        if (keys != expected) {
            fprintf(stderr, "test_init_race: the winner holds %d keys; %d were free (%d usable, max %d)\n",
                    keys, before, usable, max_keys);
            return 1;
        }
        if (expected == usable) {
            errno = 0;
            CHECK(syscall(SYS_pkey_alloc, 0, 0) == -1 && errno == ENOSPC); /* none leaked elsewhere */
        }
    } else {
        CHECK(keys == max_keys);
    }
    return 0;
}

int main(void) {
    for (int r = 0; r < ROUNDS; r++) {
        pid_t child = fork();
        CHECK(child >= 0);
        if (child == 0) _exit(round_in_child());
        int status = 0;
        CHECK(waitpid(child, &status, 0) == child);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "test_init_race: round %d failed (status %#x)\n", r, status);
            return 1;
        }
    }
    printf("test_init_race: %d rounds of %d concurrent mpk_init: one winner, the rest EBUSY: ok\n",
           ROUNDS, THREADS);
    return 0;
}

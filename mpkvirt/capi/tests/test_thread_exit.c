/* mpk_* calls from a pthread_key destructor, at thread exit, of a thread that used the
 * library before.
 *
 * glibc runs pthread_key destructors after the thread's thread_local destructors, so the
 * library's per-thread state is gone by then. A call from such a destructor fails cleanly:
 * -1 (NULL, MAP_FAILED) with errno EOPNOTSUPP, nothing printed, nothing changed (a block
 * the destructor tried to free is still live). The thread exits by returning, by
 * pthread_exit and by being cancelled. Afterwards every key is free: another thread begins
 * as many domains as there are keys. (A thread whose first call is in such a destructor:
 * test_thread_exit_first_call.c.) */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define VKEY 1
#define OTHER 100 /* OTHER + 0 .. keys - 1 */

static pthread_key_t key;
static void *block; /* allocated by the main thread; the destructors try to free it */

struct result {
    int malloc_err, begin_rc, begin_err, end_rc, end_err, free_rc, free_err, mmap_err;
    void *malloc_p, *mmap_p;
    int ran;
};
static struct result results[3];

static void destructor(void *arg) {
    struct result *r = arg;
    errno = 0;
    r->malloc_p = mpk_malloc(VKEY, 16);
    r->malloc_err = errno;
    errno = 0;
    r->begin_rc = mpk_begin(VKEY, PROT_READ | PROT_WRITE);
    r->begin_err = errno;
    errno = 0;
    r->end_rc = mpk_end(VKEY);
    r->end_err = errno;
    errno = 0;
    r->mmap_p = mpk_mmap(VKEY, NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    r->mmap_err = errno;
    errno = 0;
    r->free_rc = mpk_free(block);
    r->free_err = errno;
    r->ran = 1;
}

enum { RETURN, EXIT, CANCEL };
static const char *how[] = {"return", "pthread_exit", "pthread_cancel"};

static void *thread(void *arg) {
    int mode = (int)(intptr_t)arg;
    CHECK(mpk_begin(VKEY, PROT_READ | PROT_WRITE) == 0);
    CHECK(mpk_end(VKEY) == 0);
    CHECK(pthread_setspecific(key, &results[mode]) == 0);
    if (mode == EXIT) pthread_exit(NULL);
    if (mode == CANCEL) {
        for (;;) pause(); /* a cancellation point */
    }
    return NULL;
}

static void check_result(int mode) {
    struct result *r = &results[mode];
    CHECK(r->ran);
    int ok = r->malloc_p == NULL && r->malloc_err == EOPNOTSUPP && r->begin_rc == -1 &&
             r->begin_err == EOPNOTSUPP && r->end_rc == -1 && r->end_err == EOPNOTSUPP &&
             r->mmap_p == MAP_FAILED && r->mmap_err == EOPNOTSUPP && r->free_rc == -1 &&
             r->free_err == EOPNOTSUPP;
    if (!ok) {
        fprintf(stderr,
                "test_thread_exit (%s): malloc %p errno %d, begin %d errno %d, end %d errno %d, "
                "mmap %p errno %d, free %d errno %d\n",
                how[mode], r->malloc_p, r->malloc_err, r->begin_rc, r->begin_err, r->end_rc,
                r->end_err, r->mmap_p, r->mmap_err, r->free_rc, r->free_err);
        exit(1);
    }
}

static int keys;

static void *begin_all(void *arg) {
    (void)arg;
    for (int k = 0; k < keys; k++) CHECK(mpk_begin(OTHER + k, PROT_READ) == 0);
    for (int k = 0; k < keys; k++) CHECK(mpk_end(OTHER + k) == 0);
    return NULL;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "2000", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    keys = mpkvirt_key_count();
    CHECK((block = mpk_malloc(VKEY, 64)) != NULL);
    for (int k = 0; k < keys; k++) CHECK(mpk_malloc(OTHER + k, 8) != NULL);
    CHECK(pthread_key_create(&key, destructor) == 0);

    capture_stderr_begin();
    for (intptr_t mode = RETURN; mode <= CANCEL; mode++) {
        pthread_t t;
        CHECK(pthread_create(&t, NULL, thread, (void *)mode) == 0);
        if (mode == CANCEL) CHECK(pthread_cancel(t) == 0);
        void *ret = NULL;
        CHECK(pthread_join(t, &ret) == 0);
        CHECK(ret == (mode == CANCEL ? PTHREAD_CANCELED : NULL));
    }
    char *text = capture_stderr_end();
    CHECK_NO_STDERR(text);
    free(text);
    for (int mode = RETURN; mode <= CANCEL; mode++) check_result(mode);

    CHECK(mpk_free(block) == 0); /* the destructors' mpk_free changed nothing */
    CHECK_ERR(mpk_free(block), EINVAL);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, begin_all, NULL) == 0); /* no key left pinned */
    CHECK(pthread_join(t, NULL) == 0);
    printf("test_thread_exit: mpk_* from pthread_key destructors fail with EOPNOTSUPP (%s backend): ok\n",
           mpkvirt_backend());
    return 0;
}

/* A thread whose first mpk_* call is in a pthread_key destructor, at thread exit.
 *
 * The destructor begins a domain and does not end it, as a careless cleanup path would.
 * Whatever the library answers (the call may fail cleanly, or succeed), the thread's exit
 * must not leave a key pinned: a view that a thread still has when it exits is ended with
 * it. Afterwards another thread begins as many other domains as there are keys; a key left
 * pinned makes that fail with EBUSY after the pin wait. Nothing is printed. */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include "waiting.h"
#include "mpkvirt.h"

#define VKEY 1
#define OTHER 100 /* OTHER + 0 .. keys - 1 */

static pthread_key_t key;
static int begin_rc = 2, begin_err;
static int keys;

static void destructor(void *arg) {
    (void)arg;
    errno = 0;
    begin_rc = mpk_begin(VKEY, PROT_READ | PROT_WRITE);
    begin_err = errno;
}

static void *thread(void *arg) {
    (void)arg;
    CHECK(pthread_setspecific(key, &key) == 0); /* no mpk_* call before */
    return NULL;
}

static void *begin_all(void *arg) {
    (void)arg;
    for (int k = 0; k < keys; k++) {
        if (mpk_begin(OTHER + k, PROT_READ) != 0) {
            fprintf(stderr, "test_thread_exit_first_call: mpk_begin of the %d-th of %d domains: "
                            "errno %d (%s): the exited thread's view still pins a key\n",
                    k + 1, keys, errno, strerror(errno));
            exit(1);
        }
    }
    for (int k = 0; k < keys; k++) CHECK(mpk_end(OTHER + k) == 0);
    return NULL;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "2000", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    keys = mpkvirt_key_count();
    CHECK(mpk_malloc(VKEY, 8) != NULL);
    for (int k = 0; k < keys; k++) CHECK(mpk_malloc(OTHER + k, 8) != NULL);
    CHECK(pthread_key_create(&key, destructor) == 0);

    capture_stderr_begin();
    pthread_t t;
    CHECK(pthread_create(&t, NULL, thread, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    char *text = capture_stderr_end();
    CHECK_NO_STDERR(text);
    free(text);
    CHECK(begin_rc == 0 || (begin_rc == -1 && begin_err == EOPNOTSUPP));
    printf("test_thread_exit_first_call: the destructor's mpk_begin %s\n",
           begin_rc == 0 ? "succeeded" : "failed with EOPNOTSUPP");

    CHECK(pthread_create(&t, NULL, begin_all, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(mpk_munmap(VKEY) == 0); /* and the domain is not begun by anyone */
    printf("test_thread_exit_first_call: no key left pinned (%s backend): ok\n", mpkvirt_backend());
    return 0;
}

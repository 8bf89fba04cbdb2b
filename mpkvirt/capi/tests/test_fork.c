/* fork() in a process with begun domains: what the header promises the child.
 *
 * The parent's main thread has domain A begun; another thread T has domain B begun and waits
 * (outside the library) while the main thread forks. The child has one thread, a copy of the
 * main thread:
 *   - it still has A begun (reads the parent's data, copy-on-write), ends and begins it again;
 *   - it may use the library as usual: begin B, allocate and free, create domains, create a
 *     thread that uses the library; mpk_init says EBUSY (already initialised);
 *   - T does not exist in the child, but B stays begun by it: mpk_munmap(B) fails with EBUSY,
 *     and B's key stays pinned for good, so the child can have only mpkvirt_key_count() - 1
 *     domains resident at once (one more mpk_begin waits and fails with EBUSY).
 * The parent is unaffected: once T ends B it begins as many domains as there are keys. */
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include "check.h"
#include "mpkvirt.h"

#define A 1
#define B 2
#define FRESH 100 /* FRESH + 0 .. keys */

static uint64_t *a_mem, *b_mem;
static int keys;
static int ready_pipe[2], release_pipe[2];

static void *holder(void *arg) {
    (void)arg;
    CHECK(mpk_begin(B, PROT_READ | PROT_WRITE) == 0);
    b_mem[0] = 20;
    char c;
    CHECK(write(ready_pipe[1], "r", 1) == 1);
    CHECK(read(release_pipe[0], &c, 1) == 1);
    CHECK(mpk_end(B) == 0);
    return NULL;
}

static void *child_thread(void *arg) {
    uint64_t *p = arg;
    CHECK(mpk_begin(FRESH + 1, PROT_READ | PROT_WRITE) == 0);
    p[0] = 5;
    CHECK(mpk_end(FRESH + 1) == 0);
    return NULL;
}

static int in_child(void) {
    /* The calling thread's begun domain came along. */
    CHECK(a_mem[0] == 10);
    a_mem[0] = 11;
    CHECK(mpk_end(A) == 0);
    CHECK(mpk_begin(A, PROT_READ | PROT_WRITE) == 0);
    CHECK(a_mem[0] == 11);
    /* The library works as usual. */
    CHECK_ERR(mpk_init(-1), EBUSY);
    CHECK(mpk_begin(B, PROT_READ) == 0);
    CHECK(b_mem[0] == 20);
    CHECK(mpk_end(B) == 0);
    uint64_t *p = mpk_malloc(FRESH, 64);
    CHECK(p != NULL);
    CHECK(mpk_begin(FRESH, PROT_READ | PROT_WRITE) == 0);
    p[0] = 3;
    CHECK(mpk_end(FRESH) == 0);
    CHECK(mpk_free(p) == 0);
    uint64_t *q = mpk_malloc(FRESH + 1, 64);
    CHECK(q != NULL);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, child_thread, q) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(mpk_begin(FRESH + 1, PROT_READ) == 0 && q[0] == 5 && mpk_end(FRESH + 1) == 0);
    /* What T had begun stays begun, and its key pinned. */
    CHECK_ERR(mpk_munmap(B), EBUSY);
    for (int k = 2; k < keys; k++) CHECK(mpk_malloc(FRESH + k, 8) != NULL);
    for (int k = 2; k < keys; k++) CHECK(mpk_begin(FRESH + k, PROT_READ) == 0); /* A + keys-2 */
    CHECK(mpk_malloc(FRESH + keys, 8) != NULL);
    CHECK_ERR(mpk_begin(FRESH + keys, PROT_READ), EBUSY); /* would need B's key */
    for (int k = 2; k < keys; k++) CHECK(mpk_end(FRESH + k) == 0);
    CHECK(mpk_begin(FRESH + keys, PROT_READ) == 0 && mpk_end(FRESH + keys) == 0);
    CHECK(mpk_end(A) == 0);
    return 0;
}

int main(void) {
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "300", 1) == 0);
    CHECK(mpk_init(-1) == 0);
    keys = mpkvirt_key_count();
    CHECK(keys >= 3);
    CHECK((a_mem = mpk_malloc(A, sizeof(uint64_t))) != NULL);
    CHECK((b_mem = mpk_malloc(B, sizeof(uint64_t))) != NULL);
    CHECK(mpk_begin(A, PROT_READ | PROT_WRITE) == 0);
    a_mem[0] = 10;
    CHECK(pipe(ready_pipe) == 0 && pipe(release_pipe) == 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, holder, NULL) == 0);
    char c;
    CHECK(read(ready_pipe[0], &c, 1) == 1);

    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) _exit(in_child());
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "test_fork: the child failed (status %#x)\n", status);
        return 1;
    }

    /* The parent: its data untouched by the child, every key usable once T ends B. */
    CHECK(a_mem[0] == 10);
    CHECK(mpk_end(A) == 0);
    CHECK(write(release_pipe[1], "g", 1) == 1);
    CHECK(pthread_join(t, NULL) == 0);
    for (int k = 0; k < keys; k++) CHECK(mpk_malloc(FRESH + 200 + k, 8) != NULL);
    for (int k = 0; k < keys; k++) CHECK(mpk_begin(FRESH + 200 + k, PROT_READ) == 0);
    for (int k = 0; k < keys; k++) CHECK(mpk_end(FRESH + 200 + k) == 0);
    CHECK(mpk_munmap(B) == 0);
    printf("test_fork: the child of a process with begun domains behaves as documented (%s backend): ok\n",
           mpkvirt_backend());
    return 0;
}

/* Bad calls get a clear errno and change nothing. */
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include "check.h"
#include "mpkvirt.h"

int main(void) {
    CHECK_ERR(mpk_begin(1, PROT_READ), EINVAL); /* before mpk_init */
    CHECK(mpk_malloc(1, 8) == NULL && errno == EINVAL);
    CHECK(mpkvirt_backend() == NULL && mpkvirt_key_count() == -1);

    /* A configuration variable that does not parse fails mpk_init, which can then be retried. */
    CHECK(setenv("MPKVIRT_PIN_WAIT_MS", "soon", 1) == 0);
    CHECK_ERR(mpk_init(-1), EINVAL);
    CHECK(mpkvirt_backend() == NULL);
    CHECK(unsetenv("MPKVIRT_PIN_WAIT_MS") == 0);

    CHECK(mpk_init(-1) == 0);
    CHECK_ERR(mpk_init(-1), EBUSY);
    CHECK_ERR(mpk_begin(7, PROT_READ), EINVAL); /* no such domain */
    CHECK_ERR(mpk_end(7), EINVAL);
    CHECK_ERR(mpk_munmap(7), EINVAL);
    CHECK_ERR(mpk_mprotect(7, PROT_READ), EINVAL);

    errno = 0;
    CHECK(mpk_mmap(1, NULL, 0, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED && errno == EINVAL);
    CHECK(mpk_mmap(1, (void *)0x100000, 4096, PROT_READ, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED);
    CHECK(errno == EINVAL);
    CHECK(mpk_mmap(1, NULL, 4096, PROT_READ, MAP_SHARED | MAP_ANONYMOUS, -1, 0) == MAP_FAILED && errno == EINVAL);
    CHECK(mpk_mmap(1, NULL, 4096, PROT_READ, MAP_PRIVATE, 12345, 0) == MAP_FAILED && errno == EBADF);
    CHECK_ERR(mpk_munmap(1), EINVAL); /* the failed calls created no domain */

    char *p = mpk_mmap(1, NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED);
    CHECK(mpk_mmap(1, NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED); /* prot differs */
    CHECK(errno == EINVAL);
    CHECK_ERR(mpk_begin(1, PROT_NONE), EINVAL);
    CHECK(mpk_begin(1, PROT_READ | PROT_WRITE) == 0);
    CHECK_ERR(mpk_munmap(1), EBUSY); /* begun */
    p[0] = 1;                        /* the failed calls changed nothing */
    CHECK(mpk_end(1) == 0);
    CHECK(mpk_munmap(1) == 0);
    CHECK_ERR(mpk_munmap(1), EINVAL);

    /* More domains begun at once than there are keys. */
    int n = mpkvirt_key_count();
    for (int k = 100; k <= 100 + n; k++) CHECK(mpk_malloc(k, 8) != NULL);
    for (int k = 100; k < 100 + n; k++) CHECK(mpk_begin(k, PROT_READ) == 0);
    CHECK_ERR(mpk_begin(100 + n, PROT_READ), E2BIG);
    for (int k = 100; k < 100 + n; k++) CHECK(mpk_end(k) == 0);
    CHECK(mpk_begin(100 + n, PROT_READ) == 0); /* and works once there is room */
    CHECK(mpk_end(100 + n) == 0);

    /* A SIGSEGV sent to the process (not a fault) is not swallowed by the library's handler:
     * the default action still terminates the process. */
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        raise(SIGSEGV);
        _exit(0); /* reached only if the signal was swallowed */
    }
    int status = 0;
    CHECK(waitpid(child, &status, 0) == child);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);

    /* A domain whose address space is full. */
    CHECK(mpk_malloc(200, (size_t)1 << 40) == NULL && errno == ENOMEM);
    printf("test_errors (%s backend): ok\n", mpkvirt_backend());
    return 0;
}

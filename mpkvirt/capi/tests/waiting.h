/* Helpers for tests that need a thread to be *inside* a blocking mpk_* call, and for
 * tests that must see nothing printed on stderr. */
#ifndef MPKVIRT_WAITING_H
#define MPKVIRT_WAITING_H
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include "check.h"

static inline pid_t current_tid(void) { return (pid_t)syscall(SYS_gettid); }

static inline void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* The system call thread `tid` of this process is blocked in (/proc/self/task/TID/syscall),
 * or -1 while it runs. */
static inline long blocked_syscall(pid_t tid) {
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", (int)tid);
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    CHECK(n > 0);
    buf[n] = 0;
    if (strncmp(buf, "running", 7) == 0) return -1;
    return strtol(buf, NULL, 10);
}

/* Waits until a thread that announced it is about to call a blocking mpk_* function (by
 * storing its thread id in *entering, and doing nothing else that blocks before the call)
 * sleeps inside the library's wait for a key: a futex (mpkvirt waits on one), or
 * nanosleep/clock_nanosleep (the sleep-polling wait of older versions, so the same tests
 * can be run against them). */
static inline void wait_until_waiting_in_library(atomic_int *entering) {
    pid_t tid;
    while ((tid = atomic_load(entering)) == 0) sleep_ms(1);
    for (;;) {
        long nr = blocked_syscall(tid);
        if (nr == SYS_futex || nr == SYS_nanosleep || nr == SYS_clock_nanosleep) return;
        sleep_ms(1);
    }
}

/* stderr into a temporary file, to check that a scenario prints nothing (no panic text). */
static int saved_stderr = -1;
static FILE *captured;

/* Restores stderr; returns what was written to it meanwhile (malloc'd, NUL-terminated). */
static inline char *capture_stderr_end(void);

/* A check that fails while stderr is captured exits: show what it printed. */
static inline void capture_stderr_at_exit(void) {
    if (saved_stderr < 0) return;
    char *text = capture_stderr_end();
    fputs(text, stderr);
    free(text);
}

static inline void capture_stderr_begin(void) {
    static int registered;
    if (!registered) CHECK(atexit(capture_stderr_at_exit) == 0);
    registered = 1;
    fflush(stderr);
    captured = tmpfile();
    CHECK(captured != NULL);
    saved_stderr = dup(2);
    CHECK(saved_stderr >= 0);
    CHECK(dup2(fileno(captured), 2) == 2);
}

static inline char *capture_stderr_end(void) {
    fflush(stderr);
    int fd = saved_stderr;
    saved_stderr = -1;
    CHECK(dup2(fd, 2) == 2);
    close(fd);
    struct stat st;
    CHECK(fstat(fileno(captured), &st) == 0);
    char *text = calloc((size_t)st.st_size + 1, 1);
    CHECK(text != NULL);
    CHECK(pread(fileno(captured), text, (size_t)st.st_size, 0) == st.st_size);
    fclose(captured);
    return text;
}

#define CHECK_NO_STDERR(text)                                                           \
    do {                                                                                \
        if ((text)[0] != 0) {                                                           \
            fprintf(stderr, "%s:%d: unexpected output on stderr:\n%s\n", __FILE__,      \
                    __LINE__, (text));                                                  \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

#endif

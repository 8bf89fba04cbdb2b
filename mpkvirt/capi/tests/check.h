/* Minimal assertions for the C tests: print the failing expression and exit 1. */
#ifndef MPKVIRT_CHECK_H
#define MPKVIRT_CHECK_H
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                     \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "%s:%d: check failed: %s (errno %d: %s)\n", __FILE__,       \
                    __LINE__, #cond, errno, strerror(errno));                           \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

#define CHECK_ERR(call, err)                                                            \
    do {                                                                                \
        errno = 0;                                                                      \
        CHECK((call) == -1);                                                            \
        CHECK(errno == (err));                                                          \
    } while (0)
#endif

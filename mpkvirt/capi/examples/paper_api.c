/* A program written only against libmpk's paper API (mpk_init, mpk_mmap, mpk_begin,
 * mpk_end, mpk_mprotect, mpk_malloc, mpk_free, mpk_munmap): per-user secrets, each user's
 * in its own domain, more users than there are protection keys. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include "mpkvirt.h"

#define USERS 40

int main(void) {
    if (mpk_init(-1) != 0) { perror("mpk_init"); return 1; }

    /* A shared, read-mostly table in its own domain (vkey 1000), filled once. */
    char *table = mpk_mmap(1000, NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (table == MAP_FAILED) { perror("mpk_mmap"); return 1; }
    mpk_begin(1000, PROT_READ | PROT_WRITE);
    strcpy(table, "greetings");
    mpk_end(1000);
    mpk_mprotect(1000, PROT_READ);

    char *secret[USERS];
    for (int u = 0; u < USERS; u++) {
        secret[u] = mpk_malloc(u, 64);
        if (!secret[u]) { perror("mpk_malloc"); return 1; }
        mpk_begin(u, PROT_READ | PROT_WRITE);
        snprintf(secret[u], 64, "secret of user %d", u);
        mpk_end(u);
    }
    int ok = 0;
    for (int u = 0; u < USERS; u++) {
        char expect[64];
        snprintf(expect, sizeof expect, "secret of user %d", u);
        mpk_begin(u, PROT_READ);
        mpk_begin(1000, PROT_READ);
        ok += strcmp(secret[u], expect) == 0 && strcmp(table, "greetings") == 0;
        mpk_end(1000);
        mpk_end(u);
        mpk_free(secret[u]);
        mpk_munmap(u);
    }
    mpk_munmap(1000);
    printf("paper_api: %d of %d users' secrets intact\n", ok, USERS);
    return ok == USERS ? 0 : 1;
}

#include <stdio.h>
#include <sys/mman.h>
#include "mpkvirt.h"

static void peek(void *p) { printf("read %c\n", *(volatile char *)p); }

int main(void) {
    if (mpk_init(-1) != 0) { perror("mpk_init"); return 1; }
    char *secret = mpk_malloc(7, 32);        /* domain 7: only threads that begin it */

    mpk_begin(7, PROT_READ | PROT_WRITE);    /* enter: one WRPKRU on PKU hardware */
    secret[0] = 'x';
    mpk_end(7);

    struct mpkvirt_fault f;                  /* outside: the read faults, and is reported */
    if (mpkvirt_guarded_call(peek, secret, &f) != 0)
        printf("denied: vkey %d, address %p (%s backend)\n", f.vkey, (void *)f.addr, mpkvirt_backend());
    return 0;
}

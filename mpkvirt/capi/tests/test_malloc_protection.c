/* mpk_malloc memory is reachable only between mpk_begin and mpk_end, with the rights
 * begun; mpk_mprotect gives every thread rights without mpk_begin; frees are checked. */
#include <sys/mman.h>
#include "check.h"
#include "mpkvirt.h"

static void write_byte(void *p) { *(volatile char *)p = 1; }
static void read_byte(void *p) { (void)*(volatile char *)p; }

int main(void) {
    CHECK(mpk_init(-1) == 0);
    char *a = mpk_malloc(1, 100), *b = mpk_malloc(1, 5000), *c = mpk_malloc(2, 8);
    CHECK(a && b && c && a != b);

    struct mpkvirt_fault f;
    CHECK_ERR(mpkvirt_guarded_call(read_byte, a, &f), EFAULT);
    CHECK_ERR(mpkvirt_guarded_call(read_byte, b + 4999, &f), EFAULT);

    CHECK(mpk_begin(1, PROT_READ | PROT_WRITE) == 0);
    a[0] = 'a';
    b[4999] = 'b';
    CHECK_ERR(mpkvirt_guarded_call(read_byte, c, &f), EFAULT); /* domain 2 not begun */
    CHECK(f.vkey == 2);
    CHECK(mpk_begin(2, PROT_READ) == 0); /* both begun now */
    CHECK(mpkvirt_guarded_call(read_byte, c, &f) == 0);
    CHECK(mpkvirt_guarded_call(write_byte, a, &f) == 0);
    CHECK(mpk_end(2) == 0);
    CHECK(mpk_end(1) == 0);
    CHECK_ERR(mpkvirt_guarded_call(read_byte, a, &f), EFAULT);

    /* Process-wide rights: read-only for everybody without mpk_begin; a thread that begun
     * read-write keeps its own rights (a thread's rights are its own and the process's). */
    CHECK(mpk_mprotect(1, PROT_READ) == 0);
    CHECK(a[0] == 1 && b[4999] == 'b');
    CHECK_ERR(mpkvirt_guarded_call(write_byte, a, &f), EFAULT);
    CHECK(mpk_begin(1, PROT_READ | PROT_WRITE) == 0);
    CHECK(mpkvirt_guarded_call(write_byte, a, &f) == 0);
    CHECK(mpk_end(1) == 0);
    CHECK_ERR(mpkvirt_guarded_call(write_byte, a, &f), EFAULT);
    CHECK(mpk_mprotect(1, PROT_NONE) == 0);
    CHECK_ERR(mpkvirt_guarded_call(read_byte, a, &f), EFAULT);

    CHECK(mpk_free(a) == 0);
    CHECK_ERR(mpk_free(a), EINVAL); /* double free */
    CHECK_ERR(mpk_free(b + 1), EINVAL);
    CHECK(mpk_free(NULL) == 0);
    int x;
    CHECK_ERR(mpk_free(&x), EINVAL);
    printf("test_malloc_protection (%s backend): ok\n", mpkvirt_backend());
    return 0;
}

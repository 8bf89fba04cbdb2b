/* A denied access is reported, not a crash: through mpkvirt_guarded_call, with the virtual
 * key, the address and the kind of access. */
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include "check.h"
#include "mpkvirt.h"

/* The layout mpkvirt's Rust side asserts too (capi.rs): the two must not drift apart. */
_Static_assert(sizeof(struct mpkvirt_fault) == 24, "struct mpkvirt_fault size");
_Static_assert(offsetof(struct mpkvirt_fault, addr) == 16, "struct mpkvirt_fault layout");

static void write_byte(void *p) { *(volatile char *)p = 7; }

/* Ends domain 44, begins 43, then faults on domain 42 (not begun). */
static void rearrange_then_fault(void *p) {
    CHECK(mpk_end(44) == 0);
    CHECK(mpk_begin(43, PROT_READ | PROT_WRITE) == 0);
    *(volatile char *)p = 1;
}
static void read_byte(void *p) { (void)*(volatile char *)p; }

int main(void) {
    CHECK(mpk_init(-1) == 0);
    char *secret = mpk_malloc(42, 64);
    CHECK(secret != NULL);

    CHECK(mpk_begin(42, PROT_READ | PROT_WRITE) == 0);
    CHECK(mpkvirt_guarded_call(write_byte, secret, NULL) == 0);
    CHECK(secret[0] == 7);
    CHECK(mpk_end(42) == 0);

    /* Outside the domain: a write and a read are both reported. */
    struct mpkvirt_fault f;
    memset(&f, 0, sizeof f);
    CHECK_ERR(mpkvirt_guarded_call(write_byte, secret, &f), EFAULT);
    CHECK(f.vkey == 42);
    CHECK(f.addr == (uintptr_t)secret);
    CHECK(f.access == MPKVIRT_ACCESS_WRITE);
    CHECK_ERR(mpkvirt_guarded_call(read_byte, secret, &f), EFAULT);
    CHECK(f.access == MPKVIRT_ACCESS_READ && f.vkey == 42);

    /* Read-only: reads pass, writes are reported. */
    CHECK(mpk_begin(42, PROT_READ) == 0);
    CHECK(mpkvirt_guarded_call(read_byte, secret, &f) == 0);
    CHECK_ERR(mpkvirt_guarded_call(write_byte, secret, &f), EFAULT);
    CHECK(f.access == MPKVIRT_ACCESS_WRITE);
    if (strcmp(mpkvirt_backend(), "hardware") == 0) {
        CHECK(f.si_code == 4 /* SEGV_PKUERR */ && f.hw_key > 0);
    }
    CHECK(mpk_end(42) == 0);

    /* A faulting call's begins and ends are undone: the thread's set is what it was. */
    char *b43 = mpk_malloc(43, 8), *b44 = mpk_malloc(44, 8);
    CHECK(b43 && b44);
    CHECK(mpk_begin(44, PROT_READ | PROT_WRITE) == 0);
    CHECK_ERR(mpkvirt_guarded_call(rearrange_then_fault, secret, &f), EFAULT);
    CHECK(f.vkey == 42);
    CHECK_ERR(mpkvirt_guarded_call(read_byte, b43, &f), EFAULT); /* 43 is not begun */
    CHECK(f.vkey == 43);
    CHECK_ERR(mpk_end(43), EINVAL);
    CHECK(mpkvirt_guarded_call(read_byte, b44, &f) == 0); /* 44 is begun again */
    CHECK(mpk_end(44) == 0);

    /* The process and the library are fine afterwards. */
    CHECK(mpk_begin(42, PROT_READ | PROT_WRITE) == 0);
    secret[1] = 1;
    CHECK(mpk_end(42) == 0);
    CHECK_ERR(mpkvirt_guarded_call(NULL, NULL, &f), EINVAL);
    printf("test_fault_report (%s backend): ok\n", mpkvirt_backend());
    return 0;
}

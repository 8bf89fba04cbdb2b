/* Sizes at the edge of size_t: they fail, and change nothing.
 *
 * mpk_mmap with a length that cannot be a mapping (SIZE_MAX and its neighbours, lengths that
 * would wrap when rounded to pages, lengths above PTRDIFF_MAX) fails with ENOMEM or EINVAL,
 * on an existing domain and on a fresh vkey; the next mpk_mmap/mpk_malloc still returns memory
 * inside the caller's domain (no access without mpk_begin, a fault report naming the vkey;
 * no overlap with the domain's earlier memory). mpk_malloc(SIZE_MAX) and mpk_malloc(1 << 40)
 * fail with ENOMEM. A failed first call on a fresh vkey leaves the vkey unknown (mpk_begin
 * and mpk_munmap: EINVAL). An mpk_malloc domain holds 64 MiB; a domain made by mpk_mmap(len)
 * holds len + 64 MiB (the header's headroom). */
#include <stdint.h>
#include <sys/mman.h>
#include "check.h"
#include "mpkvirt.h"

#define RW (PROT_READ | PROT_WRITE)
#define ANON (MAP_PRIVATE | MAP_ANONYMOUS)
#define MMAP_DOMAIN 1
#define MALLOC_DOMAIN 2
#define FRESH 100

static const size_t bad_lens[] = {SIZE_MAX, SIZE_MAX - 1, SIZE_MAX - 4095, SIZE_MAX - 4096,
                                  (SIZE_MAX >> 1) + 1};
#define NBAD (sizeof bad_lens / sizeof bad_lens[0])

static void read_word(void *p) { (void)*(volatile uint64_t *)p; }

/* `p` (len bytes) belongs to the domain of `vkey`: unreachable without mpk_begin (nobody has
 * it begun, so this holds with the emulated backend too), reachable with it. */
static void check_in_domain(int vkey, uint64_t *p) {
    struct mpkvirt_fault f;
    errno = 0;
    CHECK(mpkvirt_guarded_call(read_word, p, &f) == -1 && errno == EFAULT);
    CHECK(f.vkey == vkey && f.addr == (uintptr_t)p);
    CHECK(mpk_begin(vkey, RW) == 0);
    p[0] = 0x5a5a;
    CHECK(mpk_end(vkey) == 0);
}

static int disjoint(const void *a, size_t alen, const void *b, size_t blen) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x + alen <= y || y + blen <= x;
}

int main(void) {
    CHECK(mpk_init(-1) == 0);

    /* An mpk_mmap domain with some memory in it. */
    uint64_t *first = mpk_mmap(MMAP_DOMAIN, NULL, 4096, RW, ANON, -1, 0);
    CHECK(first != MAP_FAILED);
    CHECK(mpk_begin(MMAP_DOMAIN, RW) == 0);
    first[0] = 1111;
    CHECK(mpk_end(MMAP_DOMAIN) == 0);
    uint64_t *block = mpk_malloc(MALLOC_DOMAIN, 64);
    CHECK(block != NULL);

    for (size_t i = 0; i < NBAD; i++) {
        size_t len = bad_lens[i];
        errno = 0;
        void *p = mpk_mmap(MMAP_DOMAIN, NULL, len, RW, ANON, -1, 0);
        if (p != MAP_FAILED) {
            fprintf(stderr, "test_sizes: mpk_mmap(len %#zx) returned %p\n", len, p);
            return 1;
        }
        CHECK(errno == ENOMEM || errno == EINVAL);
        /* The next mapping is an ordinary one of the domain. */
        uint64_t *q = mpk_mmap(MMAP_DOMAIN, NULL, 4096, RW, ANON, -1, 0);
        CHECK(q != MAP_FAILED);
        CHECK(disjoint(q, 4096, first, 4096));
        check_in_domain(MMAP_DOMAIN, q);
        CHECK(mpk_begin(MMAP_DOMAIN, PROT_READ) == 0);
        CHECK(first[0] == 1111 && q[0] == 0x5a5a);
        CHECK(mpk_end(MMAP_DOMAIN) == 0);
        CHECK(mpk_free(q) == 0);
        uint64_t *m = mpk_malloc(MALLOC_DOMAIN, 64);
        CHECK(m != NULL && disjoint(m, 64, block, 64));
        check_in_domain(MALLOC_DOMAIN, m);
        CHECK(mpk_free(m) == 0);

        /* On a fresh vkey: no domain is left behind. */
        errno = 0;
        CHECK(mpk_mmap(FRESH + (int)i, NULL, len, RW, ANON, -1, 0) == MAP_FAILED);
        CHECK(errno == ENOMEM || errno == EINVAL);
        CHECK_ERR(mpk_begin(FRESH + (int)i, RW), EINVAL);
        CHECK_ERR(mpk_munmap(FRESH + (int)i), EINVAL);
    }

    const size_t bad_sizes[] = {SIZE_MAX, SIZE_MAX - 15, (size_t)1 << 40, (64u << 20) + 1};
    for (size_t i = 0; i < sizeof bad_sizes / sizeof bad_sizes[0]; i++) {
        errno = 0;
        CHECK(mpk_malloc(MALLOC_DOMAIN, bad_sizes[i]) == NULL && errno == ENOMEM);
        int fresh = FRESH + 50 + (int)i;
        errno = 0;
        CHECK(mpk_malloc(fresh, bad_sizes[i]) == NULL && errno == ENOMEM);
        CHECK_ERR(mpk_begin(fresh, RW), EINVAL);
        CHECK_ERR(mpk_munmap(fresh), EINVAL);
    }
    uint64_t *m = mpk_malloc(MALLOC_DOMAIN, 64);
    CHECK(m != NULL);
    check_in_domain(MALLOC_DOMAIN, m);
    CHECK(mpk_free(m) == 0);

    /* The headroom: 64 MiB for an mpk_malloc domain, len + 64 MiB after mpk_mmap(len). */
    const size_t headroom = (size_t)64 << 20, mib = (size_t)1 << 20;
    CHECK(mpk_malloc(FRESH + 90, headroom) != NULL);
    errno = 0;
    CHECK(mpk_malloc(FRESH + 90, 16) == NULL && errno == ENOMEM);
    int got = 0;
    while (mpk_malloc(FRESH + 91, mib) != NULL) got++;
    CHECK(errno == ENOMEM && got == 64);
    CHECK(mpk_mmap(FRESH + 92, NULL, 3 * mib, RW, ANON, -1, 0) != MAP_FAILED);
    got = 0;
    while (mpk_mmap(FRESH + 92, NULL, mib, RW, ANON, -1, 0) != MAP_FAILED) got++;
    CHECK(errno == ENOMEM && got == 64);
    for (int k = 90; k <= 92; k++) CHECK(mpk_munmap(FRESH + k) == 0);

    CHECK(mpk_begin(MMAP_DOMAIN, PROT_READ) == 0 && first[0] == 1111 && mpk_end(MMAP_DOMAIN) == 0);
    CHECK(mpk_free(block) == 0);
    printf("test_sizes: %zu huge mpk_mmap lengths and 4 mpk_malloc sizes fail and change nothing: ok\n",
           NBAD);
    return 0;
}

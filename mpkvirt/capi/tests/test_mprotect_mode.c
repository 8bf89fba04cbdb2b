/* libmpk's mprotect mode: after mpk_mprotect(vkey, prot) returns, every thread of the
 * process has prot on the vkey's pages without mpk_begin — threads that never called
 * mpkvirt, blocked in a system call or spinning in user code, and threads created later.
 * The reader threads below never call any mpk_ or mpkvirt_ function: they read the pages
 * with plain loads (a wrong answer is a SIGSEGV, which fails the test) and, on PKU hardware,
 * report their own PKRU. With PKU a grant reaches a thread at its first access (a fault
 * the library's handler resolves); a revocation reaches every thread before mpk_mprotect
 * returns. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>
#include "check.h"
#include "mpkvirt.h"

#define READERS 4
#define VKEY 5

enum { IDLE, READ, WRITE, PKRU, QUIT };

struct reader {
    pthread_t thread;
    int spin;          /* spin in user code, or block in read(2) between requests */
    int pipe[2];       /* requests for blocking readers */
    _Atomic int request;
    _Atomic int done;
    uint64_t value;
};

static volatile uint64_t *page;
static struct reader readers[READERS];
static int hardware;

static uint32_t rdpkru(void) {
    uint32_t eax, edx;
    __asm__ volatile(".byte 0x0f, 0x01, 0xee" : "=a"(eax), "=d"(edx) : "c"(0));
    return eax;
}

static void *reader_main(void *arg) {
    struct reader *r = arg;
    for (;;) {
        int req;
        if (r->spin) {
            while ((req = atomic_load(&r->request)) == IDLE) sched_yield();
        } else {
            char c;
            CHECK(read(r->pipe[0], &c, 1) == 1);
            req = atomic_load(&r->request);
        }
        switch (req) {
        case READ: r->value = page[0]; break;
        case WRITE: page[1] = r->value; break;
        case PKRU: r->value = hardware ? rdpkru() : 0; break;
        case QUIT: return NULL;
        }
        atomic_store(&r->request, IDLE);
        atomic_store(&r->done, 1);
    }
}

static uint64_t ask(struct reader *r, int req, uint64_t value) {
    r->value = value;
    atomic_store(&r->done, 0);
    atomic_store(&r->request, req);
    if (!r->spin) CHECK(write(r->pipe[1], "x", 1) == 1);
    while (!atomic_load(&r->done)) sched_yield();
    return r->value;
}

/* The two PKRU bits of `key` (0 read-write, 2 read-only, 1 or 3 no access). */
static unsigned field(uint32_t pkru, int key) { return (pkru >> (2 * key)) & 3; }

static void write_word(void *p) { *(volatile uint64_t *)p = 1; }

static void *late_reader(void *arg) {
    (void)arg;
    return (void *)(uintptr_t)page[0];
}

int main(void) {
    CHECK(mpk_init(-1) == 0);
    hardware = strcmp(mpkvirt_backend(), "hardware") == 0;
    page = mpk_mmap(VKEY, NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(page != MAP_FAILED);
    CHECK(mpk_begin(VKEY, PROT_READ | PROT_WRITE) == 0);
    page[0] = 42;
    CHECK(mpk_end(VKEY) == 0);

    /* Readers start with no rights (created outside any mpk_begin). */
    for (int i = 0; i < READERS; i++) {
        readers[i].spin = i % 2;
        CHECK(pipe(readers[i].pipe) == 0);
        CHECK(pthread_create(&readers[i].thread, NULL, reader_main, &readers[i]) == 0);
    }
    int key = -1;
    CHECK(mpk_mprotect(VKEY, PROT_READ) == 0);
    /* (On hardware a reader's first access takes the grant: a fault the library resolves.) */
    CHECK(ask(&readers[0], READ, 0) == 42);
    if (hardware) {
        /* The domain's key: the one field the reader now has read-only. */
        uint32_t p = (uint32_t)ask(&readers[0], PKRU, 0);
        for (int k = 1; k < 16; k++)
            if (field(p, k) == 2) key = k;
        CHECK(key > 0);
    }
    for (int i = 0; i < READERS; i++) {
        CHECK(ask(&readers[i], READ, 0) == 42);
        if (hardware) CHECK(field((uint32_t)ask(&readers[i], PKRU, 0), key) == 2);
    }
    pthread_t late;
    void *got;
    CHECK(pthread_create(&late, NULL, late_reader, NULL) == 0);
    CHECK(pthread_join(late, &got) == 0 && (uintptr_t)got == 42);
    CHECK(page[0] == 42); /* the caller too, without mpk_begin */

    /* Read-only: a write faults in every thread that has not begun the vkey. */
    struct mpkvirt_fault f;
    CHECK(mpkvirt_guarded_call(write_word, (void *)&page[1], &f) == -1 && errno == EFAULT);
    CHECK(f.vkey == VKEY);

    /* Read-write for everyone: the readers write. */
    CHECK(mpk_mprotect(VKEY, PROT_READ | PROT_WRITE) == 0);
    for (int i = 0; i < READERS; i++) {
        ask(&readers[i], WRITE, 100 + i);
        CHECK(page[1] == (uint64_t)(100 + i));
    }

    /* Taken back from everyone. */
    CHECK(mpk_mprotect(VKEY, PROT_NONE) == 0);
    if (hardware)
        for (int i = 0; i < READERS; i++)
            CHECK((field((uint32_t)ask(&readers[i], PKRU, 0), key) & 1) == 1);
    CHECK(mpkvirt_guarded_call(write_word, (void *)&page[1], &f) == -1 && errno == EFAULT);

    /* mpk_begin keeps its thread-local meaning (bounded by the page protection, which
     * mpk_mprotect set too). */
    CHECK(mpk_mprotect(VKEY, PROT_READ) == 0);
    CHECK(mpk_mprotect(VKEY, PROT_READ | PROT_WRITE) == 0);
    CHECK(mpk_begin(VKEY, PROT_READ | PROT_WRITE) == 0);
    page[1] = 7;
    CHECK(mpk_end(VKEY) == 0);
    for (int i = 0; i < READERS; i++) {
        atomic_store(&readers[i].request, QUIT);
        if (!readers[i].spin) CHECK(write(readers[i].pipe[1], "x", 1) == 1);
        CHECK(pthread_join(readers[i].thread, NULL) == 0);
    }
    printf("test_mprotect_mode: %d readers that never called mpkvirt got and lost rights (%s backend): ok\n",
           READERS, mpkvirt_backend());
    return 0;
}

/* mpk_pthread_create inside a begun domain: the new thread starts without the creator's
 * rights.
 *
 * The main thread has domain D begun and creates two threads:
 *   - with mpk_pthread_create: the thread's very first access to D (a plain read, before any
 *     library call) faults, and so does a guarded read (EFAULT, naming D);
 *   - with plain pthread_create: the kernel copied the creator's PKRU, so the thread reads D
 *     without ever having begun it — the reason mpk_pthread_create exists.
 * Either way the creator keeps D begun, and the new threads can begin domains of their own.
 *
 * Rights are per thread only with the hardware backend. With the emulated backend (no PKU)
 * rights are process-wide: while the main thread has D begun every thread reaches it, so
 * there the test checks only that both kinds of thread run, can use the library, and that
 * the creator keeps its rights; it cannot show what a thread may not read, and says so. */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include "check.h"
#include "mpkvirt.h"

#ifdef MPKVIRT_TEST_OLD_LIBRARY /* evidence runs against 2a8b768, which has no wrapper */
#define mpk_pthread_create pthread_create
#endif

#define D 1
#define OWN 2

static uint64_t *d_mem, *own_mem;
static int hardware;

/* A plain read that may fault: the test's own SIGSEGV handler jumps back for this thread. */
static __thread sigjmp_buf probe_env;
static __thread volatile int probing;
static struct sigaction library_action;

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    if (probing) {
        probing = 0;
        siglongjmp(probe_env, 1);
    }
    /* Not a probe: the library's handler (guarded calls) or the default action. */
    if (library_action.sa_flags & SA_SIGINFO) {
        library_action.sa_sigaction(sig, info, ctx);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

/* 1 if *p could be read (value in *out), 0 if the read faulted. */
static int probe_read(const uint64_t *p, uint64_t *out) {
    if (sigsetjmp(probe_env, 1)) return 0;
    probing = 1;
    *out = *(volatile const uint64_t *)p;
    probing = 0;
    return 1;
}

static void read_word(void *p) { (void)*(volatile uint64_t *)p; }

struct seen {
    int plain_read;      /* the first, plain read succeeded */
    uint64_t value;
    int guarded_rc, guarded_err, fault_vkey;
    int own_ok;          /* the thread could begin a domain of its own */
};

static void *child(void *arg) {
    struct seen *s = arg;
    s->plain_read = probe_read(d_mem, &s->value); /* before any library call */
    struct mpkvirt_fault f = {0, 0, 0, 0, 0};
    errno = 0;
    s->guarded_rc = mpkvirt_guarded_call(read_word, d_mem, &f);
    s->guarded_err = errno;
    s->fault_vkey = f.vkey;
    s->own_ok = mpk_begin(OWN, PROT_READ | PROT_WRITE) == 0;
    if (s->own_ok) {
        own_mem[0] += 1;
        s->own_ok = mpk_end(OWN) == 0;
    }
    return NULL;
}

int main(void) {
    CHECK(mpk_init(-1) == 0);
    hardware = strcmp(mpkvirt_backend(), "hardware") == 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    CHECK(sigaction(SIGSEGV, &sa, &library_action) == 0);

    CHECK((d_mem = mpk_malloc(D, sizeof(uint64_t))) != NULL);
    CHECK((own_mem = mpk_malloc(OWN, sizeof(uint64_t))) != NULL);
    CHECK(mpk_begin(D, PROT_READ | PROT_WRITE) == 0);
    d_mem[0] = 4242;

    pthread_t t;
#ifndef MPKVIRT_TEST_OLD_LIBRARY
    CHECK(mpk_pthread_create(&t, NULL, NULL, NULL) == EINVAL);
#endif
    struct seen wrapped = {0}, plain = {0};
    CHECK(mpk_pthread_create(&t, NULL, child, &wrapped) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    d_mem[0] += 1; /* the creator still has D begun */
    CHECK(pthread_create(&t, NULL, child, &plain) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    d_mem[0] += 1;
    CHECK(d_mem[0] == 4244);
    CHECK(mpk_end(D) == 0);

    CHECK(wrapped.own_ok && plain.own_ok);
    CHECK(mpk_begin(OWN, PROT_READ) == 0 && own_mem[0] == 2 && mpk_end(OWN) == 0);
    if (!hardware) {
        /* Process-wide rights: every thread reaches D while the main thread has it begun. */
        CHECK(plain.plain_read && plain.value == 4243);
        printf("test_pthread_create: %s backend: rights are process-wide, so it cannot be shown "
               "that the new thread lacks the creator's rights; both threads ran: ok\n",
               mpkvirt_backend());
        return 0;
    }
    if (wrapped.plain_read)
        fprintf(stderr, "test_pthread_create: a thread made by mpk_pthread_create read %lu from the "
                        "creator's domain\n", (unsigned long)wrapped.value);
    CHECK(!wrapped.plain_read);
    errno = wrapped.guarded_err;
    CHECK(wrapped.guarded_rc == -1 && wrapped.guarded_err == EFAULT && wrapped.fault_vkey == D);
    /* Why the wrapper exists: a plain pthread_create copies the creator's rights. */
    CHECK(plain.plain_read && plain.value == 4243);
    printf("test_pthread_create: mpk_pthread_create starts without the creator's rights, "
           "pthread_create does not (hardware backend): ok\n");
    return 0;
}

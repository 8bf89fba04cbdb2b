/*
 * mpkvirt.h — libmpk's API on mpkvirt: unlimited virtual protection domains on Intel/AMD
 * memory protection keys, for C and C++ programs.
 *
 * Link with -lmpkvirt (libmpkvirt.so or libmpkvirt.a; the static library also needs
 * -lpthread -ldl -lm). Built by `cargo build --release -p mpkvirt` into target/release/.
 *
 * The mpk_* functions follow the interface of the libmpk paper (Park et al., "libmpk:
 * Software Abstraction for Intel Memory Protection Keys", USENIX ATC 2019). A program
 * chooses integer virtual keys (vkeys); each names one domain, a range of pages only
 * threads that have begun it can reach. Differences from libmpk:
 *
 *   - No kernel module and no patched kernel: a stock Linux >= 4.9 kernel with PKU, or,
 *     without PKU, an mprotect emulation (see mpkvirt_backend()). MPKVIRT_MODE=hardware
 *     makes mpk_init fail instead of falling back.
 *   - Thread-safe: any number of threads may begin, end, allocate and free concurrently.
 *     A key is handed to another domain only when no thread's view uses it. When every
 *     begun domain holds a key, mpk_begin/mpk_end make no system call with the hardware
 *     backend (a call gate into the library, WRPKRU, the vkey table's lock); with the
 *     emulated backend each change of rights costs an mprotect.
 *   - Unlimited virtual keys: any int is a vkey, any number of them may exist. Up to
 *     mpkvirt_key_count() (at most 15) are resident at a time, and a thread may have at most
 *     that many begun.
 *   - evict_rate: libmpk evicts on only every (evict_rate + 1)th miss and otherwise fails
 *     mpk_begin. mpkvirt always evicts on a miss — every value behaves like libmpk's
 *     recommended mpk_init(-1) — and chooses the victim by LRU, or by the hinted policy
 *     when MPKVIRT_POLICY=hinted.
 *   - mpk_begin adds a domain to the calling thread's set; a thread's rights are exactly
 *     its begun domains. With the emulated backend (no PKU) rights are process-wide: a
 *     domain is reachable by every thread while any thread has it begun. A thread created
 *     while its creator has domains begun inherits the creator's rights (the kernel copies
 *     PKRU) without having begun them: create threads with nothing begun, or with
 *     mpk_pthread_create.
 *   - mpk_mprotect is libmpk's mprotect replacement: every thread of the process gets the
 *     rights without mpk_begin (see mpk_mprotect). A thread's rights are its begun domains
 *     and the process-wide ones together.
 *   - A domain has one page protection, set by its first mpk_mmap (read-write for domains
 *     created by mpk_malloc); mpk_mprotect may widen it (never narrows it: rights do that).
 *
 * Errors: functions return -1 (pointer functions NULL or MAP_FAILED) and set errno; a
 * failed call changes nothing. Before mpk_init every function fails with EINVAL, except
 * mpk_free(NULL) (does nothing), mpkvirt_backend() (NULL) and mpkvirt_key_count() (-1).
 * A memory access that a thread's rights forbid raises SIGSEGV; run it through
 * mpkvirt_guarded_call() to get a report instead.
 *
 * Sizes: a domain is one address range reserved when it is created. A domain created by
 * mpk_malloc holds 64 MiB in all (its allocations together, each rounded up); one created by
 * mpk_mmap(len) holds len + 64 MiB (rounded to pages), shared by its later mappings and
 * allocations. Past that, mpk_malloc and mpk_mmap fail with ENOMEM: use more vkeys. A length
 * or size that cannot be mapped at all (above PTRDIFF_MAX, or one that would wrap when
 * rounded up to pages, such as SIZE_MAX) fails with ENOMEM and creates no domain.
 *
 * Threads and cancellation: every function may be called from any thread. Each disables
 * the calling thread's cancellation while it runs (pthread_setcancelstate), so
 * pthread_cancel of a thread blocked in mpk_begin takes effect at the thread's next
 * cancellation point after the call returned, never inside the library. A thread's begun
 * domains end when it exits.
 *
 * Thread exit: pthread_key destructors (and anything else glibc runs after a thread's
 * thread_local destructors) are too late to call the library: such a call fails with
 * EOPNOTSUPP and changes nothing. End domains before the thread function returns. (In a
 * thread that never called the library before, such a call is not detected: it may succeed,
 * and a domain it begins then stays begun, and its key pinned, after the thread is gone.)
 *
 * Signal handlers: a handler that interrupted code outside any mpk_* call may use the
 * library: it may begin, end, allocate and free, and should end what it began before it
 * returns. With the hardware backend it cannot end a domain the interrupted code has begun
 * (EDEADLK): that code resumes with the rights the kernel saved. The same holds for a
 * handler that interrupts another handler (or itself, installed with SA_NODEFER): it cannot
 * end what the handlers it interrupted have begun — mpk_begin(x) of a domain they have
 * begun succeeds, and its mpk_end(x) fails with EDEADLK. What a handler leaves begun is
 * ended by the next mpk_* call of the code it interrupted. With the emulated backend
 * the library cannot tell a handler from other code, so such an mpk_end ends the domain and
 * the interrupted code faults on its next access to it. A handler that interrupted an mpk_*
 * call (of the same thread) cannot use the library: every call fails with EDEADLK (NULL,
 * MAP_FAILED; mpkvirt_key_count() returns -1, mpk_pthread_create returns EDEADLK) and
 * changes nothing — only mpk_free(NULL) and mpkvirt_backend() answer as usual — and the
 * interrupted call then completes normally. A thread's first mpk_* call registers the
 * thread with its signals blocked (but SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGTRAP): signals
 * that arrive during the registration are delivered once it is done. With the hardware
 * backend, while a thread is inside an mpk_* call it runs on the library's own stack, which
 * signal handlers cannot use: a handler that may run while its thread is inside a call
 * (whether or not it calls the library) must be installed with SA_ONSTACK and the thread
 * must have an alternate signal stack (sigaltstack); otherwise such a signal kills the
 * process with SIGSEGV.
 *
 * fork(): the child has one thread, a copy of the caller, with the caller's begun domains.
 * It may use the library as usual (mpk_init says EBUSY), with one loss: domains begun by the
 * parent's other threads, which do not exist in the child, stay begun for good (mpk_munmap
 * fails with EBUSY) and their keys stay pinned, so the child has that many keys fewer for
 * its own views (an mpk_begin that needs one of them waits and fails with EBUSY). Do not fork
 * while another thread is inside an mpk_* call: the child may find the library's locks held.
 */
#ifndef MPKVIRT_H
#define MPKVIRT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Initialises the library: picks the backend (MPKVIRT_MODE=auto|hardware|emulated,
 * default auto), the number of keys (MPKVIRT_MAX_KEYS=1..15, default 15), the eviction
 * policy (MPKVIRT_POLICY=lru|hinted) and how long mpk_begin waits for a key when every key
 * is in use by other threads' views (MPKVIRT_PIN_WAIT_MS, milliseconds, default 1000; 0
 * fails at once), and allocates the keys. Call once, before any other function.
 * evict_rate is accepted for compatibility; see above.
 *
 * May be called concurrently: exactly one call initialises (and takes the keys); the
 * others fail with EBUSY.
 *
 * Returns 0, or -1 with errno: EBUSY (already initialised, or being initialised by another
 * thread), EOPNOTSUPP (MPKVIRT_MODE=hardware without usable PKU, including when every key
 * is already taken by other code, or the SIGSEGV handler cannot be installed), EINVAL (an
 * MPKVIRT_* variable does not parse).
 */
int mpk_init(int evict_rate);

/*
 * Maps len bytes (rounded up to pages) into the domain of vkey, creating the domain if
 * needed, and returns the address. Anonymous memory (fd == -1 or MAP_ANONYMOUS) is zeroed
 * (pages freed earlier with mpk_free are zeroed when freed); otherwise len bytes of fd from
 * offset are mapped privately (copy-on-write). Free the mapping with mpk_free or all of
 * the domain's memory with mpk_munmap. addr is a
 * hint and is ignored. prot is the domain's page protection (PROT_READ, PROT_WRITE,
 * PROT_EXEC); the memory is reachable only by threads that have begun vkey.
 *
 * The first mpk_mmap of a vkey reserves len + 64 MiB for the domain (see Sizes above).
 *
 * Returns the address, or MAP_FAILED with errno: EINVAL (len 0, MAP_FIXED or MAP_SHARED
 * given, negative offset, unknown prot bits, or prot differing from the domain's),
 * ENOMEM (the domain's address space is full, or len cannot be mapped), or mmap's errors
 * for fd (EBADF, EACCES).
 */
void *mpk_mmap(int vkey, void *addr, size_t len, int prot, int flags, int fd, off_t offset);

/*
 * Destroys the domain of vkey: all its memory (mappings and mpk_malloc allocations) is
 * released and its hardware key freed. The vkey may be reused for a new domain.
 *
 * Returns 0, or -1 with errno: EINVAL (no such domain), EBUSY (a thread has it begun, or
 * another thread is using its handle in a concurrent call on it).
 */
int mpk_munmap(int vkey);

/*
 * Gives the calling thread access to the domain of vkey: read-only for PROT_READ,
 * read-write for PROT_WRITE or PROT_READ|PROT_WRITE. Beginning an already begun vkey
 * changes its rights. The thread keeps its other begun domains.
 *
 * Returns 0, or -1 with errno: EINVAL (no such domain, or prot grants neither read nor
 * write), E2BIG (more domains begun than mpkvirt_key_count()), EBUSY (every key is in use
 * by other threads' views for longer than the pin wait, MPKVIRT_PIN_WAIT_MS), EDEADLK (from
 * a signal handler that interrupted an mpk_* call; see Signal handlers above), or the errno of a failed re-tag of
 * the domain's pages (ENOMEM when the process's mapping limit is reached).
 */
int mpk_begin(int vkey, int prot);

/*
 * Ends the calling thread's access to the domain of vkey.
 *
 * Returns 0, or -1 with errno: EINVAL (the thread has not begun vkey), EDEADLK (from a
 * signal handler: see Signal handlers above).
 */
int mpk_end(int vkey);

/*
 * Gives every thread of the process prot's access to the domain of vkey, without
 * mpk_begin (libmpk's process-wide mpk_mprotect): PROT_READ read-only, PROT_WRITE
 * read-write, PROT_NONE takes the process-wide access back. Threads that never called the
 * library, threads blocked in system calls and threads created later included; mpk_begin
 * and mpk_end keep their thread-local meaning (a thread's rights are its begun domains and
 * the process-wide ones together). The domain's page protection is widened if prot needs
 * more (and takes prot's PROT_EXEC, which keys cannot express); it is never narrowed.
 *
 * With the hardware backend the domain keeps its key while it has process-wide rights. A
 * grant reaches each thread at its next access to the domain (a fault the library handles
 * and retries) or its next library call; a revocation has reached every thread that may
 * hold the rights when mpk_mprotect returns (each is sent SIGRTMIN + 7, or the real-time
 * signal in MPKVIRT_SYNC_SIGNAL, and rewrites its own PKRU; mpkvirt installs its handler
 * when it starts, unless the signal has a handler already). Do not block or handle that
 * signal yourself. With the emulated backend this is one mprotect.
 *
 * Returns 0, or -1 with errno: EINVAL (no such domain, unknown prot bits), EBUSY (every key
 * is held by begun views: no key for the domain), ETIMEDOUT (some threads did not take a
 * revocation within 2 s — they block the signal; every other thread has, and the domain's
 * key is never given to another domain), or pkey_mprotect's errors.
 */
int mpk_mprotect(int vkey, int prot);

/*
 * Allocates size bytes (16-byte aligned) in the domain of vkey, creating a read-write
 * domain if needed. The allocator keeps its metadata outside the domain.
 *
 * Returns the pointer, or NULL with errno: ENOMEM (the domain's address space is full: a
 * domain created by mpk_malloc holds 64 MiB in all; see Sizes above).
 */
void *mpk_malloc(int vkey, size_t size);

/*
 * Frees memory from mpk_malloc (or a mapping from mpk_mmap). Allocations of a page or more
 * are given back to the system and read as zero when reused. mpk_free(NULL) does nothing.
 *
 * Returns 0, or -1 with errno: EINVAL (not a live allocation: double free, or a pointer
 * that mpk_malloc did not return).
 */
int mpk_free(void *ptr);

/* ---- mpkvirt extensions --------------------------------------------------------------- */

/*
 * Confines the calling thread, for the rest of its life, to the domains of the n vkeys at
 * vkeys; it creates no new vkey (mpk_mmap or mpk_malloc of an unused vkey fail with EPERM:
 * vkeys are the program's namespace, and the thread would own the domain the program later
 * fills under that number). A vkey is
 * a name anyone can use — and code that forges calls into the library can name any domain —
 * so a thread that runs code it does not trust confines itself first: from then on
 * mpk_begin, mpk_malloc, mpk_mmap, mpk_free and mpk_munmap of another domain fail with
 * EPERM, and so does mpk_mprotect (it acts on every thread) and mpk_init. A second call
 * narrows the set (keeps only domains in both). Threads the confined thread creates, by any
 * means, are confined to its set. Process-wide rights (mpk_mprotect by an unconfined
 * thread) still reach a confined thread: they are the program's decision for every thread.
 *
 * Returns 0, or -1 with errno: EBUSY (the thread has vkeys begun: confine first), EINVAL
 * (no such domain, n over 65,536), EFAULT (vkeys unreadable to the thread), EDEADLK (from a
 * signal handler: see Signal handlers above).
 */
int mpk_confine(const int *vkeys, size_t n);

/* Where a fault happened. */
struct mpkvirt_fault {
    int vkey;       /* virtual key of the domain the address belongs to, -1 if none */
    int access;     /* MPKVIRT_ACCESS_* */
    int si_code;    /* SEGV_PKUERR (4) for a denied key, SEGV_ACCERR (2) for a page protection */
    int hw_key;     /* hardware protection key (si_pkey), -1 if none */
    uintptr_t addr; /* faulting address */
};

#define MPKVIRT_ACCESS_UNKNOWN 0
#define MPKVIRT_ACCESS_READ 1
#define MPKVIRT_ACCESS_WRITE 2
#define MPKVIRT_ACCESS_EXEC 3

/*
 * Calls fn(arg) on a separate stack. If it touches domain memory its thread may not
 * access, or overflows that stack, it is abandoned at that point — its frames never
 * resume, so it must not hold locks or resources the program needs later — the thread's
 * begun domains are put back to what they were before the call (whatever fn began or
 * ended is undone), and the fault is described in *fault (if fault is not NULL; vkey is -1
 * for a stack overflow). Other faults are not caught. A signal handler that faults inside
 * fn is abandoned with it, and the thread resumes with the signal mask it had when the call
 * started.
 *
 * fn must return or fault: it must not throw C++ exceptions, call pthread_exit, be
 * cancelled (the call runs with cancellation disabled, so pthread_testcancel does nothing
 * inside it), or longjmp/siglongjmp out of the call — each of these leaves the call's stack
 * and state behind (pthread_exit and cancellation abort the process: their forced unwind
 * cannot cross the call). The same holds for every mpk_* call: a signal handler must not
 * siglongjmp out of one (the thread keeps its keys pinned and gets EDEADLK from then on).
 *
 * Returns 0 when fn returned, or -1 with errno: EFAULT (fn faulted; see *fault), EINVAL
 * (fn is NULL), ENOMEM (no stack could be mapped for the call; fn did not run).
 */
int mpkvirt_guarded_call(void (*fn)(void *), void *arg, struct mpkvirt_fault *fault);

/*
 * pthread_create whose new thread starts with no begun domain, whatever the caller has
 * begun. A plain pthread_create copies the caller's PKRU: a thread created while domains
 * are begun would keep their rights without having begun them, and keep them after the keys
 * go to other domains. Use this (or create threads with nothing begun).
 *
 * With the emulated backend rights are process-wide anyway (see above), so the new thread
 * reaches whatever any thread has begun.
 *
 * Returns as pthread_create (an error number, not -1/errno): EINVAL when start is NULL;
 * EDEADLK when called from a signal handler that interrupted an mpk_* call.
 */
#include <pthread.h>
int mpk_pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start)(void *), void *arg);

/* "hardware", "emulated", or NULL before mpk_init. */
const char *mpkvirt_backend(void);

/* Number of keys domains are multiplexed onto (at most 15), or -1 before mpk_init. */
int mpkvirt_key_count(void);

#ifdef __cplusplus
}
#endif

#endif /* MPKVIRT_H */

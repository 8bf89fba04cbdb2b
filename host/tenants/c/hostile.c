/* hostile: a tenant that misbehaves on request, for the runtime's containment tests.
 *
 * The request's first byte picks the misbehaviour; an 8-byte little-endian argument may
 * follow. Each one must end only this invocation (or be refused), never the host.
 *
 *   e  echo the rest of the request (the control: a well-behaved call)
 *   n  read through a null pointer                      -> SIGSEGV
 *   a  abort()                                          -> SIGABRT
 *   d  divide by zero                                   -> SIGFPE
 *   i  an illegal instruction (ud2)                     -> SIGILL
 *   s  unbounded recursion                              -> SIGSEGV (stack overflow)
 *   l  loop forever                                     -> the deadline
 *   L  log "looping", then loop forever                 -> the deadline
 *   m  allocate 4 KiB blocks until refused; answer how many (the quota)
 *   M  malloc 4 KiB blocks until it returns NULL; answer how many (the quota, through
 *      the C allocator the loader bound to the instance's heap)
 *   P  malloc 16 bytes, write 'S' there, answer the address (in the instance)
 *   r  read the byte at the argument's address          -> SIGSEGV unless it is its own
 *   w  write the byte at the argument's address         -> SIGSEGV unless it is its own
 *   p  allocate 16 bytes, write 'S' there, answer the address (a target for r and w)
 *   h  log from a wild pointer                          -> a refused host call
 *   f  free a pointer the host never gave               -> a refused host call
 *   v  invoke "echo-c" with "nested" and answer its response (a nested invocation)
 *   V  invoke "echo-c", then loop forever                  -> the deadline
 *   I  invoke the function named by the rest of the request (empty request) and answer
 *      its response
 *   g  call the argument (mpkvirt's call gate) as gate(op, block) with a forged op that
 *      would enter another view, and answer the status it returned (refused: bit 63 set)
 *   D  write its own static data (shared by every instance)  -> SIGSEGV (read-only)
 *   S  smash its stack's canary (the compiler's check calls __stack_chk_fail) -> SIGABRT
 *   F  copy 64 bytes into an 8-byte buffer (fortification's __memcpy_chk)    -> SIGABRT
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "mpkvirt_fn.h"

const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;

/* Data of the object: one copy for every instance of the application. */
static volatile uint8_t shared_data[64];

/* Writes past its array, over the canary (with the stack protector on). */
__attribute__((noinline, stack_protect)) static int smash(volatile size_t n) {
    char buf[16];
    memset(buf, 'x', n);
    return *(volatile char *)buf;
}

static uint64_t arg_of(const uint8_t *request, size_t len) {
    uint64_t v = 0;
    if (len >= 9) memcpy(&v, request + 1, 8);
    return v;
}

static int answer(const struct mpkvirt_host_api *host, struct mpkvirt_response *response,
                  const void *data, size_t len) {
    uint8_t *out = host->alloc(len ? len : 1);
    if (out == NULL) return 2;
    memcpy(out, data, len);
    response->data = out;
    response->len = len;
    return 0;
}

/* Recurses until `limit` (never reached: the request passes the largest value). */
static int recurse(uint64_t depth, uint64_t limit) {
    volatile char pad[1024];
    pad[0] = (char)depth;
    if (depth == limit) return pad[0];
    return recurse(depth + 1, limit) + pad[0];
}

int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response) {
    if (request_len == 0) return 1;
    uint64_t arg = arg_of(request, request_len);
    switch (request[0]) {
    case 'e':
        return answer(host, response, request + 1, request_len - 1);
    case 'n': {
        volatile uint8_t *p = NULL;
        return *p;
    }
    case 'a':
        abort();
    case 'd': {
        volatile int zero = 0;
        volatile int x = 7 / zero;
        return x;
    }
    case 'i':
        __builtin_trap();
    case 's':
        return recurse(0, UINT64_MAX);
    case 'L':
        host->log("looping", 7);
        /* fall through */
    case 'l':
        for (volatile uint64_t i = 0;; i++) {
        }
    case 'm': {
        uint64_t *n = host->alloc(sizeof *n);
        if (n == NULL) return 2;
        *n = 0;
        while (host->alloc(4096) != NULL) ++*n;
        response->data = (uint8_t *)n;
        response->len = sizeof *n;
        return 0;
    }
    case 'M': {
        uint64_t n = 0;
        while (malloc(4096) != NULL) ++n;
        return answer(host, response, &n, sizeof n);
    }
    case 'P': {
        char *p = malloc(16);
        if (p == NULL) return 2;
        p[0] = 'S';
        uint64_t at = (uint64_t)(uintptr_t)p;
        return answer(host, response, &at, sizeof at);
    }
    case 'r': {
        uint8_t b = *(volatile uint8_t *)(uintptr_t)arg;
        return answer(host, response, &b, 1);
    }
    case 'w':
        *(volatile uint8_t *)(uintptr_t)arg = 'X';
        return answer(host, response, "w", 1);
    case 'p': {
        uint8_t *p = host->alloc(16);
        if (p == NULL) return 2;
        p[0] = 'S';
        uint64_t at = (uint64_t)(uintptr_t)p;
        return answer(host, response, &at, sizeof at);
    }
    case 'h':
        host->log((const char *)(uintptr_t)0x1000, 64);
        return 0;
    case 'f':
        host->free((void *)(uintptr_t)0x1000);
        return 0;
    case 'v':
    case 'V': {
        uint8_t *resp = NULL;
        size_t resp_len = 0;
        if (host->invoke("echo-c", 6, (const uint8_t *)"nested", 6, &resp, &resp_len) != 0)
            return 3;
        if (request[0] == 'V')
            for (volatile uint64_t i = 0;; i++) {
            }
        response->data = resp;
        response->len = resp_len;
        return 0;
    }
    case 'I': {
        uint8_t *resp = NULL;
        size_t resp_len = 0;
        if (host->invoke((const char *)request + 1, request_len - 1, request, 0, &resp,
                         &resp_len) != 0)
            return 3;
        response->data = resp;
        response->len = resp_len;
        return 0;
    }
    case 'g': {
        /* A manager op (tag 1 << 16, code 30: enter a view) with a block of zeros. */
        uint64_t block[16] = {0};
        uint64_t (*gate)(uint64_t, void *) = (uint64_t (*)(uint64_t, void *))(uintptr_t)arg;
        uint64_t status = gate((1u << 16) | 30, block);
        return answer(host, response, &status, sizeof status);
    }
    case 'D':
        shared_data[0] = 'X';
        return answer(host, response, (const void *)shared_data, 1);
    case 'S':
        return smash(64);
    case 'F': {
        char small[8];
        volatile size_t n = 64;
        memcpy(small, request, n);
        return small[0];
    }
    default:
        return 1;
    }
}

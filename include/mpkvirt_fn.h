/*
 * mpkvirt_fn.h: the ABI between mpkvirt-host and a tenant function compiled as a shared object.
 *
 * A tenant defines two symbols, with default visibility:
 *
 *     const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;
 *     int mpkvirt_fn_entry(const struct mpkvirt_host_api *host,
 *                          const uint8_t *request, size_t request_len,
 *                          struct mpkvirt_response *response);
 *
 * The host checks both when it loads the object (a missing symbol or another version is an
 * error at load, never a crash at run time) and calls the entry once per invocation, with the
 * request body. The entry writes its answer into memory it got from host->alloc and stores it
 * in *response; it returns 0, or a non-zero code the host reports as the function's failure.
 *
 * What the object must not contain (the host refuses to load it): writable and executable
 * segments, an executable stack, text relocations, code that runs when it is loaded or
 * unloaded (constructors, destructors, the C runtime's start files, IFUNC resolvers: build
 * with -nostartfiles), and at any byte offset of its code an instruction that changes PKRU or
 * the thread pointer (WRPKRU, XRSTOR, WRFSBASE, WRGSBASE).
 * It may call the C library's functions that neither allocate nor lock (strings, memory,
 * math; not qsort, the printf/scanf families or strtod: a tenant may be preempted or ended
 * anywhere) and the host calls below; any other imported symbol is refused at load. It may
 * also call malloc, calloc, realloc and free: the host binds them to an allocator in the
 * tenant's own instance (never the C library's), whose memory counts against the same quota
 * as host->alloc and is given back when the invocation ends.
 */
#ifndef MPKVIRT_FN_H
#define MPKVIRT_FN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version this header describes. */
#define MPKVIRT_FN_ABI_VERSION 1u

/* The host calls a tenant may make. Every pointer it passes must point into memory of its
 * own instance (its heap, its stack, its request); anything else ends the invocation. */
struct mpkvirt_host_api {
    /* MPKVIRT_FN_ABI_VERSION of the host. */
    uint32_t version;
    /* Memory in the instance's own domain, within its quota; NULL when the quota is spent. */
    void *(*alloc)(size_t len);
    void (*free)(void *p);
    /* A line for the host's log, tagged with the application's name. */
    void (*log)(const char *msg, size_t len);
    /* Nanoseconds of a monotonic clock. */
    uint64_t (*time_ns)(void);
    /* Fills buf with random bytes; 0 on success. */
    int (*random)(void *buf, size_t len);
    /* Invokes another function by name; its response is copied into memory from alloc.
     * 0 on success. */
    int (*invoke)(const char *name, size_t name_len, const uint8_t *request, size_t request_len,
                  uint8_t **response, size_t *response_len);
};

/* Where the entry leaves its answer: memory from host->alloc (or NULL with len 0). */
struct mpkvirt_response {
    uint8_t *data;
    size_t len;
};

/* The two symbols a tenant object defines (see above). */
extern const uint32_t mpkvirt_fn_abi_version;
int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response);

#ifdef __cplusplus
}
#endif

#endif /* MPKVIRT_FN_H */

/* spin: works (spins) for the number of rounds in the request (8 bytes, little-endian) and
 * answers it. The bimodal benchmark's function (calibrated in rounds per nanosecond). */
#include <string.h>
#include "mpkvirt_fn.h"

const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;

int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response) {
    uint64_t rounds = 0;
    if (request_len != sizeof rounds) return 1;
    memcpy(&rounds, request, sizeof rounds);
    uint64_t *out = host->alloc(sizeof *out);
    if (out == NULL) return 2;
    for (uint64_t i = 0; i < rounds; i++) __asm__ volatile("" ::: "memory");
    *out = rounds;
    response->data = (uint8_t *)out;
    response->len = sizeof *out;
    return 0;
}

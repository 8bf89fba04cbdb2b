/* matmul: the request is n (a little-endian u32, 1..64) and two n x n matrices of
 * little-endian f64 in row order; the response is their product, in the same format
 * without n. A request of the wrong size is refused (2). */
#include <string.h>
#include "mpkvirt_fn.h"

const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;

int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response) {
    if (request_len < 4) return 2;
    uint32_t n;
    memcpy(&n, request, 4);
    if (n == 0 || n > 64 || request_len != 4 + 2 * (size_t)n * n * 8) return 2;
    size_t cells = (size_t)n * n;
    double *a = host->alloc(cells * 8), *b = host->alloc(cells * 8), *c = host->alloc(cells * 8);
    if (a == NULL || b == NULL || c == NULL) return 1;
    memcpy(a, request + 4, cells * 8);
    memcpy(b, request + 4 + cells * 8, cells * 8);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < n; j++) {
            double sum = 0;
            for (uint32_t k = 0; k < n; k++) sum += a[i * n + k] * b[k * n + j];
            c[i * n + j] = sum;
        }
    host->free(a);
    host->free(b);
    response->data = (uint8_t *)c;
    response->len = cells * 8;
    return 0;
}

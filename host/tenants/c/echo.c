/* echo: the response is the request. */
#include <string.h>
#include "mpkvirt_fn.h"

const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;

int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response) {
    uint8_t *out = host->alloc(request_len ? request_len : 1);
    if (out == NULL) return 1;
    memcpy(out, request, request_len);
    response->data = out;
    response->len = request_len;
    return 0;
}

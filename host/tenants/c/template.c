/* template: renders an HTML page from `name=value` lines (the request); `{{name}}` in the
 * template is replaced by the value, HTML-escaped. A missing value renders empty; a line
 * without `=` is refused (2). */
#include <string.h>
#include "mpkvirt_fn.h"

const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;

static const char PAGE[] =
    "<!doctype html>\n<html><head><title>{{title}}</title></head>\n"
    "<body><h1>{{title}}</h1><p>Hello, {{name}}!</p></body></html>\n";

/* The value of `key` (len) in the request, or NULL. */
static const uint8_t *lookup(const uint8_t *req, size_t len, const char *key, size_t klen,
                             size_t *vlen) {
    size_t i = 0;
    while (i < len) {
        size_t end = i;
        while (end < len && req[end] != '\n') end++;
        const uint8_t *eq = memchr(req + i, '=', end - i);
        if (eq != NULL && (size_t)(eq - (req + i)) == klen && memcmp(req + i, key, klen) == 0) {
            *vlen = (size_t)(req + end - (eq + 1));
            return eq + 1;
        }
        i = end + 1;
    }
    return NULL;
}

/* Appends `s` (n bytes) escaped to out (when out is non-NULL); returns the bytes it takes. */
static size_t escape(uint8_t *out, const uint8_t *s, size_t n) {
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        const char *rep = NULL;
        switch (s[i]) {
        case '<': rep = "&lt;"; break;
        case '>': rep = "&gt;"; break;
        case '&': rep = "&amp;"; break;
        case '"': rep = "&quot;"; break;
        case '\'': rep = "&#39;"; break;
        }
        if (rep != NULL) {
            size_t r = strlen(rep);
            if (out) memcpy(out + w, rep, r);
            w += r;
        } else {
            if (out) out[w] = s[i];
            w++;
        }
    }
    return w;
}

/* Renders into out (NULL: only measures); returns the length. */
static size_t render(uint8_t *out, const uint8_t *req, size_t len) {
    size_t w = 0, i = 0, plen = sizeof PAGE - 1;
    while (i < plen) {
        const char *open = strstr(PAGE + i, "{{");
        if (open == NULL) {
            if (out) memcpy(out + w, PAGE + i, plen - i);
            w += plen - i;
            break;
        }
        size_t lit = (size_t)(open - (PAGE + i));
        if (out) memcpy(out + w, PAGE + i, lit);
        w += lit;
        const char *close = strstr(open, "}}");
        size_t klen = (size_t)(close - open - 2), vlen = 0;
        const uint8_t *v = lookup(req, len, open + 2, klen, &vlen);
        if (v != NULL) w += escape(out ? out + w : NULL, v, vlen);
        i = (size_t)(close + 2 - PAGE);
    }
    return w;
}

int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response) {
    for (size_t i = 0; i < request_len;) {
        size_t end = i;
        while (end < request_len && request[end] != '\n') end++;
        if (end > i && memchr(request + i, '=', end - i) == NULL) return 2;
        i = end + 1;
    }
    size_t n = render(NULL, request, request_len);
    uint8_t *out = host->alloc(n);
    if (out == NULL) return 1;
    render(out, request, request_len);
    response->data = out;
    response->len = n;
    return 0;
}

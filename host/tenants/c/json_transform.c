/* json_transform: the request is a flat JSON object whose values are strings, numbers,
 * true, false or null; the response is the same object with every string value in upper
 * case (ASCII) and a member "fields" holding the number of members. Anything else is
 * refused (2): nested values, bad syntax, trailing bytes. */
#include <string.h>
#include "mpkvirt_fn.h"

const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;

struct out {
    uint8_t *p; /* NULL: measure only */
    size_t n;
};

static void put(struct out *o, const uint8_t *s, size_t n) {
    if (o->p) memcpy(o->p + o->n, s, n);
    o->n += n;
}

static size_t skip_ws(const uint8_t *s, size_t len, size_t i) {
    while (i < len && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
    return i;
}

/* The end of the string starting at s[i] == '"' (one past its closing quote), or 0. */
static size_t string_end(const uint8_t *s, size_t len, size_t i) {
    for (i++; i < len; i++) {
        if (s[i] == '\\') {
            i++;
            continue;
        }
        if (s[i] == '"') return i + 1;
        if (s[i] < 0x20) return 0;
    }
    return 0;
}

/* The end of the scalar (number or literal) at s[i], or 0. */
static size_t scalar_end(const uint8_t *s, size_t len, size_t i) {
    static const char *lits[] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t l = strlen(lits[k]);
        if (len - i >= l && memcmp(s + i, lits[k], l) == 0) return i + l;
    }
    size_t j = i;
    if (j < len && s[j] == '-') j++;
    size_t digits = j;
    while (j < len && ((s[j] >= '0' && s[j] <= '9') || s[j] == '.' || s[j] == 'e' ||
                       s[j] == 'E' || s[j] == '+' || s[j] == '-'))
        j++;
    return j > digits ? j : 0;
}

/* Transforms; returns 0 or 2. */
static int transform(const uint8_t *s, size_t len, struct out *o) {
    size_t i = skip_ws(s, len, 0), fields = 0;
    if (i >= len || s[i] != '{') return 2;
    put(o, (const uint8_t *)"{", 1);
    i = skip_ws(s, len, i + 1);
    if (i < len && s[i] == '}') {
        i++;
    } else {
        for (;;) {
            if (i >= len || s[i] != '"') return 2;
            size_t kend = string_end(s, len, i);
            if (kend == 0) return 2;
            if (fields) put(o, (const uint8_t *)",", 1);
            put(o, s + i, kend - i);
            put(o, (const uint8_t *)":", 1);
            i = skip_ws(s, len, kend);
            if (i >= len || s[i] != ':') return 2;
            i = skip_ws(s, len, i + 1);
            if (i < len && s[i] == '"') {
                size_t vend = string_end(s, len, i);
                if (vend == 0) return 2;
                for (size_t k = i; k < vend; k++) {
                    uint8_t c = s[k];
                    /* Escapes stay as they are (their letters too). */
                    if (c == '\\') {
                        put(o, s + k, 2);
                        k++;
                        continue;
                    }
                    if (c >= 'a' && c <= 'z') c = (uint8_t)(c - 'a' + 'A');
                    put(o, &c, 1);
                }
                i = vend;
            } else {
                size_t vend = i < len ? scalar_end(s, len, i) : 0;
                if (vend == 0) return 2;
                put(o, s + i, vend - i);
                i = vend;
            }
            fields++;
            i = skip_ws(s, len, i);
            if (i < len && s[i] == ',') {
                i = skip_ws(s, len, i + 1);
                continue;
            }
            if (i < len && s[i] == '}') {
                i++;
                break;
            }
            return 2;
        }
    }
    if (skip_ws(s, len, i) != len) return 2;
    char count[32];
    size_t c = 0;
    char digits[24];
    size_t d = 0;
    do {
        digits[d++] = (char)('0' + fields % 10);
        fields /= 10;
    } while (fields);
    const char *prefix = o->n > 1 ? ",\"fields\":" : "\"fields\":";
    size_t pl = strlen(prefix);
    memcpy(count, prefix, pl);
    c = pl;
    while (d) count[c++] = digits[--d];
    count[c++] = '}';
    put(o, (const uint8_t *)count, c);
    return 0;
}

int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response) {
    struct out measure = {NULL, 0};
    if (transform(request, request_len, &measure) != 0) return 2;
    struct out o = {host->alloc(measure.n), 0};
    if (o.p == NULL) return 1;
    transform(request, request_len, &o);
    response->data = o.p;
    response->len = o.n;
    return 0;
}

/* words: counts the words of the request (runs of ASCII letters, lower-cased) and answers
 * "word count" lines, most frequent first (ties: first seen first). It uses the C library's
 * allocator freely (malloc, calloc, realloc, free): the loader binds those calls to a heap in
 * the tenant's own instance. Answers 2 when memory runs out. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "mpkvirt_fn.h"

const uint32_t mpkvirt_fn_abi_version = MPKVIRT_FN_ABI_VERSION;

struct word {
    char *text;
    size_t len;
    size_t count;
    size_t first;
    struct word *next; /* in its bucket */
};

struct table {
    struct word **buckets;
    size_t nbuckets;
    struct word **all; /* in order of first appearance */
    size_t n, cap;
};

static uint64_t hash(const char *s, size_t len) {
    uint64_t h = 1469598103934665603u;
    for (size_t i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211u;
    return h;
}

static int grow(struct table *t) {
    size_t nb = t->nbuckets * 2;
    struct word **b = calloc(nb, sizeof *b);
    if (b == NULL) return -1;
    for (size_t i = 0; i < t->n; i++) {
        struct word *w = t->all[i];
        size_t at = hash(w->text, w->len) % nb;
        w->next = b[at];
        b[at] = w;
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = nb;
    return 0;
}

static int add(struct table *t, const char *s, size_t len) {
    size_t at = hash(s, len) % t->nbuckets;
    for (struct word *w = t->buckets[at]; w != NULL; w = w->next) {
        if (w->len == len && memcmp(w->text, s, len) == 0) {
            w->count++;
            return 0;
        }
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        struct word **all = realloc(t->all, cap * sizeof *all);
        if (all == NULL) return -1;
        t->all = all;
        t->cap = cap;
    }
    struct word *w = malloc(sizeof *w);
    char *text = malloc(len);
    if (w == NULL || text == NULL) {
        free(w);
        free(text);
        return -1;
    }
    memcpy(text, s, len);
    *w = (struct word){text, len, 1, t->n, t->buckets[at]};
    t->buckets[at] = w;
    t->all[t->n++] = w;
    if (t->n > t->nbuckets * 2) return grow(t);
    return 0;
}

static void release(struct table *t) {
    for (size_t i = 0; i < t->n; i++) {
        free(t->all[i]->text);
        free(t->all[i]);
    }
    free(t->all);
    free(t->buckets);
}

static int before(const struct word *a, const struct word *b) {
    return a->count > b->count || (a->count == b->count && a->first < b->first);
}

int mpkvirt_fn_entry(const struct mpkvirt_host_api *host, const uint8_t *request,
                     size_t request_len, struct mpkvirt_response *response) {
    struct table t = {calloc(64, sizeof(struct word *)), 64, NULL, 0, 0};
    if (t.buckets == NULL) return 2;
    char *word = malloc(request_len + 1);
    if (word == NULL) {
        release(&t);
        return 2;
    }
    size_t len = 0;
    for (size_t i = 0; i <= request_len; i++) {
        uint8_t c = i < request_len ? request[i] : ' ';
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
            word[len++] = (char)(c | 0x20);
        } else if (len > 0) {
            if (add(&t, word, len) != 0) {
                free(word);
                release(&t);
                return 2;
            }
            len = 0;
        }
    }
    free(word);
    /* Insertion sort: most frequent first, then first seen. */
    for (size_t i = 1; i < t.n; i++) {
        struct word *w = t.all[i];
        size_t j = i;
        while (j > 0 && before(w, t.all[j - 1])) {
            t.all[j] = t.all[j - 1];
            j--;
        }
        t.all[j] = w;
    }
    size_t size = 0;
    for (size_t i = 0; i < t.n; i++) size += t.all[i]->len + 22;
    uint8_t *out = host->alloc(size ? size : 1);
    if (out == NULL) {
        release(&t);
        return 2;
    }
    size_t at = 0;
    for (size_t i = 0; i < t.n; i++) {
        struct word *w = t.all[i];
        memcpy(out + at, w->text, w->len);
        at += w->len;
        out[at++] = ' ';
        char digits[21];
        size_t nd = 0, c = w->count;
        do {
            digits[nd++] = (char)('0' + c % 10);
            c /= 10;
        } while (c > 0);
        while (nd > 0) out[at++] = (uint8_t)digits[--nd];
        out[at++] = '\n';
    }
    release(&t);
    response->data = out;
    response->len = at;
    return 0;
}

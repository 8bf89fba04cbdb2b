/* More virtual keys in use than there are hardware keys: 64 domains written and read back
 * in several rounds, so domains are evicted and re-bound many times and must keep their
 * contents. */
#include <stdint.h>
#include <sys/mman.h>
#include "check.h"
#include "mpkvirt.h"

#define DOMAINS 64
#define WORDS 512

int main(void) {
    CHECK(mpk_init(-1) == 0);
    CHECK(mpkvirt_key_count() >= 1 && mpkvirt_key_count() <= 15);
    uint64_t *buf[DOMAINS];
    for (int k = 0; k < DOMAINS; k++) {
        buf[k] = mpk_malloc(k, WORDS * sizeof(uint64_t));
        CHECK(buf[k] != NULL);
    }
    for (int round = 0; round < 4; round++) {
        for (int k = 0; k < DOMAINS; k++) {
            CHECK(mpk_begin(k, PROT_READ | PROT_WRITE) == 0);
            for (int i = 0; i < WORDS; i++) {
                if (round > 0) CHECK(buf[k][i] == (uint64_t)(k * 1000 + i + round - 1));
                buf[k][i] = (uint64_t)(k * 1000 + i + round);
            }
            CHECK(mpk_end(k) == 0);
        }
    }
    printf("test_many_keys: %d domains on %d keys (%s backend): ok\n", DOMAINS, mpkvirt_key_count(),
           mpkvirt_backend());
    return 0;
}

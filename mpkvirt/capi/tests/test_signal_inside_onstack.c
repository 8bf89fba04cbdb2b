/* test_signal_inside.c with the handler on an alternate signal stack (sigaltstack,
 * SA_ONSTACK): the way the header tells programs to install handlers that may interrupt
 * mpk_* calls. */
#define TEST_SIGNAL_ONSTACK 1
#include "test_signal_inside.c"

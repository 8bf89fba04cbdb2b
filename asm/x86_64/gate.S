/*
 * The lowering gate alone (x86-64, System V ABI); the call gates and the threat model they
 * answer are in callgate.S.
 *
 * mpkvirt_gate_sync() sets PKRU to the calling thread's legitimate value for its normal
 * context (not a signal handler's), read through %gs from its gate record (library memory),
 * and re-reads the record after the WRPKRU: landing on the WRPKRU with a forged EAX loops
 * back and writes the record's value. Used when the library runs without metadata
 * protection (cooperative mode) on PKU hardware, after the library changed the record, and
 * by a preempted sandbox's stub after its XRSTOR.
 *
 * Clobbers EAX, ECX, EDX and the flags; touches no stack beyond the return address.
 */
#include "asm.h"
#include "gate.h"
#include "gnu_stack_note.S"

    .text

/* extern "sysv64" fn mpkvirt_gate_sync()
 * PKRU <- record.normal_pkru (through %gs), re-checked. */
FUNCTION(mpkvirt_gate_sync)
1:
    xor     %ecx, %ecx
    xor     %edx, %edx
    mov     %gs:REC_NORMAL_PKRU, %eax
    WRPKRU
    cmp     %gs:REC_NORMAL_PKRU, %eax
    jne     1b
    ret
END_FUNCTION(mpkvirt_gate_sync)

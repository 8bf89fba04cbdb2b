/*
 * Probes: single memory accesses that a SIGSEGV handler can recover from.
 *
 * Each probe performs exactly one access at a label the handler can recognise
 * (`mpkvirt_probe_*_insn`). A handler that finds the interrupted %rip at one of those labels
 * may resume the thread at `mpkvirt_probe_fault_ret` with %rax = u64::MAX: the probe then
 * returns that value to its caller instead of completing the access. Because the probes
 * push nothing, the interrupted %rsp still points at the return address, so the handler
 * leaves %rsp unchanged.
 *
 * This is how tests (and mpkvirt's checked accesses) observe a protection fault without
 * jumping over Rust frames: the only frame abandoned is the probe's own, which has no state.
 */
#include "asm.h"
#include "gnu_stack_note.S"

    .text

/* extern "sysv64" fn mpkvirt_probe_read8(%rdi: addr *const u8) -> %rax: u64
 * Returns the byte at `addr` (0..=255), or u64::MAX when a handler resumed the probe. */
FUNCTION(mpkvirt_probe_read8)
    xor     %eax, %eax
    .globl  mpkvirt_probe_read8_insn
mpkvirt_probe_read8_insn:
    movb    (%rdi), %al
    ret
END_FUNCTION(mpkvirt_probe_read8)

/* extern "sysv64" fn mpkvirt_probe_write8(%rdi: addr *mut u8, %sil: value u8) -> %rax: u64
 * Stores `value` at `addr` and returns 0, or u64::MAX when a handler resumed the probe. */
FUNCTION(mpkvirt_probe_write8)
    .globl  mpkvirt_probe_write8_insn
mpkvirt_probe_write8_insn:
    movb    %sil, (%rdi)
    xor     %eax, %eax
    ret
END_FUNCTION(mpkvirt_probe_write8)

/* Resume point for a faulted probe: returns %rax (set by the handler) to the probe's caller. */
FUNCTION(mpkvirt_probe_fault_ret)
    ret
END_FUNCTION(mpkvirt_probe_fault_ret)

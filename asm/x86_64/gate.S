/*
 * Checked WRPKRU gates (x86-64, System V ABI).
 *
 * A gate is the only place where mpkvirt writes PKRU. Each gate follows ERIM's pattern
 * (Vahldiek-Oberwagner et al., USENIX Security 2019): load the value, WRPKRU, then compare
 * what was written (EAX survives WRPKRU) against the *trusted source* of the value again,
 * and loop back on a mismatch:
 *
 *     1:  xor   %ecx, %ecx          ; WRPKRU needs ECX = EDX = 0, else #GP
 *         xor   %edx, %edx
 *         mov   <trusted source>, %eax
 *         wrpkru
 *         cmp   <trusted source>, %eax
 *         jne   1b                  ; landed on the WRPKRU with a forged EAX: redo it
 *
 * Control flow that lands directly on the WRPKRU with an attacker-chosen EAX executes the
 * comparison next, finds the mismatch, and rewrites PKRU from the trusted source. So no path
 * through a gate returns with a PKRU other than the trusted value.
 *
 * The trusted source is an immediate (`mpkvirt_gate_allow_all`) or a 32-bit slot in memory
 * the caller trusts (`mpkvirt_gate_write`). For the memory form, the guarantee holds for an
 * attacker who controls EAX at the landing point but not the slot: the slot must be memory
 * the untrusted code cannot write, and it must stay readable under the value written
 * (otherwise the comparison faults, which also stops the forged value from being used).
 *
 * The immediate form is emitted byte for byte as `31 C9 31 D2 B8 imm32 0F 01 EF 3D imm32 75 rel8`
 * (the assembler would shorten the comparison to an 8-bit immediate), so that a code scanner
 * can recognise a benign WRPKRU by one fixed pattern, as ERIM's does.
 *
 * Register contract (all gates): clobbers EAX, ECX, EDX and the flags; preserves every other
 * register and does not touch the stack beyond the return address. No gate is a leaf that
 * may be inlined: callers reach it with `call`, so the caller-saved clobbers are implied by
 * the C ABI.
 */
#include "asm.h"
#include "gnu_stack_note.S"

    .text

/* extern "sysv64" fn mpkvirt_gate_allow_all()
 * PKRU <- 0 (every key readable and writable). The value is an immediate. */
FUNCTION(mpkvirt_gate_allow_all)
1:
    xor     %ecx, %ecx
    xor     %edx, %edx
    mov     $PKRU_ALLOW_ALL, %eax
    WRPKRU
    CMP_EAX_IMM32(PKRU_ALLOW_ALL)
    jne     1b
    ret
END_FUNCTION(mpkvirt_gate_allow_all)

/* extern "sysv64" fn mpkvirt_gate_write(%rdi: *const u32 expected)
 * PKRU <- *expected, re-checked against *expected after the WRPKRU. */
FUNCTION(mpkvirt_gate_write)
1:
    xor     %ecx, %ecx
    xor     %edx, %edx
    mov     (%rdi), %eax
    WRPKRU
    cmp     (%rdi), %eax
    jne     1b
    ret
END_FUNCTION(mpkvirt_gate_write)

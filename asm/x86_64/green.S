/*
 * Green-thread context switch (x86-64, System V ABI).
 *
 * mpkvirt_green_switch(save: *mut usize %rdi, to: usize %rsi, message: u64 %rdx) -> u64 %rax
 * ---------------------------------------------------------------------------------------
 * Suspends the running context and resumes the one whose saved stack pointer is `to`.
 * Everything the System V ABI asks a callee to preserve goes on the running context's own
 * stack — %rbp, %rbx, %r12-%r15, and the control bits of MXCSR and of the x87 control word —
 * and the resulting stack pointer is stored in *save. Then %rsp = to, the same state is
 * popped from the other stack, and `ret` continues where that context called
 * mpkvirt_green_switch, which returns `message` there. A context is therefore one word: its
 * saved stack pointer.
 *
 *     suspended context's stack (grows down)
 *     +-------------------------------+
 *     | return address into its call  |  <- sp + 56
 *     | %rbp                          |  <- sp + 48
 *     | %rbx                          |  <- sp + 40
 *     | %r12                          |  <- sp + 32
 *     | %r13                          |  <- sp + 24
 *     | %r14                          |  <- sp + 16
 *     | %r15                          |  <- sp + 8
 *     | MXCSR (low 32) | x87 CW (high) |  <- sp = *save
 *     +-------------------------------+
 *
 * A new context is a stack prepared in that shape (mpkvirt-host's `sched::green`): %r12 the
 * function, %r13 its argument, the return address mpkvirt_green_entry, MXCSR 0x1F80 and the
 * x87 control word 0x037F (the ABI's initial values), so that its first resumption runs
 * mpkvirt_green_entry with the message in %rax.
 *
 * PKRU is not touched: there is no WRPKRU here, so no byte of this file can change rights
 * however it is entered. The rights of the context being resumed are installed by mpkvirt's
 * call gate (a view entered or left through the library) before the switch.
 *
 * mpkvirt_green_entry
 * -------------------
 * Not a function: the first return address of a new context. Calls f(arg, message) with the
 * stack 16-byte aligned; f must never return (it switches away for good when it is done),
 * so a return traps (ud2). The CFA is marked undefined: unwinders stop here.
 */
#include "asm.h"
#include "gnu_stack_note.S"
#include "callee_saved.S"

    .text

FUNCTION(mpkvirt_green_switch)
    SAVE_CALLEE
    mov     %rsp, (%rdi)
    /* The other context: from here on the CFI describes its frame, which has the same shape. */
    mov     %rsi, %rsp
    RESTORE_CALLEE
    mov     %rdx, %rax
    ret
END_FUNCTION(mpkvirt_green_switch)

FUNCTION(mpkvirt_green_entry)
    .cfi_undefined rip
    mov     %r13, %rdi
    mov     %rax, %rsi
    call    *%r12
    ud2
END_FUNCTION(mpkvirt_green_entry)

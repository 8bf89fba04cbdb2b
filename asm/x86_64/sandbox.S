/*
 * Sandbox switches (x86-64, System V ABI): the two sides of mpkvirt's sandbox ops
 * (`mpkvirt::sandbox`). There is no WRPKRU here and no stack pointer is chosen here: the
 * call gate switches stacks and rights. `S_RUN` makes the gate leave on the sandbox's stack
 * with the sandbox's view; `OP_SANDBOX_YIELD` makes it leave on the stack the run was called
 * from, with the caller's view. Both stack pointers are kept in the thread's record, in
 * library memory, so a jump into any byte of this file reaches only the gate's entry.
 *
 * What this file adds is what a call preserves: each side saves its callee-saved registers
 * and the control bits of MXCSR and the x87 control word on its own stack before it calls
 * the gate, and restores them when the gate comes back to it — on the other stack, after
 * the other side ran.
 *
 * mpkvirt_sandbox_run(op %rdi, block %rsi, gate %rdx) -> u64 %rax
 * ---------------------------------------------------------------
 * The host side. Calls `gate(op, block)` with the callee-saved registers zeroed (a new
 * sandboxed context starts with them, and must not learn the host's values). Returns when
 * the sandboxed context yields (or when the op failed before switching).
 *
 * mpkvirt_sandbox_yield(value %rdi, gate %rsi) -> u64 %rax
 * -------------------------------------------------------
 * The sandboxed side. Calls `gate(OP_SANDBOX_YIELD, value)`; returns the value the next run
 * of this context resumes it with.
 *
 *     a suspended sandboxed context's stack (grows down)
 *     +-------------------------------+
 *     | return address of its yield   |  <- sp + 64
 *     | %rbp %rbx %r12 %r13 %r14 %r15 |  <- sp + 16 .. sp + 56
 *     | MXCSR (low 32) | x87 CW (high) |  <- sp + 8
 *     | mpkvirt_sandbox_resume        |  <- sp (the gate's return address)
 *     +-------------------------------+
 *
 * A new context is a stack prepared in that shape (`mpkvirt::sandbox::Context::new`): %r12
 * the function, %r13 its argument, the outer return address mpkvirt_sandbox_entry, MXCSR
 * 0x1F80, the x87 control word 0x037F. Its first run returns into mpkvirt_sandbox_resume,
 * which pops that state and returns into mpkvirt_sandbox_entry with the run's value in %rax.
 *
 * mpkvirt_sandbox_entry
 * ---------------------
 * Not a function: the first return address of a new context. Calls f(arg, value) with the
 * stack 16-byte aligned; f must never return (it yields for good when it is done), so a
 * return traps (ud2). The CFA is marked undefined: unwinders stop here.
 */
#include "asm.h"
#include "gate.h"
#include "gnu_stack_note.S"

    .text

.macro SAVE_CALLEE
    push    %rbp
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %rbp, 0
    push    %rbx
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %rbx, 0
    push    %r12
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r12, 0
    push    %r13
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r13, 0
    push    %r14
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r14, 0
    push    %r15
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r15, 0
    sub     $8, %rsp
    .cfi_adjust_cfa_offset 8
    stmxcsr (%rsp)
    fnstcw  4(%rsp)
.endm

.macro RESTORE_CALLEE
    ldmxcsr (%rsp)
    fldcw   4(%rsp)
    add     $8, %rsp
    .cfi_adjust_cfa_offset -8
    pop     %r15
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r15
    pop     %r14
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r14
    pop     %r13
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r13
    pop     %r12
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r12
    pop     %rbx
    .cfi_adjust_cfa_offset -8
    .cfi_restore %rbx
    pop     %rbp
    .cfi_adjust_cfa_offset -8
    .cfi_restore %rbp
.endm

FUNCTION(mpkvirt_sandbox_run)
    SAVE_CALLEE
    xor     %ebx, %ebx
    xor     %ebp, %ebp
    xor     %r12d, %r12d
    xor     %r13d, %r13d
    xor     %r14d, %r14d
    xor     %r15d, %r15d
    call    *%rdx
    RESTORE_CALLEE
    ret
END_FUNCTION(mpkvirt_sandbox_run)

FUNCTION(mpkvirt_sandbox_yield)
    SAVE_CALLEE
    mov     %rsi, %rax
    mov     %rdi, %rsi
    mov     $OP_SANDBOX_YIELD, %edi
    call    *%rax
    .globl  mpkvirt_sandbox_resume
mpkvirt_sandbox_resume:
    RESTORE_CALLEE
    ret
END_FUNCTION(mpkvirt_sandbox_yield)

FUNCTION(mpkvirt_sandbox_entry)
    .cfi_undefined rip
    mov     %r13, %rdi
    mov     %rax, %rsi
    call    *%r12
    ud2
END_FUNCTION(mpkvirt_sandbox_entry)

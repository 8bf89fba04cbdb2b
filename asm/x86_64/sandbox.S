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
 * mpkvirt_sandbox_preempted_pku / _nopku
 * ---------------------------------------
 * Not functions: where mpkvirt's OP_SANDBOX_SIGNAL sends a sandboxed context that a timer
 * signal preempted. The library (which may write the sandbox's domain) stored the interrupted
 * %rip 136 bytes below the interrupted %rsp (below the red zone) and set %rsp there; every
 * other register is as interrupted. The stub saves the flags, the caller-saved registers and
 * the extended state (XSAVE of every component but PKRU, into a 64-byte aligned area of
 * XSAVE_MAX bytes on the same stack), yields PREEMPTED through the call gate, and when run
 * again restores all of it and returns to the interrupted %rip with `ret $128`, which also
 * pops the 136 bytes.
 *
 * XRSTOR could load PKRU if reached by a jump with a forged component mask: it is followed,
 * on every path, by a check of XCR0 (XGETBV, hardware state): where the OS manages PKRU in
 * XSAVE state (XCR0 bit 9), the record's PKRU for the thread's normal context is installed
 * again (mpkvirt_gate_sync's sequence, inline: a call would push with the forged PKRU). So a
 * jump to the XRSTOR leaves the thread's legitimate rights, as a jump into any gate does.
 *
 * The stubs lie between mpkvirt_sandbox_stubs_start and _end: a preemption that finds the
 * context there is already under way (the library leaves it alone).
 *
 * mpkvirt_sandbox_abort_pku / _nopku
 * ----------------------------------
 * Not functions: where OP_SANDBOX_SIGNAL sends a sandboxed context that faulted or ran past
 * its deadline, on the top of its stack, with %rdi the value to yield. Yields it for good.
 *
 * mpkvirt_sigreturn(ctx)
 * ----------------------
 * Not a function: where mpkvirt's dispatcher ends a signal handler of a thread that runs a
 * sealed sandbox (`gate::finish_signal`): %rsp <- ctx, the handler's `ucontext_t` (the
 * signal frame begins 8 bytes below it, with the restorer's return address, which
 * `rt_sigreturn` expects popped), then `rt_sigreturn`. The kernel restores every register,
 * PKRU included, from the frame. (Jumped to with a forged %rdi it is `rt_sigreturn` on a
 * frame of the caller's choice, which any code can make with a `syscall` instruction: system
 * calls are interposition's to filter.)
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
#include "callee_saved.S"

    .text

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

FUNCTION(mpkvirt_sigreturn)
    .cfi_undefined rip
    mov     %rdi, %rsp
    mov     $15, %eax       /* __NR_rt_sigreturn */
    syscall
    ud2
END_FUNCTION(mpkvirt_sigreturn)

FUNCTION(mpkvirt_sandbox_entry)
    .cfi_undefined rip
    mov     %r13, %rdi
    mov     %rax, %rsi
    call    *%r12
    ud2
END_FUNCTION(mpkvirt_sandbox_entry)

/* XSAVE of every user component but PKRU (bit 9). */
#define XMASK_LO 0xFFFFFDFF
#define XMASK_HI 0xFFFFFFFF

.macro PREEMPTED name, gate
FUNCTION(\name)
    .cfi_undefined rip
    pushfq
    push    %rax
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    push    %rbp
    mov     %rsp, %rbp
    and     $-64, %rsp
    sub     $XSAVE_MAX, %rsp
    /* XSAVE leaves the header's XCOMP_BV and reserved bytes as they were: zero them. */
    xor     %eax, %eax
    mov     %rax, 512(%rsp)
    mov     %rax, 520(%rsp)
    mov     %rax, 528(%rsp)
    mov     %rax, 536(%rsp)
    mov     %rax, 544(%rsp)
    mov     %rax, 552(%rsp)
    mov     %rax, 560(%rsp)
    mov     %rax, 568(%rsp)
    mov     $XMASK_LO, %eax
    mov     $XMASK_HI, %edx
    xsave64 (%rsp)
    mov     $SANDBOX_PREEMPTED, %edi
    mov     \gate@GOTPCREL(%rip), %rsi
    call    mpkvirt_sandbox_yield
    mov     $XMASK_LO, %eax
    mov     $XMASK_HI, %edx
    xrstor64 (%rsp)
    xor     %ecx, %ecx
    xgetbv
    test    $0x200, %eax
    jz      1f
    /* mpkvirt_gate_sync, inline: a call would push its return address with whatever
     * PKRU a forged XRSTOR loaded (every key open, say), where %rsp points. */
2:  xor     %ecx, %ecx
    xor     %edx, %edx
    mov     %gs:REC_NORMAL_PKRU, %eax
    WRPKRU
    cmp     %gs:REC_NORMAL_PKRU, %eax
    jne     2b
1:  mov     %rbp, %rsp
    pop     %rbp
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rax
    popfq
    ret     $128
END_FUNCTION(\name)
.endm

    .globl  mpkvirt_sandbox_stubs_start
    .p2align 4
mpkvirt_sandbox_stubs_start:
PREEMPTED mpkvirt_sandbox_preempted_pku, mpkvirt_gate_call
PREEMPTED mpkvirt_sandbox_preempted_nopku, mpkvirt_gate_call_nopku

.macro ABORT name, gate
FUNCTION(\name)
    .cfi_undefined rip
    mov     %rdi, %rbx
1:  mov     %rbx, %rdi
    mov     \gate@GOTPCREL(%rip), %rsi
    call    mpkvirt_sandbox_yield
    jmp     1b
END_FUNCTION(\name)
.endm

ABORT mpkvirt_sandbox_abort_pku, mpkvirt_gate_call
ABORT mpkvirt_sandbox_abort_nopku, mpkvirt_gate_call_nopku
    .globl  mpkvirt_sandbox_stubs_end
mpkvirt_sandbox_stubs_end:

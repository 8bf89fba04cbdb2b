/*
 * Running a function on another stack, with a resume point for fault handlers, and the
 * system-call trampoline (x86-64, System V ABI).
 *
 * mpkvirt_stack_call
 * ------------------
 * Runs `f(arg)` on a caller-provided stack. Before switching, every callee-saved register is
 * pushed on the *caller's* stack and the resulting stack pointer is stored in `*jmp`, so the
 * whole state needed to return lives in one word:
 *
 *     caller stack (grows down)            new stack (grows down)
 *     +----------------------+ <- CFA      +----------------------+ <- stack_top (16-aligned)
 *     | return address       |             | return address into  |
 *     | saved %rbp           | <- %rbp     |   mpkvirt_stack_call |
 *     | saved %rbx           |             | frames of f ...      |
 *     | saved %r12 .. %r15   |             |                      |
 *     | padding (alignment)  | <- *jmp     |                      |
 *     +----------------------+             +----------------------+
 *
 * Normal return: f returns, %rsp is reloaded from `*jmp`, %eax = 0, registers are popped.
 * Fault return: a signal handler that decides to abandon f rewrites the interrupted context to
 * %rsp = *jmp, %rip = mpkvirt_stack_call_resume, %rax = 1 and returns from the signal; the
 * same epilogue then pops the caller's registers and returns 1. Frames of f on the new stack
 * are abandoned, never resumed.
 *
 * The CFA is %rbp-based while f runs, so unwinders and debuggers walk from f's frames back
 * into the caller across the stack switch.
 *
 * mpkvirt_syscall6
 * ----------------
 * A plain `syscall` in a page of its own (`.text.mpkvirt_trampoline`), so that a seccomp
 * filter can tell system calls issued here (by the interposer itself) from all others by the
 * instruction pointer.
 */
#include "asm.h"
#include "gnu_stack_note.S"

    .text

/* extern "sysv64" fn mpkvirt_stack_call(
 *     %rdi: arg *mut c_void,
 *     %rsi: f extern "sysv64" fn(*mut c_void),
 *     %rdx: stack_top *mut u8 (16-byte aligned, top of a stack f may use),
 *     %rcx: jmp *mut usize (receives the saved stack pointer)) -> %rax: u64 (0 or 1) */
FUNCTION(mpkvirt_stack_call)
    push    %rbp
    .cfi_adjust_cfa_offset 8
    .cfi_offset %rbp, -16
    mov     %rsp, %rbp
    .cfi_def_cfa_register %rbp
    push    %rbx
    .cfi_offset %rbx, -24
    push    %r12
    .cfi_offset %r12, -32
    push    %r13
    .cfi_offset %r13, -40
    push    %r14
    .cfi_offset %r14, -48
    push    %r15
    .cfi_offset %r15, -56
    /* Entry %rsp was 8 mod 16; 6 pushes + 8 bytes keep the saved %rsp 16-byte aligned. */
    sub     $8, %rsp
    mov     %rsp, (%rcx)
    /* %rbx (callee-saved, already preserved above) keeps `jmp` across the call. */
    mov     %rcx, %rbx
    mov     %rdx, %rsp
    call    *%rsi
    mov     (%rbx), %rsp
    xor     %eax, %eax
    .globl  mpkvirt_stack_call_resume
mpkvirt_stack_call_resume:
    /* Both paths arrive with %rsp == *jmp; %rbp is only valid on the normal path, so the
     * CFA is re-expressed from %rsp: 8 (padding) + 40 (5 registers) + 8 (%rbp) + 8 (ret). */
    .cfi_def_cfa %rsp, 64
    add     $8, %rsp
    .cfi_def_cfa_offset 56
    pop     %r15
    .cfi_def_cfa_offset 48
    pop     %r14
    .cfi_def_cfa_offset 40
    pop     %r13
    .cfi_def_cfa_offset 32
    pop     %r12
    .cfi_def_cfa_offset 24
    pop     %rbx
    .cfi_def_cfa_offset 16
    pop     %rbp
    .cfi_def_cfa_offset 8
    ret
END_FUNCTION(mpkvirt_stack_call)

    .section .text.mpkvirt_trampoline, "ax", @progbits
    .p2align 12

/* extern "sysv64" fn mpkvirt_syscall6(
 *     %rdi: nr, %rsi: a0, %rdx: a1, %rcx: a2, %r8: a3, %r9: a4, 8(%rsp): a5) -> %rax: isize
 * Returns the raw kernel result (-errno on failure). */
FUNCTION(mpkvirt_syscall6)
    mov     %rdi, %rax
    mov     %rsi, %rdi
    mov     %rdx, %rsi
    mov     %rcx, %rdx
    mov     %r8, %r10
    mov     %r9, %r8
    mov     8(%rsp), %r9
    .globl  mpkvirt_syscall_insn
mpkvirt_syscall_insn:
    syscall
    ret
END_FUNCTION(mpkvirt_syscall6)
    .p2align 12
    .globl  mpkvirt_trampoline_end
mpkvirt_trampoline_end:

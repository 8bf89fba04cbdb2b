/*
 * Saving and restoring what a System V call preserves, on the running stack: %rbp, %rbx,
 * %r12-%r15, then the control bits of MXCSR (low 32 bits) and of the x87 control word (high)
 * in one word. SAVE_CALLEE leaves %rsp at that word; RESTORE_CALLEE expects it there. The
 * layout is what a suspended context's stack holds (green.S, sandbox.S), with CFI for each
 * step.
 */
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

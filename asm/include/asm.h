/*
 * Shared macros for mpkvirt's hand-written assembly (preprocessed by cc: files end in `.S`).
 *
 * Every function is bracketed by FUNCTION/END_FUNCTION so that it gets `.globl`, `.type`,
 * `.size`, 16-byte alignment and CFI start/end directives in one place.
 */
#ifndef MPKVIRT_ASM_H
#define MPKVIRT_ASM_H

#define FUNCTION(name) \
    .globl name;       \
    .type name, @function; \
    .p2align 4;        \
name:                  \
    .cfi_startproc

#define END_FUNCTION(name) \
    .cfi_endproc;          \
    .size name, .-name

/* WRPKRU and RDPKRU spelled as bytes, so that the scanners (and reviewers) can match the
 * exact encodings: WRPKRU = 0F 01 EF, RDPKRU = 0F 01 EE (Intel SDM Vol. 2). */
#define WRPKRU .byte 0x0f, 0x01, 0xef
#define RDPKRU .byte 0x0f, 0x01, 0xee

/* `cmp $imm32, %eax` in its long form (opcode 3D), whatever the value of imm. */
#define CMP_EAX_IMM32(imm) .byte 0x3d; .long (imm)

/* PKRU value with every key enabled (read and write). */
#define PKRU_ALLOW_ALL 0x00000000

#endif

/*
 * Layout of the two memory records the call gate reads: the per-thread gate record (found
 * through %gs) and the process-wide gate root (found rip-relative). The Rust side declares
 * the same structs (`mpkvirt_asm::GateRecord`, `mpkvirt_asm::GateRoot`) and asserts these
 * offsets at compile time.
 */
#ifndef MPKVIRT_GATE_H
#define MPKVIRT_GATE_H

/* struct GateRecord: the first bytes of a thread's record; %gs points at it. */
#define REC_SELF        0   /* u64: the record's own address (Rust reads it as %gs:0) */
#define REC_PKRU        8   /* u32: the thread's legitimate PKRU, installed on every exit */
#define REC_BUSY        12  /* u32: non-zero while the thread runs library code */
#define REC_SAVED_RSP   16  /* u64: the caller's stack pointer while on the library stack */
#define REC_STACK_TOP   24  /* u64: top of the thread's library stack (16-byte aligned) */
#define REC_OWNER_FS    32  /* u64: FS base of the thread the record belongs to */
#define REC_NORMAL_PKRU 40  /* u32: the PKRU of the thread's normal context (gate_sync's) */

/* struct GateRoot: the first bytes of mpkvirt's root page (symbol mpkvirt_gate_root). */
#define ROOT_LIB_PKRU       0   /* u32: unused by the gates (PKRU_LIB is an immediate) */
#define ROOT_DENY_PKRU      4   /* u32: unused by the gates (PKRU_DENY is an immediate) */
#define ROOT_BOOT_LOCK      8   /* u32: taken while a thread registers on the boot stack */
#define ROOT_BOOT_SAVED_RSP 16  /* u64 */
#define ROOT_BOOT_STACK_TOP 24  /* u64: top of the shared registration stack */

/* PKRU while library code runs (every key open), and for a thread the gate cannot identify
 * (the kernel's initial value: key 0 only). Immediates: no memory read decides them. */
#define PKRU_LIB  0x00000000
#define PKRU_DENY 0x55555554

/* Status words the gate itself returns (the dispatcher's results are below 2^63). */
#define GATE_BUSY           0x8000000000000001   /* re-entered (a signal handler interrupted the library) */
#define GATE_UNREGISTERED   0x8000000000000002   /* the thread could not be registered */

/* RFLAGS.AC (alignment check). */
#define EFLAGS_AC 0x40000

/* The ops sandbox.S makes (mpkvirt's `ops::OP_SANDBOX_*`, asserted equal in Rust). */
#define OP_SANDBOX_YIELD 14

/* What a preempted sandbox yields (mpkvirt's `sandbox::PREEMPTED`), and the room its stub
 * keeps for the extended state (`sandbox::XSAVE_MAX`; the library refuses preemption when
 * the CPU's XSAVE area is larger). */
#define SANDBOX_PREEMPTED 3
#define XSAVE_MAX 16384

#endif

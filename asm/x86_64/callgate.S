/*
 * mpkvirt's PKRU gates (x86-64, System V ABI): the only WRPKRU instructions in mpkvirt.
 *
 * Threat model. Code running with a thread's view may be hostile and may jump to any byte
 * of any executable page, with any register contents and any stack. WRPKRU is
 * unprivileged, so every WRPKRU here must be useless to such a jump:
 *
 *   - a WRPKRU that RAISES rights (to an immediate that opens every key) is followed only by
 *     fixed code: identify the thread, switch to the thread's library
 *     stack, call the dispatcher, and lower again. It never returns to a caller-chosen
 *     address with raised rights;
 *   - a WRPKRU that LOWERS rights takes its value from the thread's gate record, found
 *     through %gs (a register the attacker cannot change: WRGSBASE is banned from tenant
 *     code and arch_prctl is interposed), in library memory the attacker cannot write; and
 *     re-reads the record after the write (ERIM's check: landing on the WRPKRU with a forged
 *     EAX loops back and writes the record's value).
 *
 *   - the two other lowering WRPKRUs: the deny value (no key but 0; key 0 read-only too in
 *     a process whose sandboxes run with it so, from the read-only word mpkvirt_deny_key0),
 *     re-checked against the same; and, for a signal handler that re-entered a busy record,
 *     the record's value with key 0 read-write, re-checked against the record and taken
 *     only while the record is busy (which no code of the thread but a handler sees).
 *
 * So a jump into any gate, with any registers, leaves either the calling thread's own
 * legitimate PKRU or the deny value — or faults, which the fault handler turns into the
 * deny value too.
 *
 * mpkvirt_gate_call(op: u64 %rdi, args: *mut u8 %rsi) -> u64 %rax
 * ---------------------------------------------------------------
 *   1. Read the entry PKRU (RDPKRU) for the dispatcher (signal-handler detection, bits of
 *      keys other code owns).
 *   2. Raise: PKRU <- PKRU_LIB, an immediate (every key open: library code may read its
 *      arguments wherever the caller keeps them), re-checked after the WRPKRU as in ERIM.
 *      The value cannot come from the root: a thread that never went through a gate has
 *      the library key access-disabled.
 *   3. Identify: the record %gs points at must belong to this thread (its owner_fs equals
 *      RDFSBASE). A thread with no record, or one it inherited from its creator (clone
 *      copies the GS base), registers first on the shared boot stack, one thread at a time.
 *   4. Claim the record's busy word (XCHG) and check the owner again. Refuse re-entry (a
 *      signal handler that interrupted library code on this thread): return GATE_BUSY
 *      without touching the library stack.
 *   5. Switch to the record's library stack, clear DF and AC there (the caller chooses the
 *      flags; the dispatcher needs the ABI's; nothing is pushed on the caller's stack while
 *      every key is open), and call
 *      mpkvirt_dispatch(op, args, entry_pkru) (Rust).
 *   6. Lower: PKRU <- record.pkru, re-checked; return the dispatcher's result. (A busy
 *      record at 4: the record's value with key 0 read-write, for the handler.)
 *
 *      caller stack                        library stack (library key)
 *      +--------------------+              +--------------------+ <- record.stack_top
 *      | return address     | <- saved in  | return into gate   |
 *      | caller frames ...  |    record    | dispatcher frames  |
 *
 * mpkvirt_gate_call_nopku is the same gate without RDPKRU/WRPKRU, for machines without PKU
 * (measuring and testing the gate path natively); it protects nothing.
 *
 * mpkvirt_gate_sync() (gate.S) lowers only: PKRU <- record.pkru, re-checked. Used when the library
 * runs without metadata protection (cooperative mode) on PKU hardware.
 *
 * Register contract: the gates clobber every caller-saved register (the dispatcher is a
 * normal function) and preserve the callee-saved ones. WRPKRU needs ECX = EDX = 0.
 */
#include "asm.h"
#include "gate.h"
#include "gnu_stack_note.S"

    /* The root, the dispatcher and registration are mpkvirt's (Rust). Hidden: the references
     * bind inside the library being linked — rip-relative, with no PLT or GOT entry another
     * object could interpose or the program could overwrite. */
    .hidden mpkvirt_gate_root
    .hidden mpkvirt_deny_key0
    .hidden mpkvirt_dispatch
    .hidden mpkvirt_register_thread

    .text

/* The caller chooses the flags: library code needs the direction flag clear (the ABI) and
 * alignment checking off (AC with CR0.AM turns a misaligned load into SIGBUS). Only on the
 * library's own stacks: the caller's stack pointer is the caller's choice, and a push there
 * with every key open would write wherever it points. */
.macro CLEAR_FLAGS
    cld
    pushfq
    andl    $~EFLAGS_AC, (%rsp)
    popfq
.endm

/* The call gate body; \pku selects whether PKRU is read and written. */
.macro CALL_GATE name, pku
FUNCTION(\name)
    .if \pku
    xor     %ecx, %ecx
    RDPKRU
    mov     %eax, %r8d
.L\name\()_raise:
    xor     %ecx, %ecx
    xor     %edx, %edx
    mov     $PKRU_LIB, %eax
    WRPKRU
    CMP_EAX_IMM32(PKRU_LIB)
    jne     .L\name\()_raise
    .else
    xor     %r8d, %r8d
    .endif
.L\name\()_identify:
    rdgsbase %rax
    test    %rax, %rax
    jz      .L\name\()_register
    rdfsbase %rcx
    cmp     %gs:REC_OWNER_FS, %rcx
    jne     .L\name\()_register
    /* Claim the record, then look at its owner again: `register` re-issues a record only
     * after claiming its busy word the same way (under the records lock), so either it
     * sees this claim and leaves the record alone, or this check sees the new owner. (A
     * thread on the TCB of a dead record's thread passes the first check; without the
     * second, it and the record's new owner could both run on the record's stack.) */
    mov     $1, %eax
    xchg    %eax, %gs:REC_BUSY
    test    %eax, %eax
    jnz     .L\name\()_busy
    cmp     %gs:REC_OWNER_FS, %rcx
    jne     .L\name\()_lost
    mov     %rsp, %gs:REC_SAVED_RSP
    mov     %gs:REC_STACK_TOP, %rsp
    /* No unwinder may cross the stack switch (the dispatcher catches panics). */
    .cfi_remember_state
    .cfi_undefined rip
    CLEAR_FLAGS
    mov     %r8d, %edx
    call    mpkvirt_dispatch
    mov     %gs:REC_SAVED_RSP, %rsp
    .cfi_restore_state
    movl    $0, %gs:REC_BUSY
    mov     %rax, %r8
.L\name\()_lower:
    .if \pku
    xor     %ecx, %ecx
    xor     %edx, %edx
    mov     %gs:REC_PKRU, %eax
    WRPKRU
    cmp     %gs:REC_PKRU, %eax
    jne     .L\name\()_lower
    .endif
    mov     %r8, %rax
    ret
.L\name\()_busy:
    movabs  $GATE_BUSY, %r8
    .if \pku
    /* Only a signal handler re-enters a busy record (the thread's normal context is inside
     * the library, which it cannot be while other code of the thread runs). The handler
     * runs on the key-0 alternate stack: it gets the record's value with key 0 read-write.
     * Landed on with the record idle (a jump here from sandboxed code, whose key 0 may be
     * read-only), the check sends it to the record's own value. */
.L\name\()_busy_lower:
    xor     %ecx, %ecx
    xor     %edx, %edx
    mov     %gs:REC_PKRU, %eax
    and     $~3, %eax
    WRPKRU
    cmpl    $0, %gs:REC_BUSY
    je      .L\name\()_lower
    mov     %gs:REC_PKRU, %ecx
    and     $~3, %ecx
    cmp     %ecx, %eax
    jne     .L\name\()_busy_lower
    mov     %r8, %rax
    ret
    .else
    jmp     .L\name\()_lower
    .endif
.L\name\()_lost:
    /* Re-issued to another thread between the two checks: let go, and register. */
    movl    $0, %gs:REC_BUSY
    jmp     .L\name\()_register
.L\name\()_register:
    /* One thread at a time on the boot stack (library memory). */
    mov     $1, %ecx
1:  xor     %eax, %eax
    lock cmpxchg %ecx, mpkvirt_gate_root+ROOT_BOOT_LOCK(%rip)
    jz      2f
    pause
    jmp     1b
2:  mov     %rsp, mpkvirt_gate_root+ROOT_BOOT_SAVED_RSP(%rip)
    mov     mpkvirt_gate_root+ROOT_BOOT_STACK_TOP(%rip), %rsp
    .cfi_remember_state
    .cfi_undefined rip
    CLEAR_FLAGS
    push    %rdi
    push    %rsi
    push    %r8
    sub     $8, %rsp
    mov     %r8d, %edi
    call    mpkvirt_register_thread
    add     $8, %rsp
    pop     %r8
    pop     %rsi
    pop     %rdi
    mov     mpkvirt_gate_root+ROOT_BOOT_SAVED_RSP(%rip), %rsp
    .cfi_restore_state
    movl    $0, mpkvirt_gate_root+ROOT_BOOT_LOCK(%rip)
    test    %rax, %rax
    jnz     .L\name\()_identify
    movabs  $GATE_UNREGISTERED, %r8
.L\name\()_deny:
    .if \pku
    /* PKRU_DENY, with key 0 write-disabled too for a thread with a record (a GS base) in a
     * process whose sandboxes run so (mpkvirt_deny_key0: read-only key-0 memory, set once at
     * start): sandboxed code that jumps here must not get key 0 writable. A thread whose
     * registration failed has none (the library clears its GS base) and keeps key 0. */
    xor     %ecx, %ecx
    xor     %edx, %edx
    mov     $PKRU_DENY, %eax
    rdgsbase %r9
    test    %r9, %r9
    jz      1f
    or      mpkvirt_deny_key0(%rip), %eax
1:  WRPKRU
    mov     $PKRU_DENY, %ecx
    rdgsbase %r9
    test    %r9, %r9
    jz      2f
    or      mpkvirt_deny_key0(%rip), %ecx
2:  cmp     %ecx, %eax
    jne     .L\name\()_deny
    .endif
    mov     %r8, %rax
    ret
END_FUNCTION(\name)
.endm

/* extern "sysv64" fn mpkvirt_gate_call(op: u64, args: *mut u8) -> u64 */
CALL_GATE mpkvirt_gate_call, 1

/* extern "sysv64" fn mpkvirt_gate_call_nopku(op: u64, args: *mut u8) -> u64 */
CALL_GATE mpkvirt_gate_call_nopku, 0


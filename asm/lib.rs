//! Declarations of mpkvirt's hand-written x86-64 assembly (`asm/x86_64/*.S`).
//!
//! This crate is mechanism only: `extern` declarations, the register contracts, and nothing
//! else. The safe interfaces live above it (`mpkvirt`'s gates and guarded calls). It mirrors
//! the psm/stacker split: raw assembly here, policy in the crates that use it.
//!
//! Everything is present only when `build.rs` found assembly for the target (`cfg(has_asm)`:
//! x86-64 Linux). [`AVAILABLE`] says whether it did.
//!
//! # Safety
//!
//! Every item is an `unsafe extern` function whose contract is written on it. The assembly
//! itself is reviewed in the `.S` files, which carry a stack diagram and the Rust signature
//! above each label.
#![no_std]
#![allow(
    unsafe_code,
    reason = "this crate only declares foreign assembly functions"
)]

/// Whether the assembly was built for this target.
pub const AVAILABLE: bool = cfg!(has_asm);

#[cfg(has_asm)]
unsafe extern "sysv64" {
    /// The call gate (`callgate.S`): raises PKRU to `GateRoot::lib_pkru`, identifies the
    /// calling thread through its [`GateRecord`] (registering it first when needed), switches
    /// to the thread's library stack, calls `mpkvirt_dispatch(op, args, entry_pkru)` and
    /// lowers PKRU to `GateRecord::pkru` before returning the dispatcher's result (or
    /// [`GATE_BUSY`] / [`GATE_UNREGISTERED`]).
    ///
    /// Links only together with the crate that defines `mpkvirt_dispatch`,
    /// `mpkvirt_register_thread` and `mpkvirt_gate_root` (mpkvirt).
    ///
    /// # Safety
    ///
    /// OSPKE must be set (RDPKRU/WRPKRU), FSGSBASE enabled (RDFSBASE/RDGSBASE), the root
    /// initialised (a boot stack, `lib_pkru` opening the records and stacks), and the GS base
    /// of the thread owned by mpkvirt. `args` must be what the dispatcher expects for `op`.
    pub fn mpkvirt_gate_call(op: u64, args: *mut u8) -> u64;

    /// [`mpkvirt_gate_call`] without RDPKRU/WRPKRU (the entry PKRU passed on is 0): the same
    /// identification, stack switch and dispatch on machines without PKU. Protects nothing;
    /// it exists to test and measure the gate path natively.
    ///
    /// # Safety
    ///
    /// As for [`mpkvirt_gate_call`], minus OSPKE.
    pub fn mpkvirt_gate_call_nopku(op: u64, args: *mut u8) -> u64;

    /// The lowering gate (`gate.S`): PKRU <- `GateRecord::pkru` of the record `%gs` points
    /// at, re-checked after the WRPKRU. Clobbers EAX, ECX, EDX and the flags.
    ///
    /// # Safety
    ///
    /// OSPKE must be set, and the GS base must point at the calling thread's readable
    /// [`GateRecord`] whose `pkru` keeps the thread's stack and code readable (key 0).
    pub fn mpkvirt_gate_sync();

    /// Runs `f(arg)` on the stack whose top is `stack_top`, storing the caller's saved stack
    /// pointer in `*jmp`. Returns 0 when `f` returns, and 1 when a signal handler abandoned
    /// `f` by resuming the interrupted context at [`mpkvirt_stack_call_resume`] with
    /// `%rsp = *jmp` and `%rax = 1`.
    ///
    /// # Safety
    ///
    /// `stack_top` must be 16-byte aligned and the top of writable memory large enough for
    /// `f`, with a guard page below it. `jmp` must be valid for a write and stay valid until
    /// the call returns. `f` must not unwind (catch panics inside it). When `f` is abandoned,
    /// its frames are never resumed and their destructors never run.
    pub fn mpkvirt_stack_call(
        arg: *mut core::ffi::c_void,
        f: unsafe extern "sysv64" fn(*mut core::ffi::c_void),
        stack_top: *mut u8,
        jmp: *mut usize,
    ) -> u64;

    /// The resume point inside [`mpkvirt_stack_call`] for a signal handler that abandons the
    /// function running on the other stack. Only its address is meaningful.
    ///
    /// # Safety
    ///
    /// Never call it: set it as the interrupted context's instruction pointer together with
    /// `%rsp = *jmp` of a call still in progress on the same thread, and `%rax = 1`.
    pub fn mpkvirt_stack_call_resume();

    /// Suspends the running context — its callee-saved registers, MXCSR and x87 control
    /// word pushed on its own stack, the stack pointer stored in `*save` — and resumes the
    /// context whose saved stack pointer is `to`, where it returns `message` (or, for a new
    /// context, enters [`mpkvirt_green_entry`] with it). Returns, when something resumes the
    /// suspended context, the message of that switch. PKRU is not touched.
    ///
    /// # Safety
    ///
    /// `save` must be valid for a write. `to` must be a stack pointer saved by this function
    /// for a context not resumed since, or a new context's prepared stack (see
    /// `asm/x86_64/green.S`), whose stack stays mapped while the context can run. Nothing
    /// unwinds across a switch.
    pub fn mpkvirt_green_switch(save: *mut usize, to: usize, message: u64) -> u64;

    /// The first return address of a new green context: calls `%r12(%r13, message)`, which
    /// must never return.
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful (a prepared stack's return address).
    pub fn mpkvirt_green_entry();

    /// The host side of a sandbox switch (`sandbox.S`): calls `gate(op, block)` with the
    /// callee-saved registers saved on the caller's stack and zeroed, and restores them when
    /// the gate comes back — after the sandboxed context it switched to yielded.
    ///
    /// # Safety
    ///
    /// `gate` must be one of the call gates, usable on this thread (as for
    /// [`mpkvirt_gate_call`]); `op` and `block` what the dispatcher expects. Nothing unwinds
    /// across the call.
    pub fn mpkvirt_sandbox_run(
        op: u64,
        block: *mut u8,
        gate: unsafe extern "sysv64" fn(u64, *mut u8) -> u64,
    ) -> u64;

    /// The sandboxed side (`sandbox.S`): calls `gate(OP_SANDBOX_YIELD, value)` with its
    /// callee-saved state on its own stack; returns the value the next run resumes it with.
    ///
    /// # Safety
    ///
    /// As for [`mpkvirt_sandbox_run`]. Outside a sandbox the gate refuses the op and this
    /// returns the refusal's status at once.
    pub fn mpkvirt_sandbox_yield(
        value: u64,
        gate: unsafe extern "sysv64" fn(u64, *mut u8) -> u64,
    ) -> u64;

    /// Inside [`mpkvirt_sandbox_yield`]: the gate's return address in a new context's
    /// prepared stack.
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_resume();

    /// Where a preempted sandboxed context continues (`sandbox.S`), for a PKU / no-PKU
    /// gate.
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_preempted_pku();
    /// See [`mpkvirt_sandbox_preempted_pku`].
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_preempted_nopku();
    /// Start of the preemption and abort stubs (`sandbox.S`).
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_stubs_start();
    /// End of the preemption and abort stubs.
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_stubs_end();
    /// Where an abandoned sandboxed context yields `%rdi` for good (`sandbox.S`).
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_abort_pku();
    /// See [`mpkvirt_sandbox_abort_pku`].
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_abort_nopku();

    /// The first return address of a new sandboxed context: calls `%r12(%r13, value)`, which
    /// must never return.
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_sandbox_entry();

    /// Returns from a signal: `%rsp` <- `ctx` (the handler's `ucontext_t`), then
    /// `rt_sigreturn`. Never returns.
    ///
    /// # Safety
    ///
    /// `ctx` must be the `ucontext_t` of a signal frame the kernel wrote for a handler of the
    /// calling thread that has not returned, with nothing of the calling code left to run.
    pub fn mpkvirt_sigreturn(ctx: usize) -> !;

    /// Issues system call `nr` with six arguments from the trampoline page and returns the
    /// raw kernel result (`-errno` on failure).
    ///
    /// # Safety
    ///
    /// As for any raw system call: the arguments must satisfy the kernel's contract for `nr`
    /// (pointers valid for what the kernel will read or write, no unmapping of memory Rust
    /// still uses, and so on).
    pub fn mpkvirt_syscall6(nr: i64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64;

    /// The `syscall` instruction inside [`mpkvirt_syscall6`]; its address plus 2 is the
    /// instruction pointer the kernel reports (e.g. to seccomp) for calls made through it.
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_syscall_insn();

    /// End of the page-aligned trampoline section that holds [`mpkvirt_syscall6`].
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_trampoline_end();

    /// Reads the byte at `addr`. Returns it (0..=255), or `u64::MAX` when a SIGSEGV handler
    /// resumed the probe at [`mpkvirt_probe_fault_ret`] because the read faulted.
    ///
    /// # Safety
    ///
    /// Unless a handler that recovers probes is installed, a faulting read kills the process
    /// as any fault would. A successful read is a plain byte read: `addr` must not be memory
    /// whose reading has side effects the caller does not intend (device memory, ...).
    pub fn mpkvirt_probe_read8(addr: *const u8) -> u64;

    /// The faulting instruction of [`mpkvirt_probe_read8`].
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_probe_read8_insn();

    /// Writes `value` at `addr` and returns 0, or `u64::MAX` when a SIGSEGV handler resumed
    /// the probe at [`mpkvirt_probe_fault_ret`] because the write faulted.
    ///
    /// # Safety
    ///
    /// As for [`mpkvirt_probe_read8`]; in addition a successful write changes memory, so
    /// `addr` must be valid for a byte write with no Rust reference relying on its contents.
    pub fn mpkvirt_probe_write8(addr: *mut u8, value: u8) -> u64;

    /// The faulting instruction of [`mpkvirt_probe_write8`].
    ///
    /// # Safety
    ///
    /// Never call it; only its address is meaningful.
    pub fn mpkvirt_probe_write8_insn();

    /// The resume point for a faulted probe: returns `%rax` to the probe's caller.
    ///
    /// # Safety
    ///
    /// Never call it; a SIGSEGV handler sets it as the resumed instruction pointer of a
    /// thread interrupted at a `mpkvirt_probe_*_insn` label, leaving `%rsp` unchanged.
    pub fn mpkvirt_probe_fault_ret();
}

/// What [`mpkvirt_gate_call`] returns when the thread is already inside the library (a
/// signal handler interrupted it): nothing was done.
pub const GATE_BUSY: u64 = 0x8000_0000_0000_0001;
/// What [`mpkvirt_gate_call`] returns when the calling thread could not be registered: PKRU
/// was set to `GateRoot::deny_pkru`.
pub const GATE_UNREGISTERED: u64 = 0x8000_0000_0000_0002;

/// The first bytes of a thread's record, which the gates read through `%gs` (layout in
/// `asm/include/gate.h`).
#[repr(C)]
#[derive(Debug)]
pub struct GateRecord {
    /// The record's own address, so that code can find it as `%gs:0`.
    pub self_addr: u64,
    /// The thread's legitimate PKRU: what every gate exit installs.
    pub pkru: u32,
    /// Non-zero while the thread runs library code.
    pub busy: u32,
    /// The caller's stack pointer while the thread is on its library stack.
    pub saved_rsp: u64,
    /// Top of the thread's library stack (16-byte aligned).
    pub stack_top: u64,
    /// FS base (thread pointer) of the thread the record belongs to.
    pub owner_fs: u64,
    /// The PKRU of the thread's normal context (not a signal handler's): what
    /// `mpkvirt_gate_sync` installs. Differs from `pkru` after an exit into a handler.
    pub normal_pkru: u32,
    /// Padding to the layout of `gate.h`.
    pub _pad: u32,
}

/// The first bytes of mpkvirt's root page, which the gates read rip-relative as the symbol
/// `mpkvirt_gate_root` (layout in `asm/include/gate.h`).
#[repr(C)]
#[derive(Debug)]
pub struct GateRoot {
    /// PKRU while library code runs.
    pub lib_pkru: u32,
    /// PKRU for a thread the gate could not identify or register.
    pub deny_pkru: u32,
    /// Taken while a thread registers on the boot stack.
    pub boot_lock: u32,
    /// Padding to the layout of `gate.h`.
    pub _pad: u32,
    /// The registering thread's stack pointer.
    pub boot_saved_rsp: u64,
    /// Top of the shared registration stack (16-byte aligned).
    pub boot_stack_top: u64,
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(GateRecord, self_addr) == 0);
    assert!(offset_of!(GateRecord, pkru) == 8);
    assert!(offset_of!(GateRecord, busy) == 12);
    assert!(offset_of!(GateRecord, saved_rsp) == 16);
    assert!(offset_of!(GateRecord, stack_top) == 24);
    assert!(offset_of!(GateRecord, owner_fs) == 32);
    assert!(offset_of!(GateRecord, normal_pkru) == 40);
    assert!(offset_of!(GateRoot, lib_pkru) == 0);
    assert!(offset_of!(GateRoot, deny_pkru) == 4);
    assert!(offset_of!(GateRoot, boot_lock) == 8);
    assert!(offset_of!(GateRoot, boot_saved_rsp) == 16);
    assert!(offset_of!(GateRoot, boot_stack_top) == 24);
};

/// The value a probe returns when a handler resumed it after a fault.
pub const PROBE_FAULTED: u64 = u64::MAX;

/// Addresses of labels inside the assembly, for signal handlers (which compare the
/// interrupted instruction pointer against them) and seccomp filters (which allow system
/// calls from the trampoline page).
#[cfg(has_asm)]
pub mod addr {
    macro_rules! label {
        ($(#[$doc:meta] $name:ident => $sym:ident;)*) => {$(
            #[$doc]
            pub fn $name() -> usize {
                super::$sym as *const () as usize
            }
        )*};
    }
    label! {
        /// The read instruction of `mpkvirt_probe_read8`.
        probe_read8_insn => mpkvirt_probe_read8_insn;
        /// The write instruction of `mpkvirt_probe_write8`.
        probe_write8_insn => mpkvirt_probe_write8_insn;
        /// Where a faulted probe resumes.
        probe_fault_ret => mpkvirt_probe_fault_ret;
        /// Where an abandoned `mpkvirt_stack_call` resumes.
        stack_call_resume => mpkvirt_stack_call_resume;
        /// The gate's return address in a new sandboxed context.
        sandbox_resume => mpkvirt_sandbox_resume;
        /// A new sandboxed context's first return address.
        sandbox_entry => mpkvirt_sandbox_entry;
        /// Start of the sandbox's preemption and abort stubs.
        sandbox_stubs_start => mpkvirt_sandbox_stubs_start;
        /// End of the sandbox's preemption and abort stubs.
        sandbox_stubs_end => mpkvirt_sandbox_stubs_end;
        /// Where a preempted sandbox continues (PKU gate).
        sandbox_preempted_pku => mpkvirt_sandbox_preempted_pku;
        /// Where a preempted sandbox continues (no-PKU gate).
        sandbox_preempted_nopku => mpkvirt_sandbox_preempted_nopku;
        /// Where an abandoned sandbox yields for good (PKU gate).
        sandbox_abort_pku => mpkvirt_sandbox_abort_pku;
        /// Where an abandoned sandbox yields for good (no-PKU gate).
        sandbox_abort_nopku => mpkvirt_sandbox_abort_nopku;
        /// Start of the page-aligned trampoline section (`mpkvirt_syscall6`).
        trampoline_start => mpkvirt_syscall6;
        /// End of the trampoline section (page-aligned).
        trampoline_end => mpkvirt_trampoline_end;
        /// The `syscall` instruction of the trampoline.
        syscall_insn => mpkvirt_syscall_insn;
        /// The lowering gate.
        gate_sync => mpkvirt_gate_sync;
    }
}

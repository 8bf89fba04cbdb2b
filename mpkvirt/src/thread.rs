//! Creating threads without rights they did not begin, and confining threads to domains.
//!
//! The kernel copies the creating thread's PKRU into a new thread. Created inside a view,
//! the new thread would hold the view's rights without holding its pins: once the view ends
//! and the key is bound to another domain, it could read and write the new owner's pages.
//! [`spawn`] (and `mpk_pthread_create` in the C API) create the thread while the calling
//! thread has, for that moment, no view's rights; the caller's views stay live and pinned,
//! and its rights come back right after.
//!
//! Threads created any other way inside a view (plain `std::thread::spawn`, `pthread_create`)
//! keep the view's rights: create them outside views, or through these functions. The host
//! creates all its threads itself, outside views.

use crate::backend::Backend;
use crate::domain::Domain;
use crate::error::Result;
use crate::ops::{OP_CONFINE, OP_SPAWN_DONE, OP_SPAWN_PREPARE, call};

/// Runs `f` (which creates threads) while the calling thread holds no view's rights.
///
/// # Errors
///
/// [`crate::Error::Reentrant`] from a signal handler that interrupted the library.
/// If `f` unwinds, the calling thread's rights come back all the same (the unwind goes on).
pub fn without_rights<R>(f: impl FnOnce() -> R) -> Result<R> {
    /// Ends the rightless window if `f` unwinds (forgotten when it returns).
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            // During an unwind there is no one to report an error to; a refused op (from a
            // handler that interrupted the library) changes nothing.
            let _ = call::<(), ()>(OP_SPAWN_DONE, ());
        }
    }
    call::<(), ()>(OP_SPAWN_PREPARE, ())?;
    let done = Done;
    let r = f();
    std::mem::forget(done);
    call::<(), ()>(OP_SPAWN_DONE, ())?;
    Ok(r)
}

/// [`std::thread::spawn`] that starts the new thread with no view's rights, whatever views
/// the calling thread is in.
///
/// # Errors
///
/// As [`std::thread::Builder::spawn`], and [`crate::Error::Reentrant`] (as an `io::Error`).
pub fn spawn<F, T>(f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    without_rights(|| std::thread::Builder::new().spawn(f))
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// Makes every thread of the process take the process-wide rights in force now
/// ([`crate::Domain::set_process_wide`] does this itself). Useful after
/// [`crate::Error::ThreadsNotSynced`], once the threads that blocked mpkvirt's sync signal
/// unblocked it, and to measure the mechanism: on PKU hardware each thread is signalled and
/// rewrites its PKRU; without PKU the signals go out and are acknowledged all the same.
///
/// # Errors
///
/// [`crate::Error::ThreadsNotSynced`] when some thread did not acknowledge in time,
/// [`crate::Error::Unsupported`] when the signal handler could not be installed (mpkvirt
/// installs it when it starts, and the signal had another handler then: see
/// `MPKVIRT_SYNC_SIGNAL`) or the threads cannot be listed.
pub fn sync_process_wide() -> Result<()> {
    call::<(), ()>(crate::ops::OP_SYNC_ALL, ())
}

/// Confines the calling thread, for the rest of its life, to `domains` (of any managers) and
/// the domains it creates later: every call that names another domain — entering a view of
/// it, allocating in it, destroying it, asking about it (`domain_at` answers `None`) — fails
/// with [`crate::Error::Confined`], and so do calls that act on every thread or on a whole
/// manager (process-wide rights, creating or dropping a manager). A second call narrows the
/// set (the intersection). Threads the confined thread creates, by any means, inherit its
/// set. Handles are no capability, so code that can forge calls into the library could
/// otherwise name any domain whose id it learns; confinement is what makes a thread unable to
/// reach domains it was not given, whatever code it runs (ARCHITECTURE.md, threat model).
/// Process-wide rights (set by unconfined threads) still reach confined threads: they are
/// the program's decision for every thread.
///
/// # Errors
///
/// [`crate::Error::Confined`] while the thread has a view open (Rust or C API): confine
/// first, then enter views; [`crate::Error::Reentrant`] from a signal handler that
/// interrupted the library.
pub fn confine<B: Backend>(domains: &[&Domain<B>]) -> Result<()> {
    let uids: Vec<u64> = domains.iter().map(|d| d.id().get()).collect();
    call::<[u64; 2], ()>(OP_CONFINE, [uids.as_ptr() as u64, uids.len() as u64])
}

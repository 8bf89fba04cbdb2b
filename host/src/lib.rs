//! mpkvirt-host: many tenant functions in one process, each in its own protection domain.
//!
//! Today the host reports what the machine offers ([`info`]): whether PKU is usable and why
//! not, which backend mpkvirt would run on, and how many keys it would get; it validates
//! tenants' shared objects before loading them ([`app::image`]) and links them
//! ([`app::native`]); it lends pooled instance slots ([`instance::pool`]); it runs green
//! threads ([`sched::green`]) and orders waiting invocations ([`sched::policy`]). The runtime (instances,
//! green-thread scheduling), system-call interposition and the HTTP front end are built on
//! top of these.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod heap;
pub mod info;
pub mod instance;
pub mod runtime;
pub mod sched;

//! The x86-64 Linux implementation of the machine-touching functions.
//!
//! Each file here is one concept and opts into `unsafe` for itself, with a `# Safety`
//! section saying why.

pub(crate) mod cpu;
pub(crate) mod membarrier;
pub(crate) mod pkey;
pub(crate) mod signal;
pub(crate) mod thread;

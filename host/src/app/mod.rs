//! Applications: what a tenant ships and what the host checks before it runs any of it.
//!
//! [`image`] validates a native shared object from its bytes alone (no code of it runs):
//! format, architecture, W^X, the instructions tenant code must not contain, the ABI symbols
//! of `include/mpkvirt_fn.h`, and the functions it imports. [`native`] links a validated
//! object and calls its entry through that ABI.

pub mod image;
pub mod native;

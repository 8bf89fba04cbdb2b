//! Scheduling tenant invocations.
//!
//! [`policy`] is the run queue's order, pure (no clock, no system call: time is an
//! argument), so property tests reach it directly. [`green`] is the green threads that run
//! what it hands out: stackful contexts switched at user level.

pub mod green;
pub mod policy;

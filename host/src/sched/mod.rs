//! Scheduling tenant invocations.
//!
//! [`policy`] is the run queue's order, pure (no clock, no system call: time is an
//! argument), so property tests reach it directly. The workers and green threads that run
//! what it hands out build on it.

pub mod policy;

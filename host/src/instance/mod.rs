//! Instances: where a tenant's invocation keeps its stack, heap and buffers.
//!
//! [`pool`] hands out pooled slots — one mpkvirt domain each, made once — so that starting an
//! invocation maps nothing: a slot is reused warm by the same application, and reset before
//! it serves another.

pub mod pool;

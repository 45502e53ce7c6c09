//! Model implementations and their caches.

pub mod kv_cache;
pub mod linear;
pub mod qwen2;

pub use kv_cache::KvCache;
pub use qwen2::{Logits, Qwen2};

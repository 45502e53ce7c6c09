//! Model implementations, their caches, and the sources their weights load from.

pub mod decode_attention;
pub mod kv_cache;
pub mod linear;
pub mod qwen2;
pub mod weights;

pub use kv_cache::KvCache;
pub use linear::{Linear, Weight};
pub use qwen2::{Logits, Qwen2};
pub use weights::{GgufFile, GgufWeights, SafetensorsWeights, WeightSource};

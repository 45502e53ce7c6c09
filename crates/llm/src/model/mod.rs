//! Model implementations, their caches, and the sources their weights load from. One decoder body
//! serves every architecture; each architecture's file holds its `config.json` type and what sets
//! it apart ([`qwen2`], [`llama`]).

pub mod decode_attention;
pub mod decoder;
pub(crate) mod ktiles;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mapped;
pub mod qwen2;
pub mod rms_norm;
pub(crate) mod tile_arena;
pub(crate) mod vexp;
pub mod weights;

pub use decoder::{CausalLm, Logits};
pub use kv_cache::{KvCache, KvFormat};
pub use linear::{Linear, Weight};
pub use weights::{GgufFile, GgufWeights, SafetensorsWeights, WeightSource};

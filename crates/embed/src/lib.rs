//! thinkrag-embed: sentence embeddings with BERT-family models (BAAI/bge-base-en-v1.5 by default,
//! bge-small-en-v1.5, all-MiniLM-L6-v2) on candle, loaded from a directory or the Hugging Face hub.
//!
//! Vectors are pooled as the model requires (CLS for BGE, mean for MiniLM), L2-normalised, computed
//! in padded batches under an attention mask (or, on CPUs with AMX tiles, with bf16 projections
//! over the batch's tokens packed without padding: see [`EmbedderPrecision`]); inputs over the
//! model's limit are cut and counted. BGE's query instruction goes on queries only.
//!
//! ```no_run
//! use thinkrag_embed::{Embedder, EmbedderOptions, EmbedderSource};
//!
//! # fn main() -> thinkrag_embed::Result<()> {
//! let embedder = Embedder::load(&EmbedderSource::parse("bge-small-en-v1.5")?, &EmbedderOptions::default())?;
//! let passages = embedder.embed_passages(&["Miami grew by 98,000 people."])?;
//! let query = embedder.embed_query("How fast is Miami growing?")?;
//! let score: f32 = passages.vectors[0].iter().zip(&query).map(|(a, b)| a * b).sum();
//! println!("cosine {score:.3}");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod bert;
pub mod embedder;
pub mod error;
pub mod manifest;
mod packed;
pub mod pooling;
pub mod reranker;
#[doc(hidden)]
pub mod test_models;

pub use embedder::{
    plan_batches, Embedded, Embedder, EmbedderOptions, EmbedderPrecision, EmbedderSource,
    EmbedderSpec, QueryInstruction,
};
pub use error::{EmbedError, Result};
pub use manifest::EmbedderManifest;
pub use packed::request_amx_tiles;
pub use pooling::Pooling;
pub use reranker::{Reranker, RerankerOptions};

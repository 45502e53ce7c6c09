//! thinkrag as a library: ingest a folder of PDFs, text and Markdown into a persistent vector index
//! (BGE embeddings, HNSW), search it, and answer questions over it with a local reasoning model
//! (DeepSeek-R1 distills), streaming the reasoning apart from the answer. The `thinkrag` command is
//! a thin layer over this crate; the parts are crates of their own (`thinkrag-embed`,
//! `thinkrag-ingest`, `thinkrag-index`, and the reasoning-model engine `thinkrag-llm`).
//!
//! Ingest, then ask:
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use thinkrag::embed::{Embedder, EmbedderOptions, EmbedderSource};
//! use thinkrag::{ingest, AskEvent, IngestOptions, Pipeline, StoreLocation};
//!
//! # fn main() -> thinkrag::Result<()> {
//! let embedder = Embedder::load(&EmbedderSource::parse("bge-base-en-v1.5")?, &EmbedderOptions::default())?;
//! // An index directory; `StoreLocation::parse("postgres://...", PgOptions::from_env())` for a
//! // PostgreSQL database that many thinkrag processes share.
//! let store = StoreLocation::Dir("my-index".into());
//! let report = ingest(&store, &["docs/".into()], &embedder, &IngestOptions::default(), &mut |_| {})?;
//! println!("{} chunks from {} files", report.chunks_added, report.files_indexed);
//!
//! let pipeline = Pipeline::builder()
//!     .index("my-index")
//!     .model("deepseek-r1-distill-qwen-1.5b")
//!     .k(4)
//!     .build()?;
//! let answer = pipeline.ask("What changed in 2023?", &mut |ev| {
//!     match ev {
//!         AskEvent::Reasoning(t) => eprint!("{t}"),
//!         AskEvent::Answer(t) => print!("{t}"),
//!         _ => {}
//!     }
//!     ControlFlow::Continue(())
//! })?;
//! for s in &answer.prompt.sources {
//!     let cited = if answer.citations.contains(&s.number) { " (cited)" } else { "" };
//!     println!("[{}] {:.3} {} {:?}{cited}", s.number, s.hit.score, s.hit.source, s.hit.page);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Search alone (by embeddings; `SearchMode::Lexical` for BM25 over the words, `Hybrid` for both),
//! optionally only in some documents or pages (`SearchOptions::filter`):
//!
//! ```no_run
//! # use thinkrag::embed::{Embedder, EmbedderOptions, EmbedderSource};
//! # use thinkrag::index::SearchMode;
//! # use thinkrag::{SearchOptions, StoreLocation};
//! # fn main() -> thinkrag::Result<()> {
//! # let embedder = Embedder::load(&EmbedderSource::parse("bge-base-en-v1.5")?, &EmbedderOptions::default())?;
//! let store = StoreLocation::Dir("my-index".into()).open()?;
//! let opts = SearchOptions::new(3, SearchMode::Hybrid);
//! for hit in thinkrag::search(store.as_ref(), &embedder, "What changed in 2023?", &opts)? {
//!     println!("{:.3} {} p.{:?}: {}", hit.score, hit.source, hit.page, hit.text);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod eval;
pub mod json;
pub mod pipeline;
pub mod prompt;
pub mod retrieval;
pub mod store;

pub use error::{Error, Result};
pub use pipeline::{
    Answer, AskEvent, AskOptions, AskTimings, Chat, Pipeline, PipelineBuilder, Retriever,
};
pub use prompt::{BuiltPrompt, LeftOut, PromptOptions, PromptSource, SourceField};
pub use retrieval::{
    chunker, default_index_dir, embedder_info, ingest, open_index, rerank, search, search_reranked,
    Chunking, FailureReport, IngestEvent, IngestOptions, IngestReport, SearchHit, SearchOptions,
};
pub use store::{copy, CopyReport, StoreLocation};
/// The embedding models.
pub use thinkrag_embed as embed;
/// The vector index.
pub use thinkrag_index as index;
/// Reading documents.
pub use thinkrag_ingest as documents;
/// The reasoning-model engine.
pub use thinkrag_llm as llm;
/// The PostgreSQL store.
pub use thinkrag_pgstore as pgstore;

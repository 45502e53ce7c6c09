//! Reading a user's documents (PDF, plain text, Markdown) into pages and chunks for
//! embedding: [`discover`] finds the files, [`load_document`] extracts their pages without
//! panicking on damaged input, and [`Chunker`] cuts pages into embedding-sized chunks.
//!
//! ```no_run
//! use std::path::PathBuf;
//! use thinkrag_ingest::{discover, load_document, Chunker};
//!
//! let (files, mut failures) = discover(&[PathBuf::from("docs")]);
//! let chunker = Chunker::chars(512, 30).expect("valid sizes");
//! for file in files {
//!     match load_document(&file) {
//!         Ok(doc) => {
//!             failures.extend(doc.page_failures.iter().cloned());
//!             for chunk in chunker.chunk(&doc) {
//!                 println!("{:?} {}", chunk.page, chunk.text);
//!             }
//!         }
//!         Err(failure) => failures.push(failure),
//!     }
//! }
//! for failure in failures {
//!     eprintln!("skipped {failure}");
//! }
//! ```

#![warn(missing_docs)]

mod chunk;
mod discover;
mod document;
mod failure;
mod isolate;
mod pdf;
mod recover;
#[doc(hidden)]
pub mod test_pdfs;

pub use chunk::{Chunk, ChunkError, ChunkSize, Chunker};
pub use discover::discover;
pub use document::{file_hash, load_document, load_document_bytes, Document, DocumentKind, Page};
pub use failure::{Failure, FailureReason};
pub use isolate::{read_document_for_parent, FileLimits, Isolation};
pub use pdf::quiet_parser_panics;

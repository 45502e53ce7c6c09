//! Typed errors of the index crate.
//! Every message names the file, directory or value at fault and says what the user can do about it.

use std::path::PathBuf;

use crate::EmbedderInfo;

/// Everything that can go wrong while building, searching, saving or opening an index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// There is no index in the directory (no manifest).
    #[error("no index found in {dir}; ingest documents to build one")]
    NotFound {
        /// The directory that was searched.
        dir: PathBuf,
    },

    /// The index was written by a newer version of thinkrag than this one.
    #[error(
        "the index at {path} was built by a newer thinkrag (format {found}, this build reads up to {supported}); upgrade thinkrag"
    )]
    NewerFormat {
        /// The manifest file.
        path: PathBuf,
        /// The format version found in the manifest.
        found: u64,
        /// The newest format version this build understands.
        supported: u64,
    },

    /// A file of the index is unreadable, truncated or inconsistent with the manifest.
    #[error("index file {path} is corrupt: {message}; re-ingest into a fresh index directory")]
    Corrupt {
        /// The file (or directory) at fault.
        path: PathBuf,
        /// What exactly is wrong with it.
        message: String,
    },

    /// The lexical (BM25) index could not be built or searched.
    #[error("lexical search failed: {message}")]
    Lexical {
        /// What tantivy reported, and what was being done.
        message: String,
    },

    /// The index was built by another embedder than the one requested.
    #[error(
        "the index was built with embedder {index_model} (dim {index_dim}, {index_pooling} pooling), but {wanted_model} (dim {wanted_dim}, {wanted_pooling} pooling) was requested; re-ingest into a new index directory or use embedder {index_model}",
        index_model = index.model, index_dim = index.dim, index_pooling = index.pooling,
        wanted_model = wanted.model, wanted_dim = wanted.dim, wanted_pooling = wanted.pooling
    )]
    EmbedderMismatch {
        /// The embedder recorded in the index.
        index: Box<EmbedderInfo>,
        /// The embedder the caller wants to use.
        wanted: Box<EmbedderInfo>,
    },

    /// A vector (stored or query) has the wrong number of components.
    #[error(
        "{what} has {found} dimensions but the index holds {expected}-dimensional vectors; embed it with the index's embedder"
    )]
    DimensionMismatch {
        /// Which vector is at fault, e.g. "query" or "vector 3 of doc.pdf".
        what: String,
        /// The dimension the index expects.
        expected: usize,
        /// The dimension that was given.
        found: usize,
    },

    /// A vector contains NaN or infinity, or is all zeros (so it has no direction).
    #[error("{what} is not a usable embedding: {reason}; check the embedder's output")]
    InvalidVector {
        /// Which vector is at fault.
        what: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The number of vectors passed does not match the number of chunks.
    #[error(
        "document {source_path}: {chunks} chunks but {vectors} vectors; pass exactly one vector per chunk"
    )]
    LengthMismatch {
        /// The document being upserted.
        source_path: String,
        /// Number of chunks given.
        chunks: usize,
        /// Number of vectors given.
        vectors: usize,
    },

    /// HNSW parameters the graph cannot work with.
    #[error("invalid HNSW parameters: {0}")]
    InvalidParams(String),

    /// Another process saved the index after this one opened it; saving would discard its work.
    #[error(
        "the index in {dir} was changed by another thinkrag process (now at {found}, opened at {opened}); re-open it and run again"
    )]
    Conflict {
        /// The index directory.
        dir: PathBuf,
        /// The generation this index was opened from.
        opened: String,
        /// The generation currently on disk.
        found: String,
    },

    /// The HNSW graph could not be written.
    #[error("could not write the HNSW graph to {path}: {message}; check free disk space and permissions")]
    GraphDump {
        /// Directory the graph was written to.
        path: PathBuf,
        /// What went wrong (the operating system's error).
        message: String,
    },

    /// An operating-system I/O error on a file of the index.
    #[error("I/O error on {path}: {source}; check the path, free disk space and permissions")]
    Io {
        /// The file or directory being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl IndexError {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IndexError::Io {
            path: path.into(),
            source,
        }
    }

    /// A corruption error for `path`.
    pub(crate) fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        IndexError::Corrupt {
            path: path.into(),
            message: message.into(),
        }
    }
}

//! Typed errors of the document store. Each names the collection, document, file or value at
//! fault; the server words them in its clients' error shapes.

use std::path::PathBuf;

/// What went wrong in the document store.
#[derive(Debug, thiserror::Error)]
pub enum DocStoreError {
    /// A collection name that cannot be a directory (or an OpenSearch index) name.
    #[error("invalid collection name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What rule it breaks.
        reason: String,
    },
    /// The collection exists already.
    #[error("collection {name:?} already exists")]
    AlreadyExists {
        /// Its name.
        name: String,
    },
    /// No such collection.
    #[error("no collection {name:?}")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// A vector field's dimension differs from the embedder's.
    #[error(
        "field {field:?} of collection {name:?} is declared with dimension {declared}, but the \
         embedder {embedder} makes vectors of dimension {dim}"
    )]
    DimensionMismatch {
        /// The collection.
        name: String,
        /// The vector field.
        field: String,
        /// The dimension the mapping declares.
        declared: u64,
        /// The embedder's name.
        embedder: String,
        /// The embedder's dimension.
        dim: usize,
    },
    /// A file of the store could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot write", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file of the store holds something this build cannot read.
    #[error(
        "{path} line {line} is damaged ({reason}); the documents it holds were acknowledged, so \
         nothing was discarded: move the file aside to open the collection without them"
    )]
    CorruptLog {
        /// The log file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A metadata file is damaged.
    #[error("{path} is damaged: {reason}")]
    CorruptMeta {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The vector index failed.
    #[error(transparent)]
    Index(#[from] thinkrag_index::IndexError),
    /// The embedder failed.
    #[error(transparent)]
    Embed(#[from] thinkrag_embed::EmbedError),
    /// Chunking failed.
    #[error(transparent)]
    Chunk(#[from] thinkrag_ingest::ChunkError),
    /// The library failed.
    #[error(transparent)]
    Thinkrag(#[from] thinkrag::Error),
}

impl DocStoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// The store's result type.
pub type Result<T, E = DocStoreError> = std::result::Result<T, E>;

//! The library's error type: the failures of its parts (embedding, reading documents, the index),
//! each worded for the user with what to do.

/// Everything that can stop an ingestion or a search.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedding model.
    #[error(transparent)]
    Embed(#[from] thinkrag_embed::EmbedError),
    /// The index.
    #[error(transparent)]
    Index(#[from] thinkrag_index::IndexError),
    /// The chunk store (an index directory or PostgreSQL).
    #[error(transparent)]
    Store(thinkrag_index::StoreError),
    /// The language model.
    #[error(transparent)]
    Llm(#[from] thinkrag_llm::Error),
    /// The question (with the earlier turns) leaves no room in the context window.
    #[error(
        "the question takes {prompt_tokens} tokens of the prompt, but the context window of \
         {window} tokens keeps {reserve} for the answer: shorten the question, allow fewer answer \
         tokens or use a larger context window"
    )]
    PromptTooLong {
        /// Tokens of the prompt without any source.
        prompt_tokens: usize,
        /// The model's context window.
        window: usize,
        /// Tokens kept for the answer.
        reserve: usize,
    },
    /// Chunking settings.
    #[error(transparent)]
    Chunk(#[from] thinkrag_ingest::ChunkError),
    /// A setting outside its valid range.
    #[error("invalid {name} = {value}: {expected}")]
    InvalidParameter {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: String,
        /// The valid range.
        expected: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// There is no store to search.
    #[error("no index at {location}: ingest documents into it first")]
    NoIndex {
        /// Where it was looked for (a directory, or a URL without its password).
        location: String,
    },
    /// The store holds no chunks.
    #[error("the index at {location} is empty: ingest documents into it first")]
    EmptyIndex {
        /// The store's location.
        location: String,
    },
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<thinkrag_index::StoreError> for Error {
    /// The in-process index's errors stay [`Error::Index`], so callers match them in one place.
    fn from(e: thinkrag_index::StoreError) -> Self {
        match e {
            thinkrag_index::StoreError::Index(ix) => Error::Index(ix),
            other => Error::Store(other),
        }
    }
}

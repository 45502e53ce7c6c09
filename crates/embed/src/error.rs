//! The embedder's error type: each failure names the file or model at fault and what to do.

use std::path::PathBuf;

/// Everything that can go wrong while loading an embedding model or embedding text.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A model directory lacks a file the embedder needs.
    #[error("{dir} has no {file}: {hint}")]
    MissingFile {
        /// The model directory.
        dir: PathBuf,
        /// The missing file.
        file: String,
        /// What to do.
        hint: String,
    },
    /// A JSON or TOML file could not be parsed.
    #[error("{path} is not valid {format}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// "JSON", "TOML", ...
        format: &'static str,
        /// The parser's message.
        message: String,
    },
    /// The model is not one this embedder runs.
    #[error("unsupported embedding model {model}: {message}")]
    Unsupported {
        /// The model.
        model: String,
        /// What is unsupported and what to do.
        message: String,
    },
    /// The weights file is truncated, corrupt or of another shape than config.json says.
    #[error("weights in {path} are unusable: {message}. The file may be truncated or corrupt: delete it and download it again")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer cannot be loaded or used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model could not be found or downloaded.
    #[error(transparent)]
    Hub(#[from] thinkrag_hub::HubError),
    /// The model name is none of the accepted forms.
    #[error("{spec}: {message}")]
    UnknownModel {
        /// What the user named.
        spec: String,
        /// The accepted forms.
        message: String,
    },
    /// A computation failed on the device.
    #[error("embedding failed: {0}")]
    Compute(#[from] candle_core::Error),
}

/// The embedder's result type.
pub type Result<T> = std::result::Result<T, EmbedError>;

impl EmbedError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

//! The engine's error type: every failure a caller can meet, each naming the thing at fault and
//! what to do about it, so a CLI can print it as is.

use std::path::PathBuf;

/// Everything that can go wrong while loading a model or generating text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that should be read could not be.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written (a GGUF export, random weights).
    #[error("cannot write {path}: {cause}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why (named `cause`, not `source`, so that error chains print it once).
        cause: std::io::Error,
    },
    /// A model directory lacks a file the engine needs.
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
    /// The model's configuration asks for something this engine does not run.
    #[error("unsupported model in {path}: {message}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// What is unsupported.
        message: String,
    },
    /// A weights file is truncated, corrupt, or lacks a tensor of the expected shape.
    #[error("weights in {path} are unusable: {message}. The file may be truncated or corrupt: delete it and download it again")]
    Weights {
        /// The weights file (or directory, for sharded weights).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer cannot be loaded or does not belong to the model.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The chat template cannot be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A model could not be found locally or fetched from the hub.
    #[error("model {model}: {message}")]
    Hub {
        /// The manifest name or repo id.
        model: String,
        /// What failed and what to do.
        message: String,
    },
    /// A generation or loading parameter is outside its valid range.
    #[error("invalid {name} = {value}: {expected}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// The value given.
        value: String,
        /// The valid range.
        expected: String,
    },
    /// The prompt does not fit the model's context window.
    #[error("the prompt is {prompt_tokens} tokens but the context window is {context_window}: shorten the prompt (or raise the context size up to the model's maximum)")]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The context window.
        context_window: usize,
    },
    /// The requested device is unavailable.
    #[error("device {device}: {message}")]
    Device {
        /// The device asked for.
        device: String,
        /// Why it cannot be used.
        message: String,
    },
    /// The scheduler's queue of waiting requests is full: try again later.
    #[error("{waiting} requests are already waiting (the queue holds {limit}): try again later")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
        /// The queue's length limit.
        limit: usize,
    },
    /// The model needs more memory than the machine has available.
    #[error("{what} needs {needed_gb:.1} GB of memory but {available_gb:.1} GB is available: use a smaller model or quantization, or a machine with more memory")]
    OutOfMemory {
        /// What needs it.
        what: String,
        /// Gigabytes (10^9 bytes) it needs.
        needed_gb: f64,
        /// Gigabytes the system reports available (`MemAvailable`).
        available_gb: f64,
    },
    /// The scheduler is shutting down and takes no new requests.
    #[error("the engine is shutting down and takes no new requests")]
    ShuttingDown,
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Write {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn invalid(
        name: &'static str,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        Error::InvalidParameter {
            name,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

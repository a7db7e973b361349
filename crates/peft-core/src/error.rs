//! The crate's error type.

use std::path::PathBuf;

use peft_io::CheckpointError;

/// Everything that can go wrong while building, attaching, switching, saving or loading adapters.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// An adapter configuration value is invalid.
    #[error("invalid adapter configuration: {0}")]
    Config(String),
    /// The adapter does not fit the model it is attached to.
    #[error("adapter does not fit the model: {0}")]
    Incompatible(String),
    /// No adapter of that name is loaded.
    #[error("no adapter named `{name}` is loaded (loaded: {loaded:?})")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names loaded.
        loaded: Vec<String>,
    },
    /// An operation that a merged LoRA forbids.
    #[error("adapter `{0}` is merged into the base weights: unmerge it first")]
    Merged(String),
    /// The method cannot do what was asked (e.g. merging prefix tuning).
    #[error("{0}")]
    Unsupported(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An adapter file is malformed or does not match its configuration.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key where there is one.
        message: String,
    },
    /// A tensor file could not be read: missing, unexpected, mis-shaped or non-finite tensors,
    /// an unreadable or hostile file.
    #[error(transparent)]
    Checkpoint(CheckpointError),
    /// An error from the base model (its forward pass, its tokenizer).
    #[error(transparent)]
    Model(Box<dyn std::error::Error + Send + Sync>),
}

impl From<CheckpointError> for PeftError {
    /// I/O errors and malformed JSON keep the variants this crate has always given them.
    fn from(error: CheckpointError) -> Self {
        match error {
            CheckpointError::Io { path, source } => Self::Io { path, source },
            CheckpointError::Json { path, message } => Self::Format {
                path,
                message: format!("malformed JSON: {message}"),
            },
            other => Self::Checkpoint(other),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

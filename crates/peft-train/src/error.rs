//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

use peft_llama::LlamaError;

/// Where in a dataset file a record sits, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLocation {
    /// The 0-based index of the element in a JSON array.
    Index(usize),
    /// The 1-based line of a JSON Lines file.
    Line(usize),
}

impl fmt::Display for RecordLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Index(index) => write!(f, "record {index}"),
            Self::Line(line) => write!(f, "line {line}"),
        }
    }
}

/// Everything that can go wrong while reading data, batching, computing the loss or stepping
/// the optimiser.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset file is not valid UTF-8.
    #[error("{path}: not valid UTF-8 (first invalid byte at offset {offset})")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// A dataset file is not well-formed JSON (or a JSON Lines line is not).
    #[error("{path}: malformed JSON at {location}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Line and column (or the JSON Lines line).
        location: String,
        /// What the parser said.
        message: String,
    },
    /// A record parses as JSON but is not a valid record (missing field, wrong type, bad id).
    #[error("{path}: {location}: {message}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The record index or line.
        location: RecordLocation,
        /// What is wrong.
        message: String,
    },
    /// A dataset holds no records.
    #[error("{path}: the dataset holds no records")]
    EmptyDataset {
        /// The file.
        path: PathBuf,
    },
    /// The tokenizer failed.
    #[error("tokenizing {what}: {source}")]
    Tokenizer {
        /// What was being tokenized (e.g. "record 17").
        what: String,
        /// The tokenizer's error.
        #[source]
        source: LlamaError,
    },
    /// A setting is out of range or inconsistent with the data.
    #[error("invalid setting `{setting}`: {message}")]
    Config {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Inputs to the loss or to batching do not fit together.
    #[error("{what}: {message}")]
    Input {
        /// The operation (e.g. "causal_lm_loss").
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The model failed (loading, forward pass).
    #[error(transparent)]
    Model(#[from] LlamaError),
    /// An adapter operation failed (saving, loading, shapes).
    #[error(transparent)]
    Adapter(#[from] peft_core::PeftError),
    /// The loss or the gradients became NaN or infinite; training stopped.
    #[error("the loss became non-finite ({loss}) at step {step}; training stopped. {}", match checkpoint {
        Some(name) => format!("The last good checkpoint, {name}, is kept; lower the learning rate or check the data, then resume with --resume."),
        None => "No checkpoint had been written yet.".to_string(),
    })]
    NonFiniteLoss {
        /// Optimiser steps completed before the failure.
        step: usize,
        /// The offending value.
        loss: f64,
        /// The newest checkpoint on disk.
        checkpoint: Option<String>,
    },
    /// The loss function given to [`crate::fit()`] failed.
    #[error("step {step}: the loss function failed: {source}")]
    Loss {
        /// Optimiser steps completed before the failure.
        step: usize,
        /// What the loss function returned.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Data-parallel training failed: a replica's error, a stopped replica, the collective.
    #[error("data-parallel training: {message}")]
    DataParallel {
        /// What went wrong, naming the replica where known.
        message: String,
    },
    /// A checkpoint is unreadable or inconsistent.
    #[error("{path}: checkpoint: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Saved optimiser state does not match the module it is loaded for.
    #[error("optimizer state for parameter `{path}`: {message}")]
    OptimizerState {
        /// The parameter's module path (e.g. `layers.3.gate`).
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl From<peft_io::CheckpointError> for TrainError {
    fn from(error: peft_io::CheckpointError) -> Self {
        Self::Adapter(error.into())
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub(crate) fn config(setting: &'static str, message: impl Into<String>) -> Self {
        Self::Config {
            setting,
            message: message.into(),
        }
    }

    pub(crate) fn parallel(message: impl Into<String>) -> Self {
        Self::DataParallel {
            message: message.into(),
        }
    }

    pub(crate) fn input(what: &'static str, message: impl Into<String>) -> Self {
        Self::Input {
            what,
            message: message.into(),
        }
    }

    pub(crate) fn record(
        path: &std::path::Path,
        location: RecordLocation,
        message: impl Into<String>,
    ) -> Self {
        Self::Record {
            path: path.to_path_buf(),
            location,
            message: message.into(),
        }
    }
}

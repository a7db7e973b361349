//! The crate's error type.

use std::path::PathBuf;

use peft_core::PeftError;
use peft_llama::LlamaError;

/// Everything that can go wrong while loading a vision tower, reading images or building,
/// running, saving or loading a multimodal adapter.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// A configuration value is invalid or missing.
    #[error("{origin}: {message}")]
    Config {
        /// The file or setting the value came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An image file could not be decoded.
    #[error("{path}: cannot decode the image: {message}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// A tensor given to a forward pass has the wrong shape.
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Which input.
        what: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// A weight file is malformed, or a tensor is missing, unexpected or mis-shaped.
    #[error(transparent)]
    Weights(#[from] LlamaError),
    /// An error from the adapter crate.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// A multimodal adapter file is malformed.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key where there is one.
        message: String,
    },
}

impl VisionError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = VisionError> = std::result::Result<T, E>;

impl From<peft_io::CheckpointError> for VisionError {
    /// A checkpoint error is a weight error, as it was when the readers lived in `peft-llama`.
    fn from(error: peft_io::CheckpointError) -> Self {
        Self::Weights(error.into())
    }
}

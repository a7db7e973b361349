//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing a checkpoint or adapter file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{path}: malformed JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        message: String,
    },
    /// A weight file is unreadable (truncated, corrupt header, unsupported dtype, a pickle that
    /// refers to anything but tensors).
    #[error("{path}: unreadable weight file: {message}")]
    WeightFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor a loader needs is not in the checkpoint.
    #[error("{origin}: missing tensor '{key}' (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint.
        origin: String,
        /// The tensor name as stored in the checkpoint.
        key: String,
        /// The shape the loader expects.
        expected: Vec<usize>,
    },
    /// The checkpoint holds tensors the loader has no place for.
    #[error("{origin}: unexpected tensor(s) not used by this model: {keys:?}")]
    UnexpectedTensors {
        /// The checkpoint.
        origin: String,
        /// The names, sorted.
        keys: Vec<String>,
    },
    /// A tensor has the wrong shape.
    #[error("{origin}: tensor '{key}' has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// The checkpoint.
        origin: String,
        /// The tensor name.
        key: String,
        /// The shape the loader expects.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinite values.
    #[error("{origin}: tensor '{key}' contains non-finite values (NaN or infinity)")]
    NonFinite {
        /// The checkpoint.
        origin: String,
        /// The tensor name.
        key: String,
    },
    /// Tensors handed to a writer do not describe a valid file (a shape that does not match the
    /// number of values, a name given twice).
    #[error("{path}: {message}")]
    Format {
        /// The file being written.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        message: String,
    },
    /// A matrix cannot be quantized or held in a quantized format (wrong shape for the format's
    /// blocks, non-finite values, a format that cannot be produced).
    #[error("quantization: {0}")]
    Quantization(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

impl CheckpointError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

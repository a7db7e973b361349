//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading or running a LLaMA.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, index, tokenizer settings) could not be parsed.
    #[error("{path}: malformed JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A configuration value is missing, unsupported or inconsistent.
    #[error("invalid model configuration ({origin}): {message}")]
    Config {
        /// Where the configuration came from (a path or a preset name).
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A weight file is unreadable (truncated, corrupt header, unsupported dtype).
    #[error("{path}: unreadable weight file: {message}")]
    WeightFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{origin}: missing tensor '{key}' (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint.
        origin: String,
        /// The tensor name as stored in the checkpoint format.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// The checkpoint holds tensors the model has no place for.
    #[error("{origin}: unexpected tensor(s) not used by this model: {keys:?}")]
    UnexpectedTensors {
        /// The checkpoint.
        origin: String,
        /// The names, sorted.
        keys: Vec<String>,
    },
    /// A tensor has the wrong shape for the configured model.
    #[error("{origin}: tensor '{key}' has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// The checkpoint.
        origin: String,
        /// The tensor name.
        key: String,
        /// The shape the model expects.
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
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Input to a forward pass or generation is unusable.
    #[error("invalid input: {0}")]
    Input(String),
    /// A chat template that does not parse or fails while rendering.
    #[error("chat template ({origin}): {message}")]
    Template {
        /// Where the template came from.
        origin: String,
        /// What the template engine said.
        message: String,
    },
    /// Weights that cannot be quantized or held quantized, or an operation a quantized base
    /// does not support.
    #[error("quantization: {0}")]
    Quantization(String),
}

impl From<peft_io::CheckpointError> for LlamaError {
    /// Each checkpoint error keeps the variant of the same name.
    fn from(error: peft_io::CheckpointError) -> Self {
        use peft_io::CheckpointError as E;
        match error {
            E::Io { path, source } => Self::Io { path, source },
            E::Json { path, message } => Self::Json { path, message },
            E::WeightFile { path, message } | E::Format { path, message } => {
                Self::WeightFile { path, message }
            }
            E::MissingTensor {
                origin,
                key,
                expected,
            } => Self::MissingTensor {
                origin,
                key,
                expected,
            },
            E::UnexpectedTensors { origin, keys } => Self::UnexpectedTensors { origin, keys },
            E::ShapeMismatch {
                origin,
                key,
                expected,
                found,
            } => Self::ShapeMismatch {
                origin,
                key,
                expected,
                found,
            },
            E::NonFinite { origin, key } => Self::NonFinite { origin, key },
            E::Quantization(message) => Self::Quantization(message),
        }
    }
}

impl From<LlamaError> for peft_core::PeftError {
    fn from(error: LlamaError) -> Self {
        Self::Model(Box::new(error))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = LlamaError> = std::result::Result<T, E>;

impl LlamaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            origin: origin.into(),
            message: message.into(),
        }
    }
}

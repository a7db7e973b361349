//! Checkpoint and adapter file I/O shared by every peft-rs crate: reading safetensors and PyTorch
//! `.pth` state dicts into a [`TensorMap`] (a `.pth` is checked opcode by opcode before anything
//! reads it, see [`pickle_check`]), writing `.pth` files that `torch.load(weights_only=True)`
//! reads ([`torch_pickle`]), and atomic file replacement ([`files`]).
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("peft-io-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! use peft_io::{NamedTensor, TensorMap};
//! let path = dir.join("adapter.pth");
//! let tensor = NamedTensor { key: "gate".into(), shape: vec![2], values: vec![0.5, -1.0] };
//! peft_io::files::write_atomic(&path, &peft_io::torch_pickle::state_dict_bytes(&[tensor], &path)?)?;
//! let mut tensors = TensorMap::new("adapter.pth");
//! tensors.add_pth(&path)?;
//! assert_eq!(tensors.take_f32("gate", &[2])?, vec![0.5, -1.0]);
//! tensors.finish()?; // nothing left over
//! # Ok::<(), peft_io::CheckpointError>(())
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod files;
pub mod gguf;
pub mod pickle_check;
pub mod quant;
pub mod scratch;
pub mod tensor_map;
pub mod threads;
pub mod torch_pickle;

pub use error::{CheckpointError, Result};
pub use tensor_map::{transpose, TensorMap};

/// A tensor on the host under the name a file format gives it, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The key, e.g. `base_model.model.model.layers.3.self_attn.adaption_prompt`.
    pub key: String,
    /// Shape as the format stores it.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Vec<f32>,
}

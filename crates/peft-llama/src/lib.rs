//! LLaMA in Burn, with insertion hooks for parameter-efficient adapters.
//!
//! ```no_run
//! use peft_llama::{Llama, LlamaLoader, NoHooks, TokenBatch};
//! # type B = burn::backend::NdArray;
//! let device = Default::default();
//! let model: Llama<B> = LlamaLoader::new("models/stories260k").load(&device)?;
//! let tokens = TokenBatch::from_rows(&[vec![1, 403, 407]])?;
//! let logits = model.forward(&tokens, &NoHooks, None)?; // [1, 3, vocab]
//! # Ok::<(), peft_llama::LlamaError>(())
//! ```
#![warn(missing_docs)]

pub mod blocks;
pub mod cache;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cublas;
pub mod error;
pub mod generate;
pub mod hooks;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod model;
pub mod pickle_check;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use config::{Llama3RopeScaling, LlamaConfig};
pub use error::{LlamaError, Result};
pub use generate::{generate, Generation, GenerationConfig};
pub use hooks::{LayerHooks, NoHooks, Projection};
pub use model::{Attention, DecoderLayer, Llama, Mlp, RmsNorm, TokenBatch};
pub use rope::RotaryEmbedding;
pub use tokenizer::LlamaTokenizer;
pub use weights::{LlamaLoader, WeightDtype};

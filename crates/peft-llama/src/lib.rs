//! LLaMA in Burn, adaptable by every method of `peft-core` (see [`adaptable`]).
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

pub mod adaptable;
pub mod cache;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod rope;
pub mod tokenizer;
pub mod tokens;
pub mod weights;

pub use adaptable::{PeftLlama, PrefixFromTokens, LAYERS_PATH};
pub use cache::KvCache;
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Family, Llama3RopeScaling, LlamaConfig};
pub use error::{LlamaError, Result};
pub use generate::{generate, Generation, GenerationConfig};
pub use model::{Attention, DecoderLayer, Llama, Mlp, RmsNorm, TokenBatch};
pub use peft_core::{LayerHooks, NoHooks};
pub use peft_ops::quant::{FrozenLinear, QuantFormat};
pub use rope::RotaryEmbedding;
pub use tokenizer::LlamaTokenizer;
pub use weights::{LlamaLoader, Quantization, WeightDtype};

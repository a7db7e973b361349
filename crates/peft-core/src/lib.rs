//! Parameter-efficient fine-tuning for LLaMA models in Burn.
//!
//! Three methods behind one [`Adapter`] trait:
//! - [`AdaptionPrompt`]: LLaMA-Adapter's zero-initialised gated adaption prompts,
//! - [`Lora`]: low-rank adaptation of linear layers,
//! - [`PrefixTuning`]: learned key/value prefixes.
//!
//! ```no_run
//! use peft_core::{Adapter, AdaptionPromptConfig};
//! use peft_llama::{LlamaLoader, TokenBatch};
//! # type B = burn::backend::NdArray;
//! let device = Default::default();
//! let base = LlamaLoader::new("models/stories260k").load::<B>(&device)?;
//! let adapter = AdaptionPromptConfig::new()
//!     .with_adapter_len(10)
//!     .with_adapter_layers(3)
//!     .init::<B>(&base.config, &device)?;
//! let tokens = TokenBatch::from_rows(&[vec![1, 403, 407]])?;
//! // Gates start at zero: these logits equal the base model's.
//! let logits = base.forward(&tokens, adapter.hooks(&base).as_ref(), None)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod adapter_files;
pub mod adaption_prompt;
pub mod any_adapter;
pub mod error;
pub mod files;
pub mod lora;
pub mod native_format;
pub mod official_format;
pub mod peft_format;
pub mod peft_model;
pub mod prefix;
pub mod torch_pickle;

pub use adapter::{gradients_as_module, host_values, Adapter, NamedTensor, PeftMethod, Randomise};
pub use adapter_files::{detect_format, load_adapter, save_adapter, AdapterFormat};
pub use adaption_prompt::{
    AdaptionPrompt, AdaptionPromptConfig, GateActivation, GateInit, GateShape,
};
pub use any_adapter::AnyAdapter;
pub use error::{PeftError, Result};
pub use lora::{Lora, LoraConfig, LoraLinear};
pub use peft_model::PeftModel;
pub use prefix::{PrefixProjection, PrefixTuning, PrefixTuningConfig};

//! Parameter-efficient fine-tuning for any Burn model.
//!
//! Three methods behind one [`Adapter`] trait:
//! - [`AdaptionPrompt`]: LLaMA-Adapter's zero-initialised gated adaption prompts,
//! - [`Lora`]: low-rank adaptation of linear layers, chosen by module path ([`TargetModules`]),
//! - [`PrefixTuning`]: learned key/value prefixes.
//!
//! They attach to any model that implements [`AdaptableModel`] (its sizes, its linear sites by
//! module path, its attention's key/value projections) and calls [`LayerHooks`] in its forward
//! pass: `peft-llama`'s LLaMA-family decoders, `peft-vision`'s CLIP tower, or a model of one's
//! own. Adapters save as Hugging Face PEFT directories ([`save_adapter`]) that Python's `peft`
//! loads onto the same model.
//!
//! ```ignore
//! // With a LLaMA from `peft-llama` (which depends on this crate):
//! let base = peft_llama::LlamaLoader::new("models/stories260k").load::<B>(&device)?;
//! let adapter = peft_core::LoraConfig::new().init::<B>(&base, &device)?;
//! let logits = base.forward(&tokens, adapter.hooks(&base).as_ref(), None)?;
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod adapter_files;
pub mod adaption_prompt;
pub mod any_adapter;
pub mod error;
pub mod hooks;
pub mod lora;
pub mod model;
pub mod native_format;
pub mod official_format;
pub mod peft_format;
pub mod peft_model;
pub mod prefix;
pub mod targets;
#[cfg(test)]
mod testing;

pub use adapter::{gradients_as_module, host_values, Adapter, NamedTensor, PeftMethod, Randomise};
pub use adapter_files::{detect_format, load_adapter, save_adapter, AdapterFormat, LoadOptions};
pub use adaption_prompt::{
    AdaptionPrompt, AdaptionPromptConfig, GateActivation, GateInit, GateShape,
};
pub use any_adapter::{load_native, load_peft, AnyAdapter};
pub use error::{PeftError, Result};
pub use hooks::{Features, LayerHooks, NoHooks, Site};
pub use lora::{Lora, LoraConfig, LoraLinear};
pub use model::{AdaptableModel, InsertionPoint, LinearSite, ModelGeometry};
pub use native_format::{load_native_as, save_native, NativeAdapter, NativeConfig};
pub use peft_format::{load_peft_as, save_peft, FromPeft, PeftConfigFile};
pub use peft_io::TensorMap;
pub use peft_model::PeftModel;
pub use prefix::{PrefixProjection, PrefixTuning, PrefixTuningConfig};
pub use targets::TargetModules;

/// What a program adapting a model needs in scope.
pub mod prelude {
    pub use crate::{
        load_adapter, load_peft_as, save_adapter, save_peft, AdaptableModel, Adapter,
        AdaptionPromptConfig, AnyAdapter, FromPeft, InsertionPoint, LayerHooks, LinearSite,
        LoadOptions, LoraConfig, ModelGeometry, NoHooks, PeftModel, PrefixTuningConfig, Site,
        TargetModules,
    };
}

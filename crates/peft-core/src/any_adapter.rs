//! An adapter of any method, for code that decides the method at run time (files, the CLI).

use burn::tensor::backend::Backend;
use peft_llama::{LayerHooks, Llama, LlamaConfig};

use crate::adapter::{Adapter, NamedTensor, PeftMethod};
use crate::adaption_prompt::AdaptionPrompt;
use crate::error::Result;
use crate::lora::Lora;
use crate::prefix::PrefixTuning;

/// One adapter of any of the three methods.
// The variants hold a few tensor handles each and an adapter lives for a whole run: boxing would
// only add an indirection to every call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum AnyAdapter<B: Backend> {
    /// LoRA.
    Lora(Lora<B>),
    /// Prefix tuning.
    PrefixTuning(PrefixTuning<B>),
    /// LLaMA-Adapter adaption prompts.
    AdaptionPrompt(AdaptionPrompt<B>),
}

macro_rules! delegate {
    ($self:ident, $adapter:ident => $body:expr) => {
        match $self {
            AnyAdapter::Lora($adapter) => $body,
            AnyAdapter::PrefixTuning($adapter) => $body,
            AnyAdapter::AdaptionPrompt($adapter) => $body,
        }
    };
}

impl<B: Backend> AnyAdapter<B> {
    /// Which method this is.
    pub fn method(&self) -> PeftMethod {
        delegate!(self, a => a.method())
    }

    /// See [`Adapter::check_compatible`].
    ///
    /// # Errors
    /// The adapter does not fit `config`.
    pub fn check_compatible(&self, config: &LlamaConfig) -> Result<()> {
        delegate!(self, a => a.check_compatible(config))
    }

    /// See [`Adapter::hooks`].
    pub fn hooks<'a>(&'a self, base: &'a Llama<B>) -> Box<dyn LayerHooks<B> + 'a> {
        delegate!(self, a => a.hooks(base))
    }

    /// See [`Adapter::named_tensors`].
    pub fn named_tensors(&self) -> Vec<NamedTensor> {
        delegate!(self, a => a.named_tensors())
    }

    /// See [`Adapter::num_trainable_parameters`].
    pub fn num_trainable_parameters(&self) -> usize {
        delegate!(self, a => a.num_trainable_parameters())
    }
}

impl<B: Backend> From<Lora<B>> for AnyAdapter<B> {
    fn from(adapter: Lora<B>) -> Self {
        Self::Lora(adapter)
    }
}

impl<B: Backend> From<PrefixTuning<B>> for AnyAdapter<B> {
    fn from(adapter: PrefixTuning<B>) -> Self {
        Self::PrefixTuning(adapter)
    }
}

impl<B: Backend> From<AdaptionPrompt<B>> for AnyAdapter<B> {
    fn from(adapter: AdaptionPrompt<B>) -> Self {
        Self::AdaptionPrompt(adapter)
    }
}

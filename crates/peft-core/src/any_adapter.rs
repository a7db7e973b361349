//! An adapter of any built-in method, for code that decides the method at run time (files, the
//! CLI). It is an [`Adapter`] and a Burn [`Module`] itself, so the trainer and [`crate::PeftModel`]
//! hold it like any single method.

use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::adapter::{Adapter, NamedTensor, PeftMethod};
use crate::adaption_prompt::AdaptionPrompt;
use crate::error::Result;
use crate::hooks::{Features, LayerHooks};
use crate::lora::Lora;
use crate::model::AdaptableModel;
use crate::native_format::{load_native_as, NativeAdapter, NativeConfig};
use crate::peft_format::{load_peft_as, read_peft_type, FromPeft, CONFIG_FILE};
use crate::prefix::PrefixTuning;
use burn_store::SafetensorsStore;
use std::path::Path;

/// One adapter of any of the built-in methods.
// The variants hold a few tensor handles each and an adapter lives for a whole run: boxing would
// only add an indirection to every call.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
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

impl<B: Backend> Adapter<B> for AnyAdapter<B> {
    fn method(&self) -> PeftMethod {
        delegate!(self, a => a.method())
    }

    fn check_compatible(&self, model: &dyn AdaptableModel<B>) -> Result<()> {
        delegate!(self, a => a.check_compatible(model))
    }

    fn hooks<'a>(&'a self, model: &dyn AdaptableModel<B>) -> Box<dyn LayerHooks<B> + 'a> {
        delegate!(self, a => a.hooks(model))
    }

    fn hooks_with_features<'a>(
        &'a self,
        model: &dyn AdaptableModel<B>,
        features: Features<B>,
    ) -> Result<Box<dyn LayerHooks<B> + 'a>> {
        delegate!(self, a => a.hooks_with_features(model, features))
    }

    fn named_tensors(&self) -> Vec<NamedTensor> {
        delegate!(self, a => a.named_tensors())
    }

    fn num_trainable_parameters(&self) -> usize {
        delegate!(self, a => a.num_trainable_parameters())
    }

    fn peft_config(&self, model: &dyn AdaptableModel<B>) -> Result<serde_json::Value> {
        delegate!(self, a => a.peft_config(model))
    }

    fn peft_tensors(&self) -> Result<Vec<NamedTensor>> {
        delegate!(self, a => a.peft_tensors())
    }

    fn merge_into(&self, model: &mut dyn AdaptableModel<B>) -> Result<()> {
        delegate!(self, a => a.merge_into(model))
    }

    fn unmerge_from(&self, model: &mut dyn AdaptableModel<B>) -> Result<()> {
        delegate!(self, a => a.unmerge_from(model))
    }
}

impl<B: Backend> NativeAdapter<B> for AnyAdapter<B> {
    fn native_type(&self) -> &'static str {
        delegate!(self, a => a.native_type())
    }

    fn native_config(&self) -> serde_json::Value {
        delegate!(self, a => a.native_config())
    }

    fn init_native(
        manifest: &NativeConfig<'_>,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(match manifest.peft_type {
            Some("LORA") => Lora::init_native(manifest, model, device)?.into(),
            Some("PREFIX_TUNING") => PrefixTuning::init_native(manifest, model, device)?.into(),
            Some("ADAPTION_PROMPT") => AdaptionPrompt::init_native(manifest, model, device)?.into(),
            other => return Err(manifest.error(format!("unknown peft_type {other:?}"))),
        })
    }

    fn save_tensors(&self, store: &mut SafetensorsStore, path: &Path) -> Result<()> {
        delegate!(self, a => a.save_tensors(store, path))
    }

    fn load_tensors(&mut self, path: &Path) -> Result<()> {
        delegate!(self, a => a.load_tensors(path))
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

/// Loads a PEFT adapter directory of a built-in method for `model`, choosing the method by its
/// `peft_type`.
///
/// # Errors
/// A missing or malformed file, an unknown or unsupported `peft_type` or setting, and every
/// missing, unexpected, mis-shaped or non-finite tensor, each naming the file and key.
pub fn load_peft<B: Backend>(
    dir: &Path,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<AnyAdapter<B>> {
    let peft_type = read_peft_type(dir)?;
    Ok(match peft_type.as_str() {
        <Lora<B> as FromPeft<B>>::PEFT_TYPE => {
            load_peft_as::<B, Lora<B>>(dir, model, device)?.into()
        }
        <PrefixTuning<B> as FromPeft<B>>::PEFT_TYPE => {
            load_peft_as::<B, PrefixTuning<B>>(dir, model, device)?.into()
        }
        <AdaptionPrompt<B> as FromPeft<B>>::PEFT_TYPE => {
            load_peft_as::<B, AdaptionPrompt<B>>(dir, model, device)?.into()
        }
        other => {
            return Err(crate::PeftError::Format {
                path: dir.join(CONFIG_FILE),
                message: format!(
                    "unknown or unsupported peft_type `{other}` (supported: LORA, \
                     PREFIX_TUNING, ADAPTION_PROMPT)"
                ),
            })
        }
    })
}

/// Loads an adapter of a built-in method saved by [`crate::native_format::save_native`] for
/// `model`.
///
/// # Errors
/// See [`load_native_as`].
pub fn load_native<B: Backend>(
    dir: &Path,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<AnyAdapter<B>> {
    load_native_as(dir, model, device)
}

//! Files of a [`MultimodalAdaptionPrompt`]: this workspace's native adapter format
//! (`docs/adapter-format.md`) with `peft_type` `MULTIMODAL_ADAPTION_PROMPT`.
//!
//! A directory with `peft_rs_config.json` (`format`, `format_version`, `peft_type`, `config`:
//! the serialised [`MultimodalAdaptionPromptConfig`], `model`: the LLaMA sizes it was made for)
//! and `adapter.safetensors` with the module's parameters under their Burn paths:
//! `adaption_prompt.prompts` `[L, K, D]`, `adaption_prompt.gates` `[L, H or 1]`,
//! `projection.{first,second}.{weight,bias}` (`weight` `[in, out]`).

use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::{
    load_native_as, save_native, AdaptableModel, ModelGeometry, NativeAdapter, NativeConfig,
};
use peft_io::files::read_json;
use serde_json::Value;

use crate::error::Result;
use crate::multimodal::{MultimodalAdaptionPrompt, MultimodalAdaptionPromptConfig};

/// The `peft_type` of a multimodal adaption prompt.
pub const PEFT_TYPE: &str = "MULTIMODAL_ADAPTION_PROMPT";
/// The configuration file (the same name as the native format's).
pub const CONFIG_FILE: &str = peft_core::native_format::CONFIG_FILE;
/// The tensor file.
pub const WEIGHTS_FILE: &str = peft_core::native_format::WEIGHTS_FILE;

/// Whether `dir` holds a multimodal adaption prompt.
pub fn is_multimodal_adapter(dir: &Path) -> bool {
    read_json(&dir.join(CONFIG_FILE))
        .ok()
        .and_then(|v| {
            v.get("peft_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .is_some_and(|t| t == PEFT_TYPE)
}

impl<B: Backend> NativeAdapter<B> for MultimodalAdaptionPrompt<B> {
    fn native_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn native_config(&self) -> Value {
        serde_json::to_value(&self.config).expect("multimodal configurations serialise")
    }

    fn init_native(
        manifest: &NativeConfig<'_>,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> peft_core::Result<Self> {
        if manifest.peft_type != Some(PEFT_TYPE) {
            return Err(manifest.error(format!(
                "not a multimodal adapter: peft_type {:?}, expected {PEFT_TYPE}",
                manifest.peft_type
            )));
        }
        let config: MultimodalAdaptionPromptConfig = manifest.parse()?;
        let geometry = model.geometry();
        config
            .validate(&geometry)
            .map_err(|e| manifest.error(format!("`config`: {e}")))?;
        // Every size is checked against the tensor file's header before `init` allocates
        // anything: a corrupt size in the configuration must be an error, not an abort.
        manifest.check_parameters(parameters(&config, &geometry))?;
        config
            .init::<B>(model, device)
            .map_err(|e| manifest.error(e.to_string()))
    }
}

/// Saves `adapter`, made for `model`, into `dir`; each file is replaced atomically.
///
/// # Errors
/// I/O errors.
pub fn save_multimodal<B: Backend>(
    adapter: &MultimodalAdaptionPrompt<B>,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
) -> Result<()> {
    Ok(save_native(adapter, model, dir)?)
}

/// Loads a multimodal adaption prompt saved by [`save_multimodal`] for a LLaMA with `model`.
///
/// # Errors
/// A file of another format or method, an adapter made for other model sizes, and every
/// missing, unexpected or mis-shaped tensor.
pub fn load_multimodal<B: Backend>(
    dir: &Path,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<MultimodalAdaptionPrompt<B>> {
    Ok(load_native_as(dir, model, device)?)
}

/// [`MultimodalAdaptionPromptConfig::num_trainable_parameters`] with checked arithmetic (the
/// configuration is read from a file); `None` on overflow.
fn parameters(config: &MultimodalAdaptionPromptConfig, model: &ModelGeometry) -> Option<usize> {
    let width = model.hidden_size;
    let prompt = config.adaption_prompt.checked_parameters(model)?;
    let first = config
        .feature_layers
        .len()
        .checked_mul(config.visual_hidden_size)?
        .checked_add(1)?
        .checked_mul(width)?;
    let second = width.checked_add(1)?.checked_mul(width)?;
    prompt.checked_add(first)?.checked_add(second)
}

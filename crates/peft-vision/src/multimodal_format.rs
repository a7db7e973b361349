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
use burn_store::{ModuleSnapshot, SafetensorsStore};
use peft_core::native_format::{
    adaption_prompt_parameters, apply, check_parameter_count, read_manifest,
};
use peft_core::{AdaptableModel, ModelGeometry};
use peft_io::files::{read_json, write_atomic};
use serde_json::{json, Value};

use crate::error::{Result, VisionError};
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

/// Saves `adapter`, made for `model`, into `dir`; each file is replaced atomically.
///
/// # Errors
/// I/O errors.
pub fn save_multimodal<B: Backend>(
    adapter: &MultimodalAdaptionPrompt<B>,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
) -> Result<()> {
    let config = serde_json::to_value(&adapter.config).map_err(|e| VisionError::Config {
        origin: "multimodal adaption prompt".into(),
        message: e.to_string(),
    })?;
    let manifest = json!({
        "format": "peft-rs",
        "format_version": peft_core::native_format::FORMAT_VERSION,
        "peft_type": PEFT_TYPE,
        "config": config,
        "model": peft_core::native_format::model_sizes(&model.geometry()),
    });
    let weights = dir.join(WEIGHTS_FILE);
    // No metadata, so that the same tensors always give the same bytes.
    let mut store = SafetensorsStore::from_bytes(None).clear_metadata();
    let bytes = adapter
        .save_into(&mut store)
        .and_then(|()| store.get_bytes())
        .map_err(|e| VisionError::Format {
            path: weights.clone(),
            message: e.to_string(),
        })?;
    std::fs::create_dir_all(dir).map_err(|e| VisionError::io(dir, e))?;
    write_atomic(&weights, &bytes)?;
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| VisionError::Format {
        path: dir.join(CONFIG_FILE),
        message: e.to_string(),
    })?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    Ok(())
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
    let geometry = model.geometry();
    let manifest = read_manifest(dir, &geometry)?;
    let format = |message: String| VisionError::Format {
        path: manifest.config_path.clone(),
        message,
    };
    if manifest.peft_type.as_deref() != Some(PEFT_TYPE) {
        return Err(format(format!(
            "not a multimodal adapter: peft_type {:?}, expected {PEFT_TYPE}",
            manifest.peft_type
        )));
    }
    let config: MultimodalAdaptionPromptConfig = serde_json::from_value(manifest.config.clone())
        .map_err(|e| format(format!("`config`: {e}")))?;
    config.validate(&geometry)?;
    // Every size is checked against the tensor file's header before `init` allocates anything:
    // a corrupt size in the configuration must be an error, not an abort.
    check_parameter_count(
        parameters(&config, &geometry),
        &manifest.config,
        &manifest.config_path,
        &manifest.weights,
    )?;
    let mut adapter = config.init::<B>(model, device)?;
    apply(&mut adapter, &manifest.weights)?;
    adapter.check_compatible_sizes(model)?;
    Ok(adapter)
}

/// [`MultimodalAdaptionPromptConfig::num_trainable_parameters`] with checked arithmetic (the
/// configuration is read from a file); `None` on overflow.
fn parameters(config: &MultimodalAdaptionPromptConfig, model: &ModelGeometry) -> Option<usize> {
    let width = model.hidden_size;
    let prompt = adaption_prompt_parameters(&config.adaption_prompt, model)?;
    let first = config
        .feature_layers
        .len()
        .checked_mul(config.visual_hidden_size)?
        .checked_add(1)?
        .checked_mul(width)?;
    let second = width.checked_add(1)?.checked_mul(width)?;
    prompt.checked_add(first)?.checked_add(second)
}

impl<B: Backend> MultimodalAdaptionPrompt<B> {
    fn check_compatible_sizes(&self, model: &dyn AdaptableModel<B>) -> Result<()> {
        use peft_core::Adapter;
        Ok(self.check_compatible(model)?)
    }
}

//! This crate's own adapter format, which round-trips every setting of every method exactly
//! (per-head and tanh gates, the prefix reparameterisation MLP) where PEFT's format cannot.
//!
//! A directory with `peft_rs_config.json` (the method, its configuration and the model sizes it
//! was made for) and `adapter.safetensors` (the adapter module's parameters under their Burn
//! module paths, written and read through `burn-store`). See `docs/adapter-format.md`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use peft_io::files::{read_json, write_atomic};
use peft_io::TensorMap;
use serde_json::{json, Value};

use crate::adapter::Adapter;
use crate::adaption_prompt::{AdaptionPromptConfig, GateShape};
use crate::any_adapter::AnyAdapter;
use crate::error::{PeftError, Result};
use crate::lora::LoraConfig;
use crate::model::{AdaptableModel, ModelGeometry};
use crate::prefix::PrefixTuningConfig;

/// The configuration file.
pub const CONFIG_FILE: &str = "peft_rs_config.json";
/// The tensor file.
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
/// The format's version; bumped on incompatible changes.
pub const FORMAT_VERSION: u64 = 1;

/// The `model` entry of a manifest: the sizes an adapter was made for.
pub fn model_sizes(model: &ModelGeometry) -> Value {
    serde_json::to_value(model).expect("model sizes serialise")
}

/// Saves `adapter` (made for `model`) in this crate's format; each file replaced atomically.
///
/// # Errors
/// I/O errors.
pub fn save_native<B: Backend>(
    adapter: &AnyAdapter<B>,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
) -> Result<()> {
    let to_json = |c: &dyn erased::Serialize| c.to_value();
    let (method, config) = match adapter {
        AnyAdapter::Lora(a) => ("LORA", to_json(&a.config)),
        AnyAdapter::PrefixTuning(a) => ("PREFIX_TUNING", to_json(&a.config)),
        AnyAdapter::AdaptionPrompt(a) => ("ADAPTION_PROMPT", to_json(&a.config)),
    };
    let manifest = json!({
        "format": "peft-rs",
        "format_version": FORMAT_VERSION,
        "peft_type": method,
        "config": config,
        "model": model_sizes(&model.geometry()),
    });
    let weights = dir.join(WEIGHTS_FILE);
    // No metadata: burn-store keeps it in a hash map, which would make the header (and so the
    // file) differ from run to run for the same tensors.
    let mut store = SafetensorsStore::from_bytes(None).clear_metadata();
    let saved = match adapter {
        AnyAdapter::Lora(a) => a.save_into(&mut store),
        AnyAdapter::PrefixTuning(a) => a.save_into(&mut store),
        AnyAdapter::AdaptionPrompt(a) => a.save_into(&mut store),
    };
    let bytes = saved
        .and_then(|()| store.get_bytes())
        .map_err(|e| PeftError::Format {
            path: weights.clone(),
            message: e.to_string(),
        })?;
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Io {
        path: dir.into(),
        source: e,
    })?;
    write_atomic(&weights, &bytes)?;
    let text = serde_json::to_string_pretty(&manifest).expect("JSON values serialise");
    Ok(write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?)
}

mod erased {
    /// Serialises any adapter configuration to a JSON value.
    pub trait Serialize {
        fn to_value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Serialize for T {
        fn to_value(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("adapter configurations serialise")
        }
    }
}

/// Loads the tensors of the safetensors file `path` into `module`: every parameter must be
/// there with its shape, and nothing else may be.
///
/// # Errors
/// A missing or unreadable file, a missing, misshapen or unexpected tensor.
pub fn apply<B: Backend, M: ModuleSnapshot<B>>(module: &mut M, path: &Path) -> Result<()> {
    let format = |message: String| PeftError::Format {
        path: path.into(),
        message,
    };
    if !path.is_file() {
        return Err(PeftError::Io {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let mut store = SafetensorsStore::from_file(path)
        .allow_partial(true)
        .validate(true);
    let result = module
        .load_from(&mut store)
        .map_err(|e| format(e.to_string()))?;
    if let Some(error) = result.errors.first() {
        return Err(format(error.to_string()));
    }
    if let Some((key, _)) = result.missing.first() {
        return Err(format(format!("missing tensor '{key}'")));
    }
    if !result.unused.is_empty() {
        return Err(format(format!("unexpected tensor(s) {:?}", result.unused)));
    }
    Ok(())
}

/// Loads an adapter saved by [`save_native`] for a model with configuration `model`.
///
/// # Errors
/// Malformed files, an adapter made for a model of other sizes, an invalid configuration or one
/// whose sizes do not match the tensor file's (checked before anything is allocated), and every
/// missing, unexpected or mis-shaped tensor.
pub fn load_native<B: Backend>(
    dir: &Path,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<AnyAdapter<B>> {
    let geometry = model.geometry();
    let Manifest {
        peft_type,
        config,
        config_path,
        weights,
    } = read_manifest(dir, &geometry)?;
    let format = |message: String| PeftError::Format {
        path: config_path.clone(),
        message,
    };
    let parse_error = |e: serde_json::Error| format(format!("`config`: {e}"));
    let invalid = |e: PeftError| format(format!("`config`: {e}"));
    // Every size in the configuration is checked against the tensor file before `init`
    // allocates anything: a corrupt or hostile `"r": 2000000000` must be an error, not an abort.
    let check = |expected| check_parameter_count(expected, &config, &config_path, &weights);
    let adapter = match peft_type.as_deref() {
        Some("LORA") => {
            let lora: LoraConfig = serde_json::from_value(config.clone()).map_err(parse_error)?;
            lora.validate(&geometry).map_err(invalid)?;
            check(
                lora.checked_parameters(&model.linear_sites())
                    .map_err(invalid)?,
            )?;
            let mut adapter = lora.init::<B>(model, device)?;
            apply(&mut adapter, &weights)?;
            AnyAdapter::Lora(adapter)
        }
        Some("PREFIX_TUNING") => {
            let prefix: PrefixTuningConfig =
                serde_json::from_value(config.clone()).map_err(parse_error)?;
            if prefix.num_virtual_tokens == 0 {
                return Err(format(
                    "`config`: num_virtual_tokens must be positive".into(),
                ));
            }
            if prefix.prefix_projection && prefix.encoder_hidden_size == 0 {
                return Err(format(
                    "`config`: encoder_hidden_size must be positive with prefix_projection".into(),
                ));
            }
            check(prefix_parameters(&prefix, &geometry))?;
            let mut adapter = prefix.init::<B>(model, device)?;
            apply(&mut adapter, &weights)?;
            AnyAdapter::PrefixTuning(adapter)
        }
        Some("ADAPTION_PROMPT") => {
            let prompt: AdaptionPromptConfig =
                serde_json::from_value(config.clone()).map_err(parse_error)?;
            prompt.validate(&geometry).map_err(invalid)?;
            check(adaption_prompt_parameters(&prompt, &geometry))?;
            let mut adapter = prompt.init::<B>(model, device)?;
            apply(&mut adapter, &weights)?;
            AnyAdapter::AdaptionPrompt(adapter)
        }
        other => return Err(format(format!("unknown peft_type {other:?}"))),
    };
    adapter.check_compatible(model)?;
    Ok(adapter)
}

/// The manifest of a peft-rs adapter directory, checked (format, version, model sizes); the
/// method's configuration is left to the caller.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// `peft_type`, if the manifest has one.
    pub peft_type: Option<String>,
    /// The method's configuration (`null` when absent).
    pub config: Value,
    /// The manifest file (for error messages).
    pub config_path: PathBuf,
    /// The tensor file beside it.
    pub weights: PathBuf,
}

/// Reads `dir`'s manifest and checks that it is a peft-rs adapter of a supported format version
/// made for a model of `model`'s sizes. Shared by every peft-rs adapter kind (the multimodal
/// adapter of `peft-vision` too).
///
/// # Errors
/// An unreadable or malformed manifest, another format or version, or another model's sizes.
pub fn read_manifest(dir: &Path, model: &ModelGeometry) -> Result<Manifest> {
    let config_path = dir.join(CONFIG_FILE);
    let manifest = read_json(&config_path)?;
    let format = |message: String| PeftError::Format {
        path: config_path.clone(),
        message,
    };
    if manifest.get("format").and_then(Value::as_str) != Some("peft-rs") {
        return Err(format(
            "not a peft-rs adapter (`format` is not \"peft-rs\")".into(),
        ));
    }
    let version = manifest
        .get("format_version")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if version != FORMAT_VERSION {
        return Err(format(format!(
            "format_version {version} is not supported (this build reads {FORMAT_VERSION})"
        )));
    }
    let expected = model_sizes(model);
    if manifest.get("model") != Some(&expected) {
        return Err(PeftError::Incompatible(format!(
            "{}: adapter made for a model with {}, this model has {expected}",
            config_path.display(),
            manifest.get("model").cloned().unwrap_or(Value::Null)
        )));
    }
    Ok(Manifest {
        peft_type: manifest
            .get("peft_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        config: manifest.get("config").cloned().unwrap_or(Value::Null),
        weights: dir.join(WEIGHTS_FILE),
        config_path,
    })
}

/// Fails unless the tensors of `weights` hold `expected` values in all, reading only the
/// file's header (with checked arithmetic: a hostile header cannot overflow it). `None` means
/// the expected count overflows `usize`: no file can match it.
///
/// # Errors
/// An unreadable tensor file, or another number of values.
pub fn check_parameter_count(
    expected: Option<usize>,
    config: &Value,
    config_path: &Path,
    weights: &Path,
) -> Result<()> {
    let mut tensors = TensorMap::new(weights.display().to_string());
    tensors.add_safetensors(weights)?;
    let found = tensors
        .keys()
        .map(|key| tensors.shape(key).unwrap_or_default())
        .try_fold(0usize, |sum, shape| {
            shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| sum.checked_add(n))
        });
    if expected.is_some() && expected == found {
        return Ok(());
    }
    let expected = match expected {
        Some(n) => format!("{n} values"),
        None => "more values than this machine can address".into(),
    };
    let found = found.map_or_else(|| "more than can be addressed".into(), |n| n.to_string());
    Err(PeftError::Format {
        path: config_path.into(),
        message: format!(
            "`config` {config} needs {expected} for this model, but {} holds {found} \
             in {} tensor(s)",
            weights.display(),
            tensors.keys().count()
        ),
    })
}

/// [`PrefixTuningConfig::num_trainable_parameters`], checked.
fn prefix_parameters(config: &PrefixTuningConfig, model: &ModelGeometry) -> Option<usize> {
    let width = PrefixTuningConfig::prompt_width(model);
    let tokens = config.num_virtual_tokens;
    if config.prefix_projection {
        let token = model.kv_width();
        let hidden = config.encoder_hidden_size;
        let embedding = tokens.checked_mul(token)?;
        let first = token.checked_add(1)?.checked_mul(hidden)?;
        let second = hidden.checked_add(1)?.checked_mul(width)?;
        embedding.checked_add(first)?.checked_add(second)
    } else {
        tokens.checked_mul(width)
    }
}

/// [`AdaptionPromptConfig::num_trainable_parameters`] with checked arithmetic (for sizes read
/// from a file); `None` on overflow.
pub fn adaption_prompt_parameters(
    config: &AdaptionPromptConfig,
    model: &ModelGeometry,
) -> Option<usize> {
    let gates = match config.gate_shape {
        GateShape::PerHead => model.num_attention_heads,
        GateShape::Scalar => 1,
    };
    let per_layer = config
        .adapter_len
        .checked_mul(model.hidden_size)?
        .checked_add(gates)?;
    config.adapter_layers.checked_mul(per_layer)
}

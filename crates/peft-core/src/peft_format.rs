//! Hugging Face PEFT's adapter directories, both ways: `adapter_config.json` and
//! `adapter_model.safetensors` (metadata `{"format": "pt"}`), with PEFT's key names and shapes.
//!
//! Files written here load in Python with `PeftModel.from_pretrained` and give our logits;
//! directories PEFT writes load here and give its logits. Tested by this crate's
//! `tests/parity.rs` (PEFT's own files against its logits and gradients) and
//! `tests/adapter_files.rs` (round trips, every malformed file), and by the repository's
//! `scripts/check_rust_adapters.py` (our files loaded by PEFT in Python).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use peft_io::files::{read_json, write_atomic};
use peft_io::{transpose, TensorMap};
use serde_json::{json, Value};

use crate::adapter::{Adapter, NamedTensor};
use crate::adaption_prompt::{AdaptionPrompt, AdaptionPromptConfig};
use crate::any_adapter::AnyAdapter;
use crate::error::{PeftError, Result};
use crate::lora::{Lora, LoraConfig, LoraLinear};
use crate::model::AdaptableModel;
use crate::prefix::{PrefixTuning, PrefixTuningConfig};
use crate::targets::TargetModules;

/// The configuration file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensor file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn format_error(path: &Path, message: impl Into<String>) -> PeftError {
    PeftError::Format {
        path: path.into(),
        message: message.into(),
    }
}

fn field<'v>(config: &'v Value, key: &str, path: &Path) -> Result<&'v Value> {
    config
        .get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| format_error(path, format!("`{key}` is missing")))
}

fn usize_field(config: &Value, key: &str, path: &Path) -> Result<usize> {
    field(config, key, path)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| format_error(path, format!("`{key}` must be a non-negative integer")))
}

fn f64_field(config: &Value, key: &str, path: &Path) -> Result<f64> {
    field(config, key, path)?
        .as_f64()
        .ok_or_else(|| format_error(path, format!("`{key}` must be a number")))
}

fn bool_field(config: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format_error(path, format!("`{key}` must be true or false"))),
    }
}

/// Fails on settings this crate does not implement, rather than ignoring them.
fn refuse(config: &Value, path: &Path, key: &str, allowed: impl Fn(&Value) -> bool) -> Result<()> {
    match config.get(key) {
        Some(value) if !allowed(value) => Err(format_error(
            path,
            format!("`{key}` = {value} is not supported by this crate"),
        )),
        _ => Ok(()),
    }
}

fn lora_config(config: &Value, path: &Path) -> Result<LoraConfig> {
    let empty = |v: &Value| v.is_null() || v.as_object().is_some_and(|o| o.is_empty());
    refuse(config, path, "rank_pattern", empty)?;
    refuse(config, path, "alpha_pattern", empty)?;
    refuse(config, path, "use_dora", |v| v.as_bool() != Some(true))?;
    refuse(config, path, "bias", |v| {
        v.is_null() || v.as_str() == Some("none")
    })?;
    refuse(config, path, "fan_in_fan_out", |v| {
        v.as_bool() != Some(true)
    })?;
    refuse(config, path, "modules_to_save", |v| {
        v.is_null() || v.as_array().is_some_and(Vec::is_empty)
    })?;
    refuse(config, path, "layer_replication", Value::is_null)?;
    refuse(config, path, "lora_bias", |v| v.as_bool() != Some(true))?;
    let target_modules: TargetModules =
        serde_json::from_value(field(config, "target_modules", path)?.clone()).map_err(|_| {
            format_error(
                path,
                "`target_modules` must be a list of module names or a regular expression",
            )
        })?;
    let layers_to_transform = match config.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| format_error(path, "`layers_to_transform` must be layer indices"))?,
        ),
        Some(_) => {
            return Err(format_error(
                path,
                "`layers_to_transform` must be layer indices",
            ))
        }
    };
    Ok(LoraConfig::new()
        .with_r(usize_field(config, "r", path)?)
        .with_lora_alpha(f64_field(config, "lora_alpha", path)?)
        .with_target_modules(target_modules)
        .with_lora_dropout(
            config
                .get("lora_dropout")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
        )
        .with_use_rslora(bool_field(config, "use_rslora", false, path)?)
        .with_layers_to_transform(layers_to_transform))
}

fn tensor<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Reads the `peft_type` of an adapter directory's configuration.
///
/// # Errors
/// Missing or malformed `adapter_config.json`.
pub fn read_peft_type(dir: &Path) -> Result<String> {
    let path = dir.join(CONFIG_FILE);
    let config = read_json(&path)?;
    Ok(field(&config, "peft_type", &path)?
        .as_str()
        .ok_or_else(|| format_error(&path, "`peft_type` must be a string"))?
        .to_string())
}

/// Loads a PEFT adapter directory for a model with configuration `model`.
///
/// # Errors
/// A missing or malformed file, an unknown or unsupported `peft_type` or setting, and every
/// missing, unexpected, mis-shaped or non-finite tensor, each naming the file and key.
pub fn load_peft<B: Backend>(
    dir: &Path,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<AnyAdapter<B>> {
    let config_path = dir.join(CONFIG_FILE);
    let config = read_json(&config_path)?;
    if let (Some(task), Some(expected)) = (
        config.get("task_type").and_then(Value::as_str),
        model.task_type(),
    ) {
        if task != expected {
            return Err(format_error(
                &config_path,
                format!("task_type `{task}` is not {expected}, this model's task"),
            ));
        }
    }
    let geometry = model.geometry();
    let peft_type = read_peft_type(dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    let mut tensors = TensorMap::new(weights.display().to_string());
    tensors.add_safetensors(&weights)?;
    let adapter = match peft_type.as_str() {
        "LORA" => {
            let lora = lora_config(&config, &config_path)?;
            lora.validate(&geometry).map_err(|e| format_error(&config_path, e.to_string()))?;
            let targets = lora
                .targets(&model.linear_sites())
                .map_err(|e| format_error(&config_path, e.to_string()))?;
            let mut modules = Vec::new();
            for site in targets {
                let (input, output) = (site.in_features, site.out_features);
                let prefix = format!("base_model.model.{}", site.path);
                let a = tensors.take_f32(&format!("{prefix}.lora_A.weight"), &[lora.r, input])?;
                let b = tensors.take_f32(&format!("{prefix}.lora_B.weight"), &[output, lora.r])?;
                modules.push(LoraLinear {
                    lora_a: burn::module::Param::from_tensor(tensor(transpose(&a, lora.r, input), [input, lora.r], device)),
                    lora_b: burn::module::Param::from_tensor(tensor(transpose(&b, output, lora.r), [lora.r, output], device)),
                    dropout: burn::nn::DropoutConfig::new(lora.lora_dropout).init(),
                    site,
                });
            }
            AnyAdapter::Lora(Lora { modules, config: lora })
        }
        "PREFIX_TUNING" => {
            let tokens = usize_field(&config, "num_virtual_tokens", &config_path)?;
            if let Some(layers) = config.get("num_layers").and_then(Value::as_u64) {
                if layers as usize != geometry.num_hidden_layers {
                    return Err(PeftError::Incompatible(format!(
                        "{}: prefix made for {layers} layers, the model has {}",
                        config_path.display(),
                        geometry.num_hidden_layers
                    )));
                }
            }
            let width = PrefixTuningConfig::prompt_width(&geometry);
            let values = tensors.take_f32("prompt_embeddings", &[tokens, width])?;
            let prefix_config = PrefixTuningConfig::new()
                .with_num_virtual_tokens(tokens)
                .with_encoder_hidden_size(config.get("encoder_hidden_size").and_then(Value::as_u64).unwrap_or(512) as usize);
            AnyAdapter::PrefixTuning(PrefixTuning {
                embedding: burn::module::Param::from_tensor(tensor(values, [tokens, width], device)),
                projection: None,
                config: prefix_config,
                num_layers: geometry.num_hidden_layers,
                kv_heads: geometry.num_key_value_heads,
                head_dim: geometry.head_dim,
            })
        }
        "ADAPTION_PROMPT" => {
            let len = usize_field(&config, "adapter_len", &config_path)?;
            let layers = usize_field(&config, "adapter_layers", &config_path)?;
            refuse(&config, &config_path, "target_modules", |v| v.as_str() == Some("self_attn"))?;
            let prompt_config = AdaptionPromptConfig::peft_compatible(len, layers);
            prompt_config.validate(&geometry).map_err(|e| format_error(&config_path, e.to_string()))?;
            let first = geometry.num_hidden_layers - layers;
            let width = geometry.hidden_size;
            // Nothing is reserved from the configuration's sizes (`"adapter_len": 3000000000`
            // would abort, and the product can overflow): `take_f32` checks each tensor's shape
            // against the file before reading it, so memory follows what the file holds.
            let mut prompts = Vec::new();
            let mut gates = Vec::new();
            for layer in first..geometry.num_hidden_layers {
                let prefix = format!("base_model.model.{}", model.attention_path(layer));
                prompts.extend(tensors.take_f32(&format!("{prefix}.adaption_prompt"), &[1, len, width])?);
                gates.extend(tensors.take_f32(&format!("{prefix}.adaption_gate"), &[1])?);
            }
            AnyAdapter::AdaptionPrompt(AdaptionPrompt::from_tensors(
                prompt_config,
                model,
                tensor(prompts, [layers, len, width], device),
                tensor(gates, [layers, 1], device),
            ))
        }
        other => {
            return Err(format_error(
                &config_path,
                format!("unknown or unsupported peft_type `{other}` (supported: LORA, PREFIX_TUNING, ADAPTION_PROMPT)"),
            ))
        }
    };
    tensors.finish()?;
    adapter.check_compatible(model)?;
    Ok(adapter)
}

/// The configuration PEFT would write for `adapter`, with every field PEFT would otherwise default.
///
/// # Errors
/// A per-head or tanh-gated adaption prompt whose heads do not share one gate: PEFT has no
/// such form (save it with [`crate::native_format`] instead).
pub fn peft_config<B: Backend>(
    adapter: &AnyAdapter<B>,
    model: &dyn AdaptableModel<B>,
) -> Result<Value> {
    let geometry = model.geometry();
    let common = |peft_type: &str| {
        json!({
            "peft_type": peft_type,
            "task_type": model.task_type(),
            "inference_mode": true,
            "base_model_name_or_path": model.name_or_path(),
            "revision": null,
            "auto_mapping": null,
        })
    };
    let mut config = match adapter {
        AnyAdapter::Lora(lora) => {
            let c = &lora.config;
            let targets = match &c.target_modules {
                TargetModules::Names(names) => {
                    let mut names = names.clone();
                    names.sort();
                    names.dedup();
                    json!(names)
                }
                other => json!(other),
            };
            let mut value = common("LORA");
            let extra = json!({
                "r": c.r,
                "lora_alpha": c.lora_alpha,
                "target_modules": targets,
                "lora_dropout": c.lora_dropout,
                "use_rslora": c.use_rslora,
                "layers_to_transform": c.layers_to_transform,
                "layers_pattern": null,
                "bias": "none",
                "fan_in_fan_out": false,
                "init_lora_weights": true,
                "modules_to_save": null,
                "rank_pattern": {},
                "alpha_pattern": {},
                "use_dora": false,
                "lora_bias": false,
                "layer_replication": null,
            });
            merge(&mut value, extra);
            value
        }
        AnyAdapter::PrefixTuning(prefix) => {
            let mut value = common("PREFIX_TUNING");
            merge(
                &mut value,
                json!({
                    "num_virtual_tokens": prefix.config.num_virtual_tokens,
                    "token_dim": geometry.kv_width(),
                    "num_transformer_submodules": 1,
                    "num_attention_heads": geometry.num_key_value_heads,
                    "num_layers": geometry.num_hidden_layers,
                    "encoder_hidden_size": prefix.config.encoder_hidden_size,
                    "prefix_projection": false,
                    "modules_to_save": null,
                }),
            );
            value
        }
        AnyAdapter::AdaptionPrompt(prompt) => {
            scalar_gates(prompt)?;
            let mut value = common("ADAPTION_PROMPT");
            merge(
                &mut value,
                json!({
                    "adapter_len": prompt.config.adapter_len,
                    "adapter_layers": prompt.config.adapter_layers,
                    "target_modules": "self_attn",
                }),
            );
            value
        }
    };
    if let Value::Object(map) = &mut config {
        map.insert("peft_version".into(), json!("0.21.2"));
    }
    Ok(config)
}

fn merge(target: &mut Value, extra: Value) {
    if let (Value::Object(target), Value::Object(extra)) = (target, extra) {
        target.extend(extra);
    }
}

/// The activated gate of each layer when every head shares it, else an error.
fn scalar_gates<B: Backend>(prompt: &AdaptionPrompt<B>) -> Result<Vec<f32>> {
    let activated = crate::adapter::host_values(prompt.activated_gates());
    let per_layer = activated.len() / prompt.config.adapter_layers;
    let mut gates = Vec::with_capacity(prompt.config.adapter_layers);
    for (layer, chunk) in activated.chunks(per_layer).enumerate() {
        if chunk.iter().any(|&g| g != chunk[0]) {
            return Err(PeftError::Unsupported(format!(
                "this adaption prompt has a different gate per head (adapted layer {layer}: {chunk:?}); \
                 Hugging Face PEFT stores one gate per layer, so it cannot be saved in PEFT's format \
                 without changing its output: save it in this crate's own format instead"
            )));
        }
        gates.push(chunk[0]);
    }
    Ok(gates)
}

/// The tensors PEFT's file holds for `adapter` (adaption-prompt gates as one activated scalar).
///
/// # Errors
/// See [`peft_config`].
pub fn peft_tensors<B: Backend>(adapter: &AnyAdapter<B>) -> Result<Vec<NamedTensor>> {
    let mut tensors = adapter.named_tensors();
    if let AnyAdapter::AdaptionPrompt(prompt) = adapter {
        let gates = scalar_gates(prompt)?;
        for (tensor, gate) in tensors
            .iter_mut()
            .filter(|t| t.key.ends_with(".adaption_gate"))
            .zip(gates)
        {
            tensor.shape = vec![1];
            tensor.values = vec![gate];
        }
    }
    Ok(tensors)
}

/// Serialises named tensors as a safetensors file with PEFT's metadata.
///
/// # Errors
/// Shapes that do not match the values.
pub fn safetensors_bytes(tensors: &[NamedTensor], path: &Path) -> Result<Vec<u8>> {
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (tensor, buffer) in tensors.iter().zip(&buffers) {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            tensor.shape.clone(),
            buffer,
        )
        .map_err(|e| format_error(path, format!("tensor '{}': {e}", tensor.key)))?;
        views.push((tensor.key.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| format_error(path, e.to_string()))
}

/// Saves `adapter` as a PEFT directory (created if needed; each file replaced atomically).
///
/// # Errors
/// See [`peft_config`]; I/O errors.
pub fn save_peft<B: Backend>(
    adapter: &AnyAdapter<B>,
    model: &dyn AdaptableModel<B>,
    dir: &Path,
) -> Result<()> {
    let config = peft_config(adapter, model)?;
    let tensors = peft_tensors(adapter)?;
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Io {
        path: dir.into(),
        source: e,
    })?;
    let weights = dir.join(WEIGHTS_FILE);
    write_atomic(&weights, &safetensors_bytes(&tensors, &weights)?)?;
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    Ok(write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?)
}

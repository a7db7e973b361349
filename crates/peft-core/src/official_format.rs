//! The official LLaMA-Adapter v1 release checkpoint: a PyTorch state dict with
//! `adapter_query.weight` `[L·K, dim]` (rows `[j·K, (j+1)·K)` belong to layer `N - L + j`) and
//! `layers.{i}.attention.gate` `[1, H, 1, 1]` for every layer `i` (only the top `L` are used).
//! It stores no configuration: `K` is given (default 10) and `L = rows / K`, as the official
//! loader does. Gates are per head and used through `tanh` (the official training code).

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use peft_io::TensorMap;

use crate::adapter::{host_values, NamedTensor};
use crate::adaption_prompt::{AdaptionPrompt, AdaptionPromptConfig, GateActivation, GateShape};
use crate::error::{PeftError, Result};
use crate::model::{AdaptableModel, ModelGeometry};

/// The key of the stacked prompts.
pub const PROMPT_KEY: &str = "adapter_query.weight";

fn gate_key(layer: usize) -> String {
    format!("layers.{layer}.attention.gate")
}

/// Loads an official checkpoint (`.pth`, read without executing code, or the same tensors as
/// `.safetensors`) for a model with configuration `model`, with `adapter_len` prompts per layer.
///
/// # Errors
/// Unreadable files; a prompt matrix whose rows are not a multiple of `adapter_len` or whose width
/// is not the model's; more adapted layers than the model has; a missing gate; a non-zero gate
/// below the adapted layers (it would be silently ignored); any other tensor.
pub fn load_official<B: Backend>(
    path: &Path,
    adapter_len: usize,
    model: &dyn AdaptableModel<B>,
    device: &B::Device,
) -> Result<AdaptionPrompt<B>> {
    let geometry = model.geometry();
    let format = |message: String| PeftError::Format {
        path: path.into(),
        message,
    };
    let mut tensors = TensorMap::new(path.display().to_string());
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => tensors.add_safetensors(path)?,
        _ => tensors.add_pth(path)?,
    }
    let shape = tensors.shape(PROMPT_KEY).ok_or_else(|| {
        format(format!(
            "no `{PROMPT_KEY}`: not an official LLaMA-Adapter checkpoint"
        ))
    })?;
    if shape.len() != 2 || shape[1] != geometry.hidden_size {
        return Err(PeftError::Incompatible(format!(
            "{}: `{PROMPT_KEY}` has shape {shape:?}, the model needs [L·K, {}]",
            path.display(),
            geometry.hidden_size
        )));
    }
    if adapter_len == 0 || shape[0] % adapter_len != 0 {
        return Err(format(format!(
            "`{PROMPT_KEY}` has {} rows, not a multiple of adapter_len {adapter_len} (pass the right --adapter-len)",
            shape[0]
        )));
    }
    let layers = shape[0] / adapter_len;
    if layers == 0 {
        return Err(format(format!(
            "`{PROMPT_KEY}` has no rows: the checkpoint holds no adaption prompts"
        )));
    }
    if layers > geometry.num_hidden_layers {
        // The file does not store adapter_len, so a wrong --adapter-len is the likely cause.
        return Err(format(format!(
            "`{PROMPT_KEY}` has {} rows, which with adapter_len {adapter_len} makes {layers} adapted \
             layers, but the model has {} layers (pass the right --adapter-len)",
            shape[0], geometry.num_hidden_layers
        )));
    }
    let config = AdaptionPromptConfig::new()
        .with_adapter_len(adapter_len)
        .with_adapter_layers(layers)
        .with_gate_shape(GateShape::PerHead)
        .with_gate_activation(GateActivation::Tanh);
    config.validate(&geometry).map_err(|e| {
        format(format!(
            "{e} (`{PROMPT_KEY}` has {} rows, adapter_len {adapter_len}: check --adapter-len)",
            shape[0]
        ))
    })?;
    let prompts = tensors.take_f32(PROMPT_KEY, &shape)?;
    let heads = geometry.num_attention_heads;
    let first = geometry.num_hidden_layers - layers;
    let mut gates = Vec::with_capacity(layers * heads);
    for layer in 0..geometry.num_hidden_layers {
        let key = gate_key(layer);
        if layer < first {
            if tensors.contains(&key) {
                let values = tensors.take_f32(&key, &[1, heads, 1, 1])?;
                if values.iter().any(|&v| v != 0.0) {
                    return Err(format(format!(
                        "`{key}` is non-zero but layer {layer} is below the {layers} adapted layers \
                         (adapter_len {adapter_len}): check --adapter-len"
                    )));
                }
            }
        } else {
            gates.extend(tensors.take_f32(&key, &[1, heads, 1, 1])?);
        }
    }
    tensors.finish()?;
    let width = geometry.hidden_size;
    Ok(AdaptionPrompt::from_tensors(
        config,
        model,
        Tensor::from_data(
            TensorData::new(prompts, [layers, adapter_len, width]),
            device,
        ),
        Tensor::from_data(TensorData::new(gates, [layers, heads]), device),
    ))
}

/// The tensors of the official format for `adapter`: the stacked prompts and a gate for every
/// layer (zeros below the adapted ones), gates stored raw (the official code applies `tanh`).
///
/// # Errors
/// An adapter whose gates are not per head with `tanh`: the official format has no other form.
pub fn official_tensors<B: Backend>(
    adapter: &AdaptionPrompt<B>,
    model: &ModelGeometry,
) -> Result<Vec<NamedTensor>> {
    if adapter.config.gate_shape != GateShape::PerHead
        || adapter.config.gate_activation != GateActivation::Tanh
    {
        return Err(PeftError::Unsupported(format!(
            "the official LLaMA-Adapter format holds per-head tanh gates; this adapter has {:?} {:?} gates",
            adapter.config.gate_shape, adapter.config.gate_activation
        )));
    }
    let [layers, len, width] = adapter.prompts.dims();
    let heads = model.num_attention_heads;
    let gates = host_values(adapter.gates.val());
    let mut out = vec![NamedTensor {
        key: PROMPT_KEY.into(),
        shape: vec![layers * len, width],
        values: host_values(adapter.prompts.val()),
    }];
    for layer in 0..model.num_hidden_layers {
        let values = match layer.checked_sub(adapter.first_layer) {
            Some(index) => gates[index * heads..(index + 1) * heads].to_vec(),
            None => vec![0.0; heads],
        };
        out.push(NamedTensor {
            key: gate_key(layer),
            shape: vec![1, heads, 1, 1],
            values,
        });
    }
    Ok(out)
}

/// Writes the official checkpoint for `adapter` to `path` (a PyTorch `.pth`, or `.safetensors`
/// when the path ends so), atomically.
///
/// # Errors
/// See [`official_tensors`]; I/O errors.
pub fn save_official<B: Backend>(
    adapter: &AdaptionPrompt<B>,
    model: &dyn AdaptableModel<B>,
    path: &Path,
) -> Result<()> {
    let tensors = official_tensors(adapter, &model.geometry())?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| PeftError::Io {
            path: parent.into(),
            source: e,
        })?;
    }
    let bytes = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => crate::peft_format::safetensors_bytes(&tensors, path)?,
        _ => peft_io::torch_pickle::state_dict_bytes(&tensors, path)?,
    };
    Ok(peft_io::files::write_atomic(path, &bytes)?)
}

//! Writes adapters made in Rust, with random non-zero parameters, for the tiny fixture models,
//! together with the logits this crate computes with them, so that `scripts/check_rust_adapters.py`
//! can load them with Hugging Face PEFT (or `torch.load` for the official checkpoint) and compare.
//!
//! ```sh
//! cargo run -p peft-core --example write_test_adapters -- OUT_DIR
//! ```
//!
//! For each of `fixtures/tiny-mha/model` and `fixtures/tiny-gqa/model` it writes
//! `OUT_DIR/<model>/<case>/`:
//!
//! | case | method | format |
//! | --- | --- | --- |
//! | `lora` | LoRA r 4, alpha 8, q_proj + v_proj | PEFT |
//! | `lora_all_rslora` | LoRA r 2, alpha 4, rsLoRA, all seven linear modules | PEFT |
//! | `prefix` | prefix tuning, 3 virtual tokens | PEFT |
//! | `adaption_prompt` | PEFT's adaption prompt, adapter_len 4, adapter_layers 2 | PEFT |
//! | `official` | per-head tanh LLaMA-Adapter, adapter_len 4, adapter_layers 2 | official `adapter.pth` |
//!
//! and in each of them `logits.safetensors` (`logits` `[2, 7, vocab]` for the fixture's
//! `inputs.safetensors`, every position). `OUT_DIR/manifest.json` lists the cases.

use peft_core::Adapter;
use peft_core::Randomise;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use peft_core::peft_format::safetensors_bytes;
use peft_core::{
    host_values, save_adapter, AdapterFormat, AdaptionPromptConfig, AnyAdapter, GateActivation,
    GateShape, LoraConfig, NamedTensor, PrefixTuningConfig,
};
use peft_llama::{Llama, LlamaLoader, TokenBatch};
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

type B = NdArray<f32>;

const MODELS: [&str; 2] = ["tiny-mha", "tiny-gqa"];

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fixture's right-padded batch (`input_ids`, `attention_mask`, both i64).
fn inputs(model: &str) -> Result<TokenBatch, Box<dyn std::error::Error>> {
    let path = repository()
        .join("fixtures")
        .join(model)
        .join("inputs.safetensors");
    let bytes = std::fs::read(&path)?;
    let file = SafeTensors::deserialize(&bytes)?;
    let read = |key: &str| -> Result<(Vec<i64>, Vec<usize>), Box<dyn std::error::Error>> {
        let view = file.tensor(key)?;
        if view.dtype() != Dtype::I64 {
            return Err(format!("{}: `{key}` is not int64", path.display()).into());
        }
        let values = view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok((values, view.shape().to_vec()))
    };
    let (ids, shape) = read("input_ids")?;
    let (mask, _) = read("attention_mask")?;
    Ok(TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        batch: shape[0],
        seq: shape[1],
        mask: Some(mask.iter().map(|&m| m != 0).collect()),
    })
}

/// A case: its directory name, the format it is saved in, and the adapter.
type Case = (&'static str, AdapterFormat, AnyAdapter<B>);

/// The adapters of every case for `base`, with random non-zero parameters.
fn adapters(base: &Llama<B>) -> Result<Vec<Case>, peft_core::PeftError> {
    let config = base;
    let device = Default::default();
    let lora = LoraConfig::new()
        .with_r(4)
        .with_lora_alpha(8.0)
        .init::<B>(config, &device)?;
    let lora_all = LoraConfig::new()
        .with_r(2)
        .with_lora_alpha(4.0)
        .with_use_rslora(true)
        .with_target_modules(peft_core::TargetModules::AllLinear)
        .init::<B>(config, &device)?;
    let prefix = PrefixTuningConfig::new()
        .with_num_virtual_tokens(3)
        .init::<B>(config, &device)?;
    let prompt = AdaptionPromptConfig::peft_compatible(4, 2).init::<B>(config, &device)?;
    let official = AdaptionPromptConfig::new()
        .with_adapter_len(4)
        .with_adapter_layers(2)
        .with_gate_shape(GateShape::PerHead)
        .with_gate_activation(GateActivation::Tanh)
        .init::<B>(config, &device)?;
    Ok(vec![
        (
            "lora",
            AdapterFormat::Peft,
            lora.map(&mut Randomise(0.2)).into(),
        ),
        (
            "lora_all_rslora",
            AdapterFormat::Peft,
            lora_all.map(&mut Randomise(0.2)).into(),
        ),
        (
            "prefix",
            AdapterFormat::Peft,
            prefix.map(&mut Randomise(1.0)).into(),
        ),
        (
            "adaption_prompt",
            AdapterFormat::Peft,
            prompt.map(&mut Randomise(0.8)).into(),
        ),
        (
            "official",
            AdapterFormat::Official,
            official.map(&mut Randomise(0.8)).into(),
        ),
    ])
}

fn write_logits(path: &Path, logits: Tensor<B, 3>) -> Result<(), Box<dyn std::error::Error>> {
    let tensor = NamedTensor {
        key: "logits".into(),
        shape: logits.dims().to_vec(),
        values: host_values(logits),
    };
    std::fs::write(path, safetensors_bytes(&[tensor], path)?)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: write_test_adapters OUT_DIR")?;
    let device = Default::default();
    B::seed(&device, 2024);
    let mut manifest = Vec::new();
    for model in MODELS {
        let model_dir = repository().join("fixtures").join(model).join("model");
        let base = LlamaLoader::new(&model_dir).load::<B>(&device)?;
        let tokens = inputs(model)?;
        for (case, format, adapter) in adapters(&base)? {
            let dir = out.join(model).join(case);
            std::fs::create_dir_all(&dir)?;
            save_adapter(&adapter, &base, &dir, Some(format))?;
            let logits = base.forward(&tokens, adapter.hooks(&base).as_ref(), None)?;
            write_logits(&dir.join("logits.safetensors"), logits)?;
            manifest.push(json!({
                "model": model,
                "case": case,
                "method": adapter.method().peft_type(),
                "format": format!("{format:?}"),
                "dir": dir,
                "model_dir": model_dir.canonicalize()?,
                "inputs": repository().join("fixtures").join(model).join("inputs.safetensors").canonicalize()?,
                "parameters": adapter.num_trainable_parameters(),
            }));
            println!(
                "{model}/{case}: {} {format:?}, {} parameters",
                adapter.method(),
                adapter.num_trainable_parameters()
            );
        }
    }
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    Ok(())
}

//! `peft inspect`: describe a model directory or an adapter.

use std::path::{Path, PathBuf};

use peft_core::{detect_format, AdapterFormat};
use peft_llama::weights::TensorMap;
use peft_llama::{ChatTemplate, Llama, LlamaLoader};

use crate::backend::{device, Inference};
use crate::model_args::default_model_dir;
use crate::AnyResult;

/// Describe a model directory or an adapter (PEFT, peft-rs or official checkpoint).
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A model directory or an adapter; defaults to the built-in model.
    path: Option<PathBuf>,
}

/// Runs `peft inspect`.
pub fn run(args: InspectArgs) -> AnyResult<()> {
    let path = args.path.unwrap_or_else(default_model_dir);
    let gguf = peft_llama::weights::is_gguf(&path);
    if gguf || path.join("config.json").is_file() || path.join("params.json").is_file() {
        inspect_model(&path)
    } else {
        inspect_adapter(&path)
    }
}

fn inspect_model(dir: &Path) -> AnyResult<()> {
    let loader = LlamaLoader::new(dir);
    let layout = loader.layout()?;
    let model: Llama<Inference> = loader.load(&device())?;
    let c = &model.config;
    println!("model        {}", dir.display());
    println!("layout       {layout:?}");
    println!(
        "architecture {} ({}): {} layers, hidden {}, {} heads ({} key/value heads, head_dim {}), FFN {}",
        c.family.architecture(), c.family, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
        c.num_key_value_heads, c.head_dim, c.intermediate_size
    );
    let mut variant = Vec::new();
    if c.attention_bias {
        variant.push("q/k/v biases".to_string());
    }
    if c.o_proj_bias {
        variant.push("o_proj bias".to_string());
    }
    if c.mlp_bias {
        variant.push("MLP biases".to_string());
    }
    if c.qk_norm {
        variant.push("q/k RMSNorm per head".to_string());
    }
    if let Some(window) = c.sliding_window {
        variant.push(format!(
            "sliding window {window} on layers {:?}",
            c.sliding_window_layers
        ));
    }
    if !variant.is_empty() {
        println!("variant      {}", variant.join(", "));
    }
    println!("vocabulary   {}", c.vocab_size);
    println!(
        "rope         theta {}, scaling {:?}",
        c.rope_theta, c.rope_scaling
    );
    println!(
        "embeddings   {}",
        if c.tie_word_embeddings {
            "tied"
        } else {
            "separate output head"
        }
    );
    let gguf = peft_llama::weights::is_gguf(dir)
        .then(|| peft_io::gguf::GgufFile::open(dir))
        .transpose()?;
    let template = match &gguf {
        Some(file) => ChatTemplate::from_gguf(file),
        None => ChatTemplate::locate(dir)?,
    };
    match template {
        Some(template) => println!("template     chat template ({})", template.origin()),
        None => println!("template     none (use --template alpaca or none)"),
    }
    let targets: Vec<String> = c
        .linear_sites()
        .into_iter()
        .filter(|site| site.layer == Some(0))
        .filter_map(|site| site.path.rsplit('.').next().map(str::to_string))
        .collect();
    println!("targets      {} (LoRA target_modules)", targets.join(", "));
    println!("parameters   {}", c.num_parameters());
    println!("dtype        {:?}", model.dtype());
    if let Some(file) = &gguf {
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for tensor in &file.tensors {
            *kinds.entry(format!("{:?}", tensor.kind)).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        println!(
            "gguf         version {}, tensors {} (dequantised to the compute dtype on load)",
            file.version,
            kinds.join(", ")
        );
    }
    println!("loaded       every tensor matched the configuration (none missing, none unexpected)");
    Ok(())
}

fn inspect_adapter(path: &Path) -> AnyResult<()> {
    let format = detect_format(path)?;
    let (config, weights) = match format {
        AdapterFormat::Peft => (
            Some(path.join("adapter_config.json")),
            path.join("adapter_model.safetensors"),
        ),
        AdapterFormat::Native => (
            Some(path.join("peft_rs_config.json")),
            path.join("adapter.safetensors"),
        ),
        AdapterFormat::Official => {
            let file = if path.is_dir() {
                path.join("adapter.pth")
            } else {
                path.to_path_buf()
            };
            (None, file)
        }
    };
    let mut tensors = TensorMap::new(weights.display().to_string());
    match weights.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => tensors.add_safetensors(&weights)?,
        _ => tensors.add_pth(&weights)?,
    }
    let keys: Vec<String> = tensors.keys().cloned().collect();
    let count: usize = keys
        .iter()
        .map(|k| {
            tensors
                .shape(k)
                .unwrap_or_default()
                .iter()
                .product::<usize>()
        })
        .sum();
    let bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
    println!("adapter      {}", path.display());
    println!("format       {format:?}");
    match &config {
        Some(config_path) => {
            let config = peft_io::files::read_json(config_path)?;
            let method = config
                .get("peft_type")
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            println!("method       {method}");
            println!(
                "config       {}",
                serde_json::to_string(config.get("config").unwrap_or(&config))?
            );
        }
        None => {
            println!(
                "method       ADAPTION_PROMPT (official LLaMA-Adapter v1: per-head tanh gates)"
            );
            if let Some(shape) = tensors.shape(peft_core::official_format::PROMPT_KEY) {
                println!("config       adapter_query rows {} = adapter_layers × adapter_len (10 by default)", shape[0]);
            }
        }
    }
    println!("trainable    {count} parameters in {} tensors", keys.len());
    println!(
        "dtype        float32 values ({} bytes on disk, {:.1} KiB)",
        bytes,
        bytes as f64 / 1024.0
    );
    for key in keys.iter().take(8) {
        println!("  {key} {:?}", tensors.shape(key).unwrap_or_default());
    }
    if keys.len() > 8 {
        println!("  ... {} more", keys.len() - 8);
    }
    Ok(())
}

//! `peft merge`: fold a LoRA into the base weights and write a Hugging Face model directory (from
//! a model directory or a GGUF file).

use std::path::{Path, PathBuf};

use peft_core::{Adapter, AnyAdapter, PeftModel};
use peft_llama::weights::save_hf_safetensors;

use crate::model_args::{AdapterArgs, ModelArgs};
use crate::AnyResult;

/// Merge a LoRA adapter into the model and write the result.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Output directory (Hugging Face layout: config, weights, tokenizer files).
    #[arg(long)]
    output: PathBuf,
}

/// Runs `peft merge`.
pub fn run(args: MergeArgs) -> AnyResult<()> {
    if args.adapter.adapter.is_none() {
        return Err("--adapter is required".into());
    }
    let dir = args.model.dir();
    let gguf = peft_llama::weights::is_gguf(&dir);
    if !gguf && !dir.join("config.json").is_file() {
        return Err(format!(
            "{}: merging needs a Hugging Face model directory (config.json) or a GGUF file",
            dir.display()
        )
        .into());
    }
    // A GGUF base becomes a Hugging Face directory: everything but the weights comes from the
    // file's metadata, checked before any work.
    let side_files = if gguf {
        peft_llama::gguf::hf_side_files(&peft_io::gguf::GgufFile::open(&dir)?)?
    } else {
        Vec::new()
    };
    let model = args.model.load()?;
    let adapter = args.adapter.load(&model)?.expect("checked above");
    if !matches!(adapter, AnyAdapter::Lora(_)) {
        return Err(format!(
            "{} adapters change attention, not weights: only LoRA can be merged into a model",
            adapter.method()
        )
        .into());
    }
    let mut peft = PeftModel::new(model);
    peft.add_adapter("merge", adapter)?;
    peft.merge_active()?;
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same(&dir, &args.output) {
        return Err("--output is the model directory: the merged model would overwrite it".into());
    }
    std::fs::create_dir_all(&args.output).map_err(|e| format!("{}: {e}", args.output.display()))?;
    save_hf_safetensors(peft.base(), &args.output.join("model.safetensors"))?;
    for (name, text) in &side_files {
        let path = args.output.join(name);
        peft_io::files::write_atomic(&path, text.as_bytes())?;
    }
    if gguf {
        println!(
            "merged {} into {} (a Hugging Face directory: dequantized weights in {:?}, \
             configuration, tokenizer and chat template from the GGUF metadata)",
            args.adapter.adapter.as_ref().expect("checked").display(),
            args.output.display(),
            args.model.dtype
        );
        return Ok(());
    }
    // Every file but the weights: configuration, generation settings, tokenizer files, chat
    // template, README, licence. The merged weights replace the originals.
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let source = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let Some(name) = source.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if !source.is_file() || is_weight_file(&name) {
            continue;
        }
        std::fs::copy(&source, args.output.join(&name))
            .map_err(|e| format!("{}: {e}", source.display()))?;
    }
    println!(
        "merged {} into {}",
        args.adapter.adapter.as_ref().expect("checked").display(),
        args.output.display()
    );
    Ok(())
}

/// Whether a model directory's file holds weights (which the merged model replaces).
fn is_weight_file(name: &str) -> bool {
    let weight_extension = [".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf"]
        .iter()
        .any(|extension| name.ends_with(extension));
    weight_extension || name.ends_with(".index.json")
}

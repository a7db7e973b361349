//! `peft merge`: fold a LoRA into the base weights and write a Hugging Face model directory.

use std::path::PathBuf;

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
    if !dir.join("config.json").is_file() {
        return Err(format!(
            "{}: merging needs a Hugging Face model directory (config.json)",
            dir.display()
        )
        .into());
    }
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
    std::fs::create_dir_all(&args.output).map_err(|e| format!("{}: {e}", args.output.display()))?;
    save_hf_safetensors(peft.base(), &args.output.join("model.safetensors"))?;
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
    ] {
        let source = dir.join(file);
        if source.is_file() {
            std::fs::copy(&source, args.output.join(file))
                .map_err(|e| format!("{}: {e}", source.display()))?;
        }
    }
    println!(
        "merged {} into {}",
        args.adapter.adapter.as_ref().expect("checked").display(),
        args.output.display()
    );
    Ok(())
}

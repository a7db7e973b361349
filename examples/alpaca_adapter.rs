//! The LLaMA-Adapter paper's Alpaca recipe: adaption prompts (`K = 10` in the top `L = 30`
//! layers, or all but the bottom two on a smaller model; per-head tanh gates starting at
//! zero), 5 epochs with 2 of linear warm-up, base learning rate 9e-3 (peak = blr · 32 / 256),
//! weight decay 0.02, AdamW betas (0.9, 0.95), effective batch 32 (4 × 8 accumulation),
//! examples cut at 512 tokens. Answers a few instructions before and after training.
//!
//! ```sh
//! cargo run --release --example alpaca_adapter                         # stories260k, built-in data
//! cargo run --release --example alpaca_adapter -- --model DIR --data alpaca_data.json --output runs/alpaca
//! ```

use peft_core::Adapter;
use std::path::PathBuf;

use clap::Parser;
use peft_core::{save_adapter, AdaptionPromptConfig, AnyAdapter};
use peft_examples::{
    default_data, default_model_dir, machine_description, write_json, Experiment, LossCurves,
    Result, Training,
};
use peft_llama::{generate, GenerationConfig, Llama, LlamaTokenizer, NoHooks};
use peft_train::{alpaca_prompt, evaluate, evaluate_base, train, BatchingConfig, TrainerConfig};

#[derive(Parser)]
#[command(about = "Fine-tune LLaMA-Adapter with the paper's Alpaca recipe")]
struct Args {
    /// LLaMA checkpoint directory (Hugging Face or Meta layout); default: stories260k.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Alpaca-format data (`alpaca_data.json` or JSON Lines); default: the built-in demo set.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Folder for metrics, the loss plot, checkpoints, the adapter and `results.json`.
    #[arg(long, default_value = "runs/alpaca_adapter")]
    output: PathBuf,
    /// Records held out for validation.
    #[arg(long, default_value_t = 50)]
    val_size: usize,
    /// Seed of the prompts, the split and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens to generate per answer.
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
}

/// Instructions answered before and after training (greedy decoding).
const INSTRUCTIONS: [&str; 3] = [
    "Tell me a short story about a cat.",
    "Name three colors.",
    "What do you do when you are sad?",
];

fn answers(
    base: &Llama<Training>,
    adapter: Option<&AnyAdapter<Training>>,
    tokenizer: &LlamaTokenizer,
    max_new_tokens: usize,
) -> Result<Vec<String>> {
    let hooks = match adapter {
        Some(adapter) => adapter.hooks(base),
        None => Box::new(NoHooks),
    };
    let config = GenerationConfig {
        max_new_tokens,
        eos_token_ids: base.config.eos_token_ids.clone(),
        ..GenerationConfig::default()
    };
    let mut out = Vec::new();
    for instruction in INSTRUCTIONS {
        let prompt = tokenizer.encode(&alpaca_prompt(instruction, ""), true)?;
        let generation = generate(base, hooks.as_ref(), &[prompt], &config)?;
        let ids: Vec<u32> = generation[0]
            .generated_ids
            .iter()
            .copied()
            .filter(|id| !config.eos_token_ids.contains(id))
            .collect();
        out.push(tokenizer.decode(&ids)?.trim().to_string());
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = args.model.clone().unwrap_or_else(default_model_dir);
    let data = args.data.clone().unwrap_or_else(default_data);
    let device = Default::default();
    let experiment =
        Experiment::<Training>::load(&model, &data, args.val_size, 512, args.seed, &device)?;
    let base = &experiment.base;
    let layers = 30.min(base.config.num_hidden_layers.saturating_sub(2).max(1));
    <Training as burn::tensor::backend::Backend>::seed(&device, args.seed);
    let adapter = AnyAdapter::AdaptionPrompt(
        AdaptionPromptConfig::new()
            .with_adapter_len(10)
            .with_adapter_layers(layers)
            .init(base, &device)?,
    );
    // TrainerConfig's defaults are the paper's recipe; only the length cap is spelled out.
    let trainer = TrainerConfig::new()
        .with_batching(BatchingConfig::new(4).with_max_seq_len(512))
        .with_seed(args.seed);
    eprintln!(
        "LLaMA-Adapter K=10, L={layers} on {} ({} trainable parameters); {} training and {} held-out examples from {}; peak lr {:.3e}, effective batch {}",
        model.display(),
        adapter.num_trainable_parameters(),
        experiment.train.len(),
        experiment.validation.len(),
        data.display(),
        trainer.peak_lr(),
        trainer.effective_batch()
    );
    let before = answers(base, None, &experiment.tokenizer, args.max_new_tokens)?;
    let (base_loss, targets) = evaluate_base(base, &experiment.validation, &trainer.batching)?;

    let mut curves = LossCurves::new("alpaca", 5);
    let (adapter, summary) = train(
        base,
        adapter,
        &experiment.train,
        &experiment.validation,
        &trainer.clone().with_output(Some(args.output.clone())),
        &mut curves,
    )?;
    let adapter_dir = args.output.join("adapter");
    save_adapter(&adapter, base, &adapter_dir, None)?;
    let (adapted_loss, _) = evaluate(
        base,
        Some(&adapter),
        &experiment.validation,
        &trainer.batching,
    )?;
    let after = answers(
        base,
        Some(&adapter),
        &experiment.tokenizer,
        args.max_new_tokens,
    )?;

    println!("\n| | held-out loss ({targets} response tokens) | perplexity |");
    println!("| --- | ---: | ---: |");
    println!("| base model | {base_loss:.4} | {:.2} |", base_loss.exp());
    println!(
        "| with LLaMA-Adapter | {adapted_loss:.4} | {:.2} |",
        adapted_loss.exp()
    );
    println!(
        "\n{} optimiser steps in {:.1} s ({:.0} tokens/s in the steps); adapter in {}\n",
        summary.steps,
        summary.seconds,
        summary.tokens_per_second(),
        adapter_dir.display()
    );
    for ((instruction, before), after) in INSTRUCTIONS.iter().zip(&before).zip(&after) {
        println!("### {instruction}\nbefore: {before}\nafter:  {after}\n");
    }
    write_json(
        &args.output.join("results.json"),
        &serde_json::json!({
            "recipe": {
                "adapter_len": 10, "adapter_layers": layers, "epochs": trainer.epochs,
                "warmup_epochs": trainer.warmup_epochs, "blr": trainer.blr,
                "peak_lr": trainer.peak_lr(), "weight_decay": trainer.optimizer.weight_decay,
                "effective_batch": trainer.effective_batch(), "max_seq_len": 512,
            },
            "model": model, "data": data, "seed": args.seed, "machine": machine_description(),
            "trainable": adapter.num_trainable_parameters(), "steps": summary.steps,
            "seconds": summary.seconds, "step_seconds": summary.step_seconds, "tokens": summary.tokens,
            "base_val_loss": base_loss, "adapted_val_loss": adapted_loss,
            "val_targets": targets, "train_curve": curves.train, "val_curve": curves.validation,
            "generations": INSTRUCTIONS.iter().zip(before.iter().zip(&after)).map(|(i, (b, a))| {
                serde_json::json!({"instruction": i, "before": b, "after": a})
            }).collect::<Vec<_>>(),
        }),
    )?;
    println!("wrote {}", args.output.join("results.json").display());
    Ok(())
}

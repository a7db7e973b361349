//! The shape of the paper's ablation on the number of adapted layers (its Table 4): held-out
//! loss as adaption prompts are inserted into more of the top layers. stories260k has 5 layers,
//! so `L` runs from 1 to 5, every run with the same data, data order, seed and steps.
//!
//! ```sh
//! cargo run --release --example layers_ablation [-- --output runs/layers_ablation --layers 1,2,3,4,5]
//! ```

use std::path::PathBuf;

use clap::Parser;
use peft_core::AdaptionPromptConfig;
use peft_examples::{
    default_data, default_model_dir, machine_description, train_adaption_prompt, write_file,
    write_json, Experiment, Result, Training,
};
use peft_train::{AdamWConfig, BatchingConfig, TrainerConfig};

#[derive(Parser)]
#[command(about = "Held-out loss as the number of adapted layers grows")]
struct Args {
    /// Model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Alpaca-format training data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Folder for the results, the plot and each run.
    #[arg(long, default_value = "runs/layers_ablation")]
    output: PathBuf,
    /// Numbers of adapted layers to try (counted from the top); default: 1 to all.
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Seed of the prompts and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Passes over the training data.
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-2)]
    lr: f64,
    /// Records held out.
    #[arg(long, default_value_t = 50)]
    val_size: usize,
}

/// An SVG line plot of held-out loss over the number of adapted layers.
fn layers_plot(points: &[(usize, f64)], base_loss: f64) -> String {
    // The generic loss-curve plot takes x as "step"; here x is the number of layers, and the
    // base model's loss is drawn as a flat reference line.
    let curve: Vec<(f64, f64)> = points.iter().map(|&(l, v)| (l as f64, v)).collect();
    let last = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let reference = vec![(0.0, base_loss), (last, base_loss)];
    peft_train::metrics::loss_plot(&[
        ("held-out loss after training", "#1f77b4", &curve),
        ("base model (no adapter)", "#7f7f7f", &reference),
    ])
    .replace("optimiser step (0 to", "adapted layers L (0 to")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = args.model.clone().unwrap_or_else(default_model_dir);
    let data = args.data.clone().unwrap_or_else(default_data);
    let device = Default::default();
    let experiment =
        Experiment::<Training>::load(&model, &data, args.val_size, 512, args.seed, &device)?;
    let num_layers = experiment.base.config.num_hidden_layers;
    let layers = if args.layers.is_empty() {
        (1..=num_layers).collect()
    } else {
        args.layers.clone()
    };
    let trainer = TrainerConfig::new()
        .with_epochs(args.epochs)
        .with_lr(Some(args.lr))
        .with_optimizer(AdamWConfig::llama_adapter())
        .with_batching(BatchingConfig::new(4).with_max_seq_len(512))
        .with_seed(args.seed);
    let (base_loss, _) =
        peft_train::evaluate_base(&experiment.base, &experiment.validation, &trainer.batching)?;
    let mut rows = Vec::new();
    let mut points = Vec::new();
    for &count in &layers {
        let adapter = AdaptionPromptConfig::new().with_adapter_layers(count);
        let label = format!("L={count}");
        eprintln!(
            "training {label}: K=10, {} examples",
            experiment.train.len()
        );
        let run = train_adaption_prompt(
            &experiment,
            &adapter,
            &trainer,
            &args.output.join(format!("layers-{count}")),
            &label,
        )?;
        points.push((count, run.final_loss));
        rows.push((count, run));
    }

    println!("\nbase model held-out loss: {base_loss:.4}\n");
    println!(
        "| adapted layers L | trainable | steps | held-out loss after | change vs base | seconds |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (count, run) in &rows {
        println!(
            "| {count} | {} | {} | {:.4} | {:+.4} | {:.0} |",
            run.trainable,
            run.steps,
            run.final_loss,
            run.final_loss - base_loss,
            run.seconds
        );
    }
    write_file(
        &args.output.join("layers.svg"),
        layers_plot(&points, base_loss).as_bytes(),
    )?;
    let runs: Vec<_> = rows
        .iter()
        .map(|(count, run)| {
            serde_json::json!({
                "adapter_layers": count, "adapter_len": 10, "trainable": run.trainable,
                "steps": run.steps, "seconds": run.seconds,
                "initial_val_loss": run.initial_loss, "final_val_loss": run.final_loss,
                "train_curve": run.curves.train, "val_curve": run.curves.validation,
            })
        })
        .collect();
    write_json(
        &args.output.join("results.json"),
        &serde_json::json!({
            "experiment": "held-out loss versus number of adapted layers",
            "model": model, "data": data, "val_size": args.val_size, "seed": args.seed,
            "epochs": args.epochs, "lr": args.lr, "batch_size": 4, "grad_accum": 8,
            "base_val_loss": base_loss, "machine": machine_description(), "runs": runs,
        }),
    )?;
    println!(
        "\nwrote {} and {}",
        args.output.join("results.json").display(),
        args.output.join("layers.svg").display()
    );
    Ok(())
}

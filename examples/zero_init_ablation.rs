//! The paper's zero-initialised attention ablation (its Table 5 and Figure 5) at the scale of
//! the built-in model: adaption prompts on stories260k trained twice with the same data, data
//! order, prompts, seed and steps, once with gates starting at zero and once with gates drawn
//! from N(0, std²). Writes both loss curves into one plot, and the held-out losses.
//!
//! ```sh
//! cargo run --release --example zero_init_ablation [-- --output runs/zero_init_ablation --seeds 0,1]
//! ```

use std::path::PathBuf;

use clap::Parser;
use peft_core::{AdaptionPromptConfig, GateInit};
use peft_examples::{
    default_data, default_model_dir, machine_description, train_adaption_prompt, write_file,
    write_json, AblationRun, Experiment, Result, Training,
};
use peft_train::{AdamWConfig, BatchingConfig, TrainerConfig};

/// One curve of the plot: label, colour, `(step, loss)` points.
type Series<'a> = (&'a str, &'a str, &'a [(f64, f64)]);

#[derive(Parser)]
#[command(about = "Zero-initialised versus randomly initialised adaption-prompt gates")]
struct Args {
    /// Model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Alpaca-format training data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Folder for the results, the plot and each run.
    #[arg(long, default_value = "runs/zero_init_ablation")]
    output: PathBuf,
    /// Standard deviation of the random gates (raw, before tanh).
    #[arg(long, default_value_t = 1.0)]
    gate_std: f64,
    /// Seeds; each runs both variants.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-2)]
    lr: f64,
    /// Validate every this many optimiser steps.
    #[arg(long, default_value_t = 5)]
    eval_every: usize,
    /// Records held out.
    #[arg(long, default_value_t = 50)]
    val_size: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = args.model.clone().unwrap_or_else(default_model_dir);
    let data = args.data.clone().unwrap_or_else(default_data);
    let device = Default::default();
    let mut results = Vec::new();
    let mut curves = Vec::new();
    for &seed in &args.seeds {
        let experiment =
            Experiment::<Training>::load(&model, &data, args.val_size, 512, seed, &device)?;
        let layers = experiment
            .base
            .config
            .num_hidden_layers
            .saturating_sub(2)
            .max(1);
        let trainer = TrainerConfig::new()
            .with_epochs(args.epochs)
            .with_lr(Some(args.lr))
            .with_optimizer(AdamWConfig::llama_adapter())
            .with_batching(BatchingConfig::new(4).with_max_seq_len(512))
            .with_eval_every(Some(args.eval_every))
            .with_seed(seed);
        for (name, gate_init) in [
            ("zero-init", None),
            ("random-init", Some(GateInit::Random { std: args.gate_std })),
        ] {
            let adapter = AdaptionPromptConfig::new()
                .with_adapter_layers(layers)
                .with_gate_init(gate_init);
            let label = format!("{name} seed {seed}");
            eprintln!(
                "training {label}: K=10, L={layers}, {} examples",
                experiment.train.len()
            );
            let run: AblationRun = train_adaption_prompt(
                &experiment,
                &adapter,
                &trainer,
                &args.output.join(format!("{name}-seed-{seed}")),
                &label,
            )?;
            results.push(serde_json::json!({
                "variant": name, "seed": seed, "gate_init": format!("{gate_init:?}"),
                "adapter_layers": layers, "adapter_len": 10, "trainable": run.trainable,
                "steps": run.steps, "seconds": run.seconds,
                "initial_val_loss": run.initial_loss, "final_val_loss": run.final_loss,
                "final_train_loss": run.curves.train.last().map(|p| p.1),
                "train_curve": run.curves.train, "val_curve": run.curves.validation,
            }));
            curves.push((label, run));
        }
    }

    println!("\n| variant | seed | steps | held-out loss before | held-out loss after | last training loss | seconds |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (label, run) in &curves {
        let (variant, seed) = label.split_once(" seed ").unwrap_or((label, ""));
        println!(
            "| {variant} | {seed} | {} | {:.4} | {:.4} | {:.4} | {:.0} |",
            run.steps,
            run.initial_loss,
            run.final_loss,
            run.curves.train.last().map_or(f64::NAN, |p| p.1),
            run.seconds
        );
    }

    // One plot: training (solid colours) and held-out curves of every run.
    let colours = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let labels: Vec<(String, String)> = curves
        .iter()
        .map(|(label, _)| (format!("{label}: training"), format!("{label}: held-out")))
        .collect();
    let mut series: Vec<Series> = Vec::new();
    for (index, ((_, run), (train_label, val_label))) in curves.iter().zip(&labels).enumerate() {
        let colour = colours[(2 * index) % colours.len()];
        let val_colour = colours[(2 * index + 1) % colours.len()];
        series.push((train_label, colour, &run.curves.train));
        series.push((val_label, val_colour, &run.curves.validation));
    }
    let plot = peft_train::metrics::loss_plot(&series);
    write_file(&args.output.join("loss.svg"), plot.as_bytes())?;
    write_json(
        &args.output.join("results.json"),
        &serde_json::json!({
            "experiment": "zero-initialised versus random gates",
            "model": model, "data": data, "val_size": args.val_size,
            "epochs": args.epochs, "lr": args.lr, "batch_size": 4, "grad_accum": 8,
            "gate_std": args.gate_std, "machine": machine_description(), "runs": results,
        }),
    )?;
    println!(
        "\nwrote {} and {}",
        args.output.join("results.json").display(),
        args.output.join("loss.svg").display()
    );
    Ok(())
}

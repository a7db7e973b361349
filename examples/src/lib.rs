//! What the examples of this directory share: the default model and data, loading and splitting
//! an Alpaca file, recording loss curves while training, and writing results.
//!
//! Each example reproduces one result of the LLaMA-Adapter paper (Zhang et al. 2023) at the
//! scale of the built-in stories260k model; see `docs/reproduction.md` for what was measured.
//! Run them from the repository root:
//!
//! ```sh
//! cargo run --release --example alpaca_adapter
//! cargo run --release --example parameter_table
//! cargo run --release --example zero_init_ablation
//! cargo run --release --example layers_ablation
//! ```
//!
//! Errors are boxed: these are programs for people, which print a message and stop.
#![warn(missing_docs)]

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use peft_core::Adapter;
use peft_llama::{Llama, LlamaLoader, LlamaTokenizer};
use peft_train::{
    load_alpaca, split_validation, tokenize_alpaca_records, AlpacaRecord, Example, StepMetrics,
    TrainObserver,
};

/// Any error, with its message.
pub type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The CPU backend the examples run on.
pub type Inference = burn::backend::NdArray<f32>;

/// [`Inference`] with automatic differentiation, for training.
pub type Training = burn::backend::Autodiff<Inference>;

/// A path inside the repository, found from this crate's location so that the examples work
/// from any directory on a fresh clone.
pub fn repository_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// The vendored stories260k model.
pub fn default_model_dir() -> PathBuf {
    repository_path("models/stories260k")
}

/// The built-in Alpaca demo data (256 short records).
pub fn default_data() -> PathBuf {
    repository_path("data/alpaca_demo_small.json")
}

/// A frozen base model, its tokenizer, and an Alpaca file tokenized and split into training
/// and held-out examples.
pub struct Experiment<B: Backend> {
    /// The frozen base model.
    pub base: Llama<B>,
    /// Its tokenizer.
    pub tokenizer: LlamaTokenizer,
    /// Training examples.
    pub train: Vec<Example>,
    /// Held-out examples.
    pub validation: Vec<Example>,
    /// The held-out records, as text.
    pub validation_records: Vec<AlpacaRecord>,
}

impl<B: Backend> Experiment<B> {
    /// Loads `model_dir` and `data`, holding out `val_size` records chosen with `seed`, and
    /// tokenizes both parts with examples cut at `max_seq_len` tokens.
    ///
    /// # Errors
    /// Unreadable model or data, or fewer records than `val_size` + 1.
    pub fn load(
        model_dir: &Path,
        data: &Path,
        val_size: usize,
        max_seq_len: usize,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        let base = LlamaLoader::new(model_dir).load::<B>(device)?;
        let tokenizer = LlamaTokenizer::from_dir(model_dir)?;
        let records = load_alpaca(data)?;
        let (train, validation_records) = split_validation(records, val_size, seed)?;
        let train = tokenize_alpaca_records(&train, &tokenizer, max_seq_len)?.examples;
        let validation =
            tokenize_alpaca_records(&validation_records, &tokenizer, max_seq_len)?.examples;
        Ok(Self {
            base,
            tokenizer,
            train,
            validation,
            validation_records,
        })
    }
}

/// Records the loss curves of a training run and prints a line every `print_every` steps.
pub struct LossCurves {
    /// Label printed in front of progress lines.
    pub label: String,
    /// `(step, training loss)` after every optimiser step.
    pub train: Vec<(f64, f64)>,
    /// `(step, held-out loss)` after every validation.
    pub validation: Vec<(f64, f64)>,
    print_every: usize,
    started: Instant,
}

impl LossCurves {
    /// Empty curves for a run called `label`.
    pub fn new(label: impl Into<String>, print_every: usize) -> Self {
        Self {
            label: label.into(),
            train: Vec::new(),
            validation: Vec::new(),
            print_every: print_every.max(1),
            started: Instant::now(),
        }
    }
}

impl TrainObserver for LossCurves {
    fn on_step(&mut self, metrics: &StepMetrics, total_steps: usize) {
        self.train.push((metrics.step as f64, metrics.loss));
        if metrics.step.is_multiple_of(self.print_every) || metrics.step == total_steps {
            eprintln!(
                "  [{}] step {}/{} loss {:.4} ({:.0}s)",
                self.label,
                metrics.step,
                total_steps,
                metrics.loss,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn on_validation(&mut self, step: usize, loss: f64) {
        self.validation.push((step as f64, loss));
    }
}

/// Writes `value` as pretty JSON to `path` (atomically), creating the folder.
///
/// # Errors
/// I/O errors.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_file(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Writes `bytes` to `path` (atomically), creating the folder.
///
/// # Errors
/// I/O errors.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    peft_io::files::write_atomic(path, bytes)?;
    Ok(())
}

/// A short description of this machine for results files: CPU model and core count.
pub fn machine_description() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{model}, {cores} cores available")
}

/// What one training run of an ablation produced.
pub struct AblationRun {
    /// The loss curves (the held-out curve starts at step 0, before training).
    pub curves: LossCurves,
    /// Held-out loss of the freshly initialised adapter.
    pub initial_loss: f64,
    /// Held-out loss after the last step.
    pub final_loss: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Wall time of the training in seconds.
    pub seconds: f64,
}

/// Trains adaption prompts made with `adapter` on `experiment` with `trainer`, writing the
/// run (metrics, its own loss plot, checkpoints, the adapter) under `output`.
///
/// The backend's generator is seeded with `trainer.seed` right before the adapter is created,
/// so runs that differ only in their gate initialisation start from the same prompts.
///
/// # Errors
/// An adapter that does not fit the model, or training and I/O errors.
pub fn train_adaption_prompt(
    experiment: &Experiment<Training>,
    adapter: &peft_core::AdaptionPromptConfig,
    trainer: &peft_train::TrainerConfig,
    output: &Path,
    label: &str,
) -> Result<AblationRun> {
    let base = &experiment.base;
    let device = base.device();
    Training::seed(&device, trainer.seed);
    let adapter = peft_core::AnyAdapter::AdaptionPrompt(adapter.init(base, &device)?);
    let trainable = adapter.num_trainable_parameters();
    let (initial_loss, _) = peft_train::evaluate(
        base,
        Some(&adapter),
        &experiment.validation,
        &trainer.batching,
    )?;
    let mut curves = LossCurves::new(label, 10);
    curves.validation.push((0.0, initial_loss));
    let (adapter, summary) = peft_train::train(
        base,
        adapter,
        &experiment.train,
        &experiment.validation,
        &trainer.clone().with_output(Some(output.to_path_buf())),
        &mut curves,
    )?;
    peft_core::save_adapter(&adapter, base, &output.join("adapter"), None)?;
    let final_loss = summary
        .val_loss
        .ok_or("the run has no held-out examples to validate on")?;
    Ok(AblationRun {
        curves,
        initial_loss,
        final_loss,
        trainable,
        steps: summary.steps,
        seconds: summary.seconds,
    })
}

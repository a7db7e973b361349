//! The training loop: gradient accumulation, the LLaMA-Adapter schedule, validation,
//! metrics, atomic checkpoints and exact resumption.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use peft_core::{Adapter, NativeAdapter};
use peft_llama::Llama;

use crate::checkpoint::{CheckpointDir, TrainPosition};
use crate::data::{Batch, BatchingConfig, Example};
use crate::error::{Result, TrainError};
use crate::loss::causal_lm_loss_of;
use crate::metrics::{MetricsLog, StepMetrics};
use crate::optim::{micro_batch_weights, AccumulationWeighting, AdamWConfig};
use crate::parallel::{DataParallel, ReplicaWork};
use crate::schedule::{LrSchedule, LrScheduleConfig};

/// Settings of a training run. Defaults are the LLaMA-Adapter paper's Alpaca recipe.
#[derive(Config, Debug)]
pub struct TrainerConfig {
    /// Passes over the training data.
    #[config(default = 5)]
    pub epochs: usize,
    /// Stop after this many optimiser steps; the schedule (warm-up, cosine) is compressed into
    /// them (see [`TrainerConfig::plan`]).
    #[config(default = "None")]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch on each device.
    #[config(default = 4)]
    pub batch_size: usize,
    /// Devices training data-parallel (one model replica each, see [`train_data_parallel`]).
    #[config(default = 1)]
    pub devices: usize,
    /// Micro-batches per optimiser step.
    #[config(default = 8)]
    pub grad_accum: usize,
    /// Base learning rate: the peak is `blr · effective_batch / 256`.
    #[config(default = 9e-3)]
    pub blr: f64,
    /// Absolute peak learning rate; overrides `blr`.
    #[config(default = "None")]
    pub lr: Option<f64>,
    /// Learning rate at the end of the cosine decay.
    #[config(default = 0.0)]
    pub min_lr: f64,
    /// Epochs of linear warm-up.
    #[config(default = 2.0)]
    pub warmup_epochs: f64,
    /// AdamW settings.
    #[config(default = "AdamWConfig::llama_adapter()")]
    pub optimizer: AdamWConfig,
    /// How micro-batches are weighted within a step.
    #[config(default = "AccumulationWeighting::TargetTokens")]
    pub accumulation: AccumulationWeighting,
    /// Batching (its `batch_size` is overwritten by [`TrainerConfig::batch_size`]).
    #[config(default = "BatchingConfig::new(4)")]
    pub batching: BatchingConfig,
    /// Seed of data order and dropout.
    #[config(default = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many optimiser steps (and at the end).
    #[config(default = "None")]
    pub save_every: Option<usize>,
    /// Validate every this many optimiser steps (and at the end).
    #[config(default = "None")]
    pub eval_every: Option<usize>,
    /// Checkpoints kept on disk (the newest ones).
    #[config(default = 2)]
    pub keep_checkpoints: usize,
    /// Where the run writes `metrics.jsonl`, `loss.svg` and `checkpoints/`; `None` writes
    /// nothing (no checkpoints, so no resume).
    #[config(default = "None")]
    pub output: Option<PathBuf>,
    /// Continue from the newest checkpoint under `output` (the adapter given is then only a
    /// template of the right shapes).
    #[config(default = false)]
    pub resume: bool,
}

impl TrainerConfig {
    /// Examples per optimiser step: micro-batch size × accumulation × devices (the official
    /// code's `batch_size · accum_iter · world_size`).
    pub fn effective_batch(&self) -> usize {
        self.batch_size * self.grad_accum * self.devices.max(1)
    }

    /// The peak learning rate.
    pub fn peak_lr(&self) -> f64 {
        self.lr
            .unwrap_or(self.blr * self.effective_batch() as f64 / 256.0)
    }
}

/// What a run will do, known before it starts: [`TrainerConfig::plan`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainPlan {
    /// Optimiser steps per epoch.
    pub steps_per_epoch: usize,
    /// Optimiser steps of the run (`max_steps` when it cuts the epochs short).
    pub total_steps: usize,
    /// Steps of linear warm-up within the run.
    pub warmup_steps: f64,
    /// The peak learning rate.
    pub peak_lr: f64,
    /// Real tokens the run trains on (examples' lengths over the epochs it covers).
    pub tokens: usize,
    /// The learning rate of every step, as a function of the step and `steps_per_epoch`.
    pub schedule: LrSchedule,
}

impl TrainerConfig {
    /// The plan of a run on `train`: its steps, warm-up, peak rate and tokens.
    ///
    /// The schedule spans the run. When `max_steps` ends it before `epochs` do, the warm-up and
    /// the cosine are compressed into those steps in the same proportions (as `transformers`'
    /// `max_steps` does), instead of the run ending inside a warm-up planned for `epochs`.
    ///
    /// # Errors
    /// No examples, a zero batch size or accumulation, an invalid schedule.
    pub fn plan(&self, train: &[Example]) -> Result<TrainPlan> {
        if train.is_empty() {
            return Err(TrainError::input("train", "the training set is empty"));
        }
        if self.grad_accum == 0 || self.batch_size == 0 || self.epochs == 0 {
            return Err(TrainError::config(
                "batch_size / grad_accum / epochs",
                "must be positive",
            ));
        }
        let mut batching = self.batching.clone();
        batching.batch_size = self.batch_size * self.devices.max(1);
        let micro_batches_per_epoch = batching.init()?.num_batches(train.len());
        let steps_per_epoch = micro_batches_per_epoch.div_ceil(self.grad_accum).max(1);
        let scheduled_steps = steps_per_epoch * self.epochs;
        let total_steps = self
            .max_steps
            .map_or(scheduled_steps, |m| m.min(scheduled_steps));
        let fraction = total_steps as f64 / scheduled_steps as f64;
        let (epochs, warmup_epochs) =
            (self.epochs as f64 * fraction, self.warmup_epochs * fraction);
        let schedule = LrScheduleConfig::new(self.blr, self.effective_batch(), epochs)
            .with_warmup_epochs(warmup_epochs)
            .with_min_lr(self.min_lr)
            .with_lr(self.lr)
            .init()?;
        let tokens_per_epoch: usize = train.iter().map(Example::len).sum();
        Ok(TrainPlan {
            steps_per_epoch,
            total_steps,
            warmup_steps: warmup_epochs * steps_per_epoch as f64,
            peak_lr: schedule.peak_lr(),
            tokens: (tokens_per_epoch as f64 * epochs).round() as usize,
            schedule,
        })
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimiser steps taken in total (including those before a resume).
    pub steps: usize,
    /// Mean training loss of the last step.
    pub last_loss: f64,
    /// Validation loss at the end, if there is validation data.
    pub val_loss: Option<f64>,
    /// Whether this run continued from a checkpoint.
    pub resumed_from: Option<usize>,
    /// Wall time of this run in seconds.
    pub seconds: f64,
    /// The part of [`seconds`](Self::seconds) spent in optimiser steps (forward, backward,
    /// update): without validation, checkpoint writes and the start.
    pub step_seconds: f64,
    /// Real (unpadded) tokens processed by this run.
    pub tokens: usize,
    /// Tokens including padding processed by this run.
    pub padded_tokens: usize,
}

impl TrainSummary {
    /// Real tokens per second of optimiser steps ([`step_seconds`](Self::step_seconds)), the
    /// rate training frameworks report.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.step_seconds.max(1e-9)
    }

    /// [`tokens_per_second`](Self::tokens_per_second) counting padding.
    pub fn padded_tokens_per_second(&self) -> f64 {
        self.padded_tokens as f64 / self.step_seconds.max(1e-9)
    }
}

/// Receives progress as training runs (a progress bar, a test probe).
pub trait TrainObserver {
    /// After every optimiser step.
    fn on_step(&mut self, metrics: &StepMetrics, total_steps: usize) {
        let _ = (metrics, total_steps);
    }
    /// After every validation.
    fn on_validation(&mut self, step: usize, loss: f64) {
        let _ = (step, loss);
    }
}

/// An observer that does nothing.
pub struct Quiet;
impl TrainObserver for Quiet {}

/// Mean token cross-entropy of `adapter` (or the base model alone with `None`) over `examples`:
/// `(loss, target tokens)`.
///
/// # Errors
/// Batching or model errors.
pub fn evaluate<B: Backend, A: Adapter<B>>(
    base: &Llama<B>,
    adapter: Option<&A>,
    examples: &[Example],
    batching: &BatchingConfig,
) -> Result<(f64, usize)> {
    let batcher = batching.clone().with_drop_last(false).init()?;
    let device = base.device();
    let mut total = 0.0;
    let mut count = 0;
    // Epoch 0's plan; the order does not change a sum.
    for batch in batcher.batches(examples, 0) {
        let batch = batch?;
        // Prepared per batch: a batch's features condition its hooks.
        let hooks: Box<dyn peft_llama::LayerHooks<B> + '_> = match adapter {
            Some(adapter) => batch.hooks(adapter, base, &device)?,
            None => Box::new(peft_llama::NoHooks),
        };
        let loss = causal_lm_loss_of(base, &batch.tokens, hooks.as_ref(), &batch.labels)?;
        let value: f64 = loss.loss.into_scalar().to_f64_lossy();
        total += value * loss.targets as f64;
        count += loss.targets;
    }
    if count == 0 {
        return Err(TrainError::input(
            "evaluate",
            "no target tokens in the evaluation data",
        ));
    }
    Ok((total / count as f64, count))
}

/// [`evaluate`] of the base model alone.
///
/// # Errors
/// Batching or model errors.
pub fn evaluate_base<B: Backend>(
    base: &Llama<B>,
    examples: &[Example],
    batching: &BatchingConfig,
) -> Result<(f64, usize)> {
    evaluate::<B, peft_core::AnyAdapter<B>>(base, None, examples, batching)
}

trait ToF64 {
    fn to_f64_lossy(self) -> f64;
}
impl<E: burn::tensor::ElementConversion> ToF64 for E {
    fn to_f64_lossy(self) -> f64 {
        self.elem::<f64>()
    }
}

/// What the trainer needs of an adapter: a method ([`Adapter`]) whose parameters train
/// ([`AutodiffModule`]), that checkpoints save and load ([`NativeAdapter`]), and that replicas
/// on other devices can hold. Every built-in method, [`peft_core::AnyAdapter`], the multimodal adaption
/// prompt and a method of one's own implementing these traits qualify.
pub trait TrainableAdapter<B: AutodiffBackend>:
    Adapter<B> + AutodiffModule<B> + NativeAdapter<B> + Clone + Send + 'static
{
}

impl<B, A> TrainableAdapter<B> for A
where
    B: AutodiffBackend,
    A: Adapter<B> + AutodiffModule<B> + NativeAdapter<B> + Clone + Send + 'static,
{
}

/// Trains `adapter` on `train`, writing metrics and checkpoints under `config.output` when it is
/// set (and continuing from the newest checkpoint there with `config.resume`). The final adapter
/// is returned; saving it is the caller's ([`peft_core::save_adapter`],
/// [`final_adapter_dir`]). Examples with [`Example::features`] condition the
/// adapter through [`Adapter::hooks_with_features`] (the multimodal adaption prompt).
///
/// # Errors
/// Data, model or I/O errors; a non-finite loss (the last good checkpoint stays on disk).
#[allow(clippy::too_many_arguments)]
pub fn train<B: AutodiffBackend, A: TrainableAdapter<B>>(
    base: &Llama<B>,
    adapter: A,
    train: &[Example],
    validation: &[Example],
    config: &TrainerConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(A, TrainSummary)> {
    train_data_parallel(
        base,
        Vec::new(),
        adapter,
        train,
        validation,
        config,
        observer,
    )
}

/// [`train`] on several devices: `base` and `adapter` on the first, `replicas` the same frozen
/// model loaded on each further device (`config.devices` = 1 + their number).
///
/// Every micro-batch holds `batch_size × devices` examples, split into one shard of
/// `batch_size` per device; the adapter's gradients are summed onto the first device through
/// Burn's collectives and one optimiser step is taken there (see [`crate::parallel`]). Data
/// order, learning rate (from the effective batch), checkpoints and resumption are those of a
/// one-device run with micro-batches of `batch_size × devices`; the adapters agree to float
/// rounding. Dropout draws differ per device.
///
/// # Errors
/// As [`train`]; `config.devices` not matching the replicas; a replica's error.
#[allow(clippy::too_many_arguments)]
pub fn train_data_parallel<B: AutodiffBackend, A: TrainableAdapter<B>>(
    base: &Llama<B>,
    replicas: Vec<Llama<B>>,
    adapter: A,
    train: &[Example],
    validation: &[Example],
    config: &TrainerConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(A, TrainSummary)> {
    if config.devices != replicas.len() + 1 {
        return Err(TrainError::config(
            "devices",
            format!(
                "{} devices configured but {} model replicas given",
                config.devices,
                replicas.len() + 1
            ),
        ));
    }
    run(base, replicas, adapter, train, validation, config, observer)
}

#[allow(clippy::too_many_arguments)]
fn run<B, A>(
    base: &Llama<B>,
    replicas: Vec<Llama<B>>,
    adapter: A,
    train: &[Example],
    validation: &[Example],
    config: &TrainerConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(A, TrainSummary)>
where
    B: AutodiffBackend,
    A: TrainableAdapter<B>,
{
    let started = Instant::now();
    // Checks the data and the settings (an empty set, a zero batch size or accumulation).
    let plan_of_run = config.plan(train)?;
    // One micro-batch of the plan is `devices` shards of `batch_size` examples.
    let examples_per_micro_batch = config.batch_size * config.devices;
    let mut batching = config.batching.clone();
    batching.batch_size = examples_per_micro_batch;
    batching.seed = config.seed;
    let batcher = batching.init()?;
    let steps_per_epoch = plan_of_run.steps_per_epoch;
    let total_steps = plan_of_run.total_steps;
    let schedule = plan_of_run.schedule;
    let mut optimizer = config.optimizer.init::<B>()?;
    let output = config.output.as_deref();
    let checkpoints = output.map(|o| CheckpointDir::new(o.join("checkpoints")));
    if config.resume && output.is_none() {
        return Err(TrainError::config(
            "resume",
            "resuming needs the output directory whose checkpoints it continues",
        ));
    }
    let latest_name = || checkpoints.as_ref().and_then(CheckpointDir::latest_name);
    let device = base.device();
    let mut parallel = DataParallel::<B, A>::start(&device, replicas)?;

    let mut adapter = adapter;
    let mut position = TrainPosition {
        examples_per_micro_batch,
        ..TrainPosition::default()
    };
    let mut resumed_from = None;
    if let (true, Some(checkpoints)) = (config.resume, &checkpoints) {
        if let Some(checkpoint) = checkpoints.latest::<B, A>(base, &device)? {
            if checkpoint.adapter.method() != adapter.method() {
                return Err(TrainError::config(
                    "resume",
                    format!(
                        "the checkpoint holds a {} adapter and this run trains {}",
                        checkpoint.adapter.method(),
                        adapter.method()
                    ),
                ));
            }
            adapter = checkpoint.adapter;
            optimizer.load_state(&adapter, &checkpoint.optimizer)?;
            position = checkpoint.position;
            if position.examples_per_micro_batch != 0
                && position.examples_per_micro_batch != examples_per_micro_batch
            {
                // The data position indexes micro-batches of the saved size.
                return Err(TrainError::config(
                    "resume",
                    format!(
                        "the checkpoint was written with {} examples per micro-batch (batch size \
                         × devices) and this run has {examples_per_micro_batch}; resume with the \
                         same product",
                        position.examples_per_micro_batch
                    ),
                ));
            }
            position.examples_per_micro_batch = examples_per_micro_batch;
            resumed_from = Some(position.step);
        }
    }
    let mut metrics = match output {
        Some(output) => Some(MetricsLog::open(output, resumed_from.is_some())?),
        None => None,
    };
    let mut last_loss = f64::NAN;
    let mut tokens = 0;
    let mut padded_tokens = 0;
    let mut step_seconds = 0.0;
    let mut val_loss = None;

    'epochs: while position.step < total_steps {
        let lengths: Vec<usize> = train.iter().map(Example::len).collect();
        let plan = batcher.plan(&lengths, position.epoch as u64);
        while position.micro_batch < plan.len() {
            if position.step >= total_steps {
                break 'epochs;
            }
            let step_started = Instant::now();
            let group_end = (position.micro_batch + config.grad_accum).min(plan.len());
            // Each micro-batch of the plan, as one shard of `batch_size` examples per device
            // (the last shards of a short final micro-batch may be empty).
            let mut shards: Vec<Vec<Batch>> = Vec::with_capacity(group_end - position.micro_batch);
            for indices in &plan[position.micro_batch..group_end] {
                let mut micro = Vec::with_capacity(config.devices);
                for shard in indices.chunks(config.batch_size) {
                    let examples: Vec<&Example> = shard.iter().map(|&i| &train[i]).collect();
                    micro.push(batcher.collate(&examples)?);
                }
                shards.push(micro);
            }
            let weights = micro_batch_weights(
                &shards
                    .iter()
                    .map(|micro| micro.iter().map(|b| b.target_tokens).sum())
                    .collect::<Vec<_>>(),
                config.accumulation,
            );
            // A shard's weight is its micro-batch's times its share of the target tokens, so
            // the replicas' sum is the gradient of the one-device step.
            let mut work: Vec<ReplicaWork> = vec![Vec::new(); config.devices];
            for (micro, weight) in shards.into_iter().zip(&weights) {
                let targets: usize = micro.iter().map(|b| b.target_tokens).sum();
                for (replica, batch) in micro.into_iter().enumerate() {
                    let share = if targets == 0 {
                        0.0
                    } else {
                        batch.target_tokens as f64 / targets as f64
                    };
                    work[replica].push((batch, weight * share));
                }
            }
            // Dropout (LoRA) draws from the backend's generator: seeding it per step makes a
            // resumed run draw exactly what the uninterrupted run drew.
            let seed = config
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(position.step as u64);
            let lr = schedule.at_step(position.step, steps_per_epoch);
            let (grads, totals) = parallel.gradients(base, &adapter, work, seed)?;
            let (step_loss, step_tokens, step_padded) =
                (totals.loss, totals.real_tokens, totals.padded_tokens);
            if !step_loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: position.step,
                    loss: step_loss,
                    checkpoint: latest_name(),
                });
            }
            let (updated, report) = optimizer.step(lr, adapter, grads);
            adapter = updated;
            if report.skipped_non_finite {
                return Err(TrainError::NonFiniteLoss {
                    step: position.step,
                    loss: report.grad_norm,
                    checkpoint: latest_name(),
                });
            }
            position.micro_batch = group_end;
            position.step += 1;
            last_loss = step_loss;
            tokens += step_tokens;
            padded_tokens += step_padded;
            let seconds = step_started.elapsed().as_secs_f64();
            step_seconds += seconds;
            let step_metrics = StepMetrics {
                step: position.step,
                epoch: position.epoch as f64 + position.micro_batch as f64 / plan.len() as f64,
                loss: step_loss,
                lr,
                grad_norm: report.grad_norm,
                tokens: step_tokens,
                padded_tokens: step_padded,
                seconds,
                elapsed: started.elapsed().as_secs_f64(),
            };
            if let Some(metrics) = metrics.as_mut() {
                metrics.step(&step_metrics)?;
            }
            observer.on_step(&step_metrics, total_steps);
            let last = position.step >= total_steps;
            if (config
                .eval_every
                .is_some_and(|e| position.step.is_multiple_of(e))
                || (last && !validation.is_empty()))
                && !validation.is_empty()
            {
                // On the autodiff backend without a backward pass: nothing is kept.
                let (loss, _) = evaluate(base, Some(&adapter), validation, &batching)?;
                if let Some(metrics) = metrics.as_mut() {
                    metrics.validation(position.step, loss)?;
                }
                observer.on_validation(position.step, loss);
                val_loss = Some(loss);
            }
            let save = config
                .save_every
                .is_some_and(|s| position.step.is_multiple_of(s))
                || last;
            if let (true, Some(checkpoints)) = (save, &checkpoints) {
                let mut saved_position = position;
                if saved_position.micro_batch >= plan.len() {
                    saved_position = TrainPosition {
                        epoch: position.epoch + 1,
                        micro_batch: 0,
                        ..position
                    };
                }
                checkpoints.save(
                    &adapter,
                    base,
                    &optimizer.state(&adapter)?,
                    saved_position,
                    config.keep_checkpoints,
                )?;
            }
        }
        position.epoch += 1;
        position.micro_batch = 0;
    }
    if let (Some(metrics), Some(output)) = (&metrics, output) {
        metrics.plot(output)?;
    }
    let summary = TrainSummary {
        steps: position.step,
        last_loss,
        val_loss,
        resumed_from,
        seconds: started.elapsed().as_secs_f64(),
        step_seconds,
        tokens,
        padded_tokens,
    };
    Ok((adapter, summary))
}

/// Where `train` writes the final adapter.
pub fn final_adapter_dir(output: &Path) -> PathBuf {
    output.join("adapter")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use peft_core::{AnyAdapter, LoraConfig};

    type B = Autodiff<NdArray<f32>>;

    fn examples() -> Vec<Example> {
        (0..6u32)
            .map(|i| {
                let ids: Vec<u32> = (0..6).map(|t| (i * 7 + t * 3) % 40 + 3).collect();
                let labels = ids.iter().map(|&id| i64::from(id)).collect();
                Example::new(ids, labels)
            })
            .collect()
    }

    #[test]
    fn max_steps_compresses_the_warm_up_and_the_cosine_into_the_run() {
        let examples: Vec<Example> = (0..40)
            .map(|i| Example::new(vec![1, 2, 3 + i], vec![1, 2, 3]))
            .collect();
        // 40 examples, batches of 2, no accumulation: 20 steps per epoch, 100 over 5 epochs,
        // the first 40 of them warm-up.
        let config = TrainerConfig::new()
            .with_batch_size(2)
            .with_grad_accum(1)
            .with_lr(Some(1e-2));
        let full = config.plan(&examples).unwrap();
        assert_eq!((full.steps_per_epoch, full.total_steps), (20, 100));
        assert!((full.warmup_steps - 40.0).abs() < 1e-9);
        assert_eq!(full.tokens, 40 * 3 * 5);
        // Cut to 10 steps: 4 of warm-up, the peak reached, the last step near the end of the
        // cosine, not 10 steps into a 40-step warm-up.
        let cut = config
            .clone()
            .with_max_steps(Some(10))
            .plan(&examples)
            .unwrap();
        assert_eq!(cut.total_steps, 10);
        assert!((cut.warmup_steps - 4.0).abs() < 1e-9);
        let rates: Vec<f64> = (0..10)
            .map(|s| cut.schedule.at_step(s, cut.steps_per_epoch))
            .collect();
        assert_eq!(rates[0], 0.0);
        assert!((rates[4] - 1e-2).abs() < 1e-12, "{rates:?}");
        assert!(rates[9] < 0.1e-2, "{rates:?}");
        assert_eq!(cut.tokens, 10 * 2 * 3);
    }

    /// The summary's rate counts the optimiser steps' time only, not validation's.
    #[test]
    fn the_summary_rate_is_over_the_steps_time() {
        struct Steps(Vec<f64>, usize);
        impl TrainObserver for Steps {
            fn on_step(&mut self, metrics: &StepMetrics, _: usize) {
                self.0.push(metrics.seconds);
            }
            fn on_validation(&mut self, _: usize, _: f64) {
                self.1 += 1;
            }
        }
        let device = Default::default();
        let base = peft_llama::LlamaConfig::new(48, 32, 48, 4, 4, 2, 8)
            .init::<B>(&device, burn::tensor::DType::F32);
        let adapter: AnyAdapter<B> = LoraConfig::new().init(&base, &device).unwrap().into();
        let config = TrainerConfig::new()
            .with_epochs(1)
            .with_batch_size(2)
            .with_grad_accum(1)
            .with_lr(Some(1e-2))
            .with_warmup_epochs(0.0)
            .with_eval_every(Some(1));
        let mut observer = Steps(Vec::new(), 0);
        let data = examples();
        let (_, summary) =
            train(&base, adapter, &data, &data[..4], &config, &mut observer).unwrap();
        assert_eq!((observer.0.len(), observer.1), (3, 3));
        let in_steps: f64 = observer.0.iter().sum();
        assert!((summary.step_seconds - in_steps).abs() < 1e-9);
        assert!(summary.step_seconds > 0.0 && summary.step_seconds < summary.seconds);
        assert_eq!(summary.tokens, 36);
        assert_eq!(summary.tokens_per_second(), 36.0 / summary.step_seconds);
    }

    #[test]
    fn without_an_output_directory_a_run_writes_nothing_and_cannot_resume() {
        let device = Default::default();
        let base = peft_llama::LlamaConfig::new(48, 32, 48, 4, 4, 2, 8)
            .init::<B>(&device, burn::tensor::DType::F32);
        let adapter: AnyAdapter<B> = LoraConfig::new().init(&base, &device).unwrap().into();
        let config = TrainerConfig::new()
            .with_epochs(1)
            .with_batch_size(2)
            .with_grad_accum(1)
            .with_lr(Some(1e-2))
            .with_warmup_epochs(0.0);
        let cwd_before: Vec<_> = std::fs::read_dir(".")
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let (_, summary) = train(
            &base,
            adapter.clone(),
            &examples(),
            &[],
            &config,
            &mut Quiet,
        )
        .unwrap();
        assert_eq!(summary.steps, 3);
        let cwd_after: Vec<_> = std::fs::read_dir(".")
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(cwd_before, cwd_after, "a run without output wrote files");
        let error = train(
            &base,
            adapter,
            &examples(),
            &[],
            &config.with_resume(true),
            &mut Quiet,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("resum"), "{error}");
    }
}

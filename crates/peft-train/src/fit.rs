//! Training any adapter on any model: the optimiser loop as a function of the adapter, a loss
//! function and a configuration.
//!
//! [`crate::train`] is the full causal-LM run on a LLaMA (data, accumulation, data parallel,
//! checkpoints, resume). [`fit`] is the loop underneath for a model and a task of one's own: it
//! takes batches of any type, calls the loss function with the current adapter, and steps AdamW
//! on the learning-rate schedule; metrics go to an observer and, when asked, to `metrics.jsonl`.
//!
//! ```ignore
//! let (adapter, summary) = peft_train::fit(
//!     adapter,
//!     batches,                                        // any iterator
//!     |adapter, batch| my_loss(&base, adapter, batch), // forward with adapter.hooks(&base)
//!     &FitConfig::new(100).with_lr(1e-3),
//!     &mut peft_train::Quiet,
//! )?;
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use crate::error::{Result, TrainError};
use crate::metrics::{MetricsLog, StepMetrics};
use crate::optim::AdamWConfig;
use crate::schedule::LrScheduleConfig;
use crate::trainer::TrainObserver;

/// Settings of a [`fit`] run.
#[derive(Config, Debug)]
pub struct FitConfig {
    /// Optimiser steps (one batch each); fewer if the batches run out first.
    pub steps: usize,
    /// Peak learning rate.
    #[config(default = 1e-3)]
    pub lr: f64,
    /// Steps of linear warm-up from 0 (0: the first step already uses `lr`).
    #[config(default = 0)]
    pub warmup_steps: usize,
    /// Learning rate at the end of the half-cosine decay that follows the warm-up; `lr` for a
    /// constant rate.
    #[config(default = 0.0)]
    pub min_lr: f64,
    /// AdamW settings (PyTorch's defaults).
    #[config(default = "AdamWConfig::new()")]
    pub optimizer: AdamWConfig,
    /// Directory for `metrics.jsonl` and `loss.svg`; `None` writes nothing.
    #[config(default = "None")]
    pub output: Option<PathBuf>,
}

/// What a [`fit`] run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct FitSummary {
    /// Optimiser steps taken.
    pub steps: usize,
    /// The loss of every step, in order.
    pub losses: Vec<f64>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Trains `adapter` for `config.steps` steps: for each batch, `loss(&adapter, batch)` (a scalar
/// tensor whose graph reaches the adapter's parameters, typically the model's forward with
/// `adapter.hooks(&base)`), its gradients, and one AdamW step at the scheduled rate.
///
/// # Errors
/// A bad configuration, an error from `loss` ([`TrainError::Loss`]), a loss or gradient that is
/// not finite ([`TrainError::NonFiniteLoss`]; the adapter is returned to no one, nothing is
/// saved by this function), or failing to write the metrics.
pub fn fit<B, A, T, E>(
    adapter: A,
    batches: impl IntoIterator<Item = T>,
    mut loss: impl FnMut(&A, T) -> std::result::Result<Tensor<B, 1>, E>,
    config: &FitConfig,
    observer: &mut dyn TrainObserver,
) -> Result<(A, FitSummary)>
where
    B: AutodiffBackend,
    A: AutodiffModule<B>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    if config.steps == 0 {
        return Err(TrainError::config("steps", "must be positive"));
    }
    if config
        .min_lr
        .partial_cmp(&config.lr)
        .is_none_or(|o| o.is_gt())
    {
        return Err(TrainError::config(
            "min_lr",
            format!("must not exceed lr ({}), got {}", config.lr, config.min_lr),
        ));
    }
    // The epoch-based schedule with one step per "epoch".
    let schedule = LrScheduleConfig::new(config.lr, 256, config.steps as f64)
        .with_lr(Some(config.lr))
        .with_min_lr(config.min_lr)
        .with_warmup_epochs(config.warmup_steps as f64)
        .init()?;
    let mut optimizer = config.optimizer.init::<B>()?;
    let mut metrics = match &config.output {
        Some(dir) => Some(MetricsLog::open(dir, false)?),
        None => None,
    };
    let mut adapter = adapter;
    let mut losses = Vec::with_capacity(config.steps);
    for (step, batch) in batches.into_iter().take(config.steps).enumerate() {
        let step_started = Instant::now();
        let value = loss(&adapter, batch).map_err(|e| TrainError::Loss {
            step,
            source: e.into(),
        })?;
        let scalar: f64 = value.clone().into_scalar().elem();
        if !scalar.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step,
                loss: scalar,
                checkpoint: None,
            });
        }
        let grads = GradientsParams::from_grads(value.backward(), &adapter);
        // Warm-up counts from step 1, so that the first step does not run at rate 0.
        let lr = if config.warmup_steps == 0 {
            schedule.at_step(step, 1)
        } else {
            schedule.at_step(step + 1, 1)
        };
        let (updated, report) = optimizer.step(lr, adapter, grads);
        if report.skipped_non_finite {
            return Err(TrainError::NonFiniteLoss {
                step,
                loss: report.grad_norm,
                checkpoint: None,
            });
        }
        adapter = updated;
        losses.push(scalar);
        let step_metrics = StepMetrics {
            step: step + 1,
            epoch: (step + 1) as f64 / config.steps as f64,
            loss: scalar,
            lr,
            grad_norm: report.grad_norm,
            tokens: 0,
            padded_tokens: 0,
            seconds: step_started.elapsed().as_secs_f64(),
            elapsed: started.elapsed().as_secs_f64(),
        };
        if let Some(log) = metrics.as_mut() {
            log.step(&step_metrics)?;
        }
        observer.on_step(&step_metrics, config.steps);
    }
    if let (Some(log), Some(dir)) = (&metrics, &config.output) {
        log.plot(dir)?;
    }
    Ok((
        adapter,
        FitSummary {
            steps: losses.len(),
            losses,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}

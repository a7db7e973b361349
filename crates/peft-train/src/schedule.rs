//! The learning-rate schedule of LLaMA-Adapter: linear warmup, then half-cosine decay.
//!
//! As the official `alpaca_finetuning_v1` code (its `util/lr_sched.py` is MAE's
//! `adjust_learning_rate`, called before every optimiser step with the fractional epoch
//! `data_iter_step / len(data_loader) + epoch`):
//!
//! ```text
//! lr       = blr · effective_batch / 256                       (unless given directly)
//! lr(e)    = lr · e / warmup_epochs                            for e < warmup_epochs
//!          = min_lr + (lr − min_lr) · ½ · (1 + cos(π · (e − warmup_epochs) / (epochs − warmup_epochs)))
//! ```
//!
//! The first step of a run with warmup therefore has learning rate 0, as in the official code.

use burn::config::Config;

use crate::error::{Result, TrainError};

/// [`LrSchedule`] configuration; names follow the official script's arguments.
#[derive(Config, Debug)]
pub struct LrScheduleConfig {
    /// Base learning rate `blr`: the peak learning rate is `blr · effective_batch / 256`.
    pub blr: f64,
    /// Examples per optimiser step: `batch_size · accum_iter · devices`.
    pub effective_batch: usize,
    /// Length of training in epochs; the cosine reaches `min_lr` here.
    pub epochs: f64,
    /// Epochs of linear warmup from 0.
    #[config(default = 0.0)]
    pub warmup_epochs: f64,
    /// Learning rate at the end of the cosine.
    #[config(default = 0.0)]
    pub min_lr: f64,
    /// Peak learning rate given directly (the official `--lr`), overriding `blr`.
    #[config(default = "None")]
    pub lr: Option<f64>,
}

/// Learning rate as a function of the (fractional) epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    peak_lr: f64,
    min_lr: f64,
    warmup_epochs: f64,
    epochs: f64,
}

impl LrScheduleConfig {
    /// Checks the settings and builds the schedule.
    ///
    /// # Errors
    /// A negative or non-finite rate, `effective_batch` 0, `epochs` not positive, or
    /// `warmup_epochs` negative.
    pub fn init(&self) -> Result<LrSchedule> {
        let non_negative = |setting: &'static str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(value)
            } else {
                Err(TrainError::config(
                    setting,
                    format!("must be finite and >= 0, got {value}"),
                ))
            }
        };
        non_negative("blr", self.blr)?;
        let min_lr = non_negative("min_lr", self.min_lr)?;
        let warmup_epochs = non_negative("warmup_epochs", self.warmup_epochs)?;
        if self.effective_batch == 0 {
            return Err(TrainError::config("effective_batch", "must be at least 1"));
        }
        if !(self.epochs.is_finite() && self.epochs > 0.0) {
            return Err(TrainError::config(
                "epochs",
                format!("must be > 0, got {}", self.epochs),
            ));
        }
        let peak_lr = match self.lr {
            Some(lr) => non_negative("lr", lr)?,
            None => self.blr * self.effective_batch as f64 / 256.0,
        };
        Ok(LrSchedule {
            peak_lr,
            min_lr,
            warmup_epochs,
            epochs: self.epochs,
        })
    }
}

impl LrSchedule {
    /// The learning rate at the end of warmup (the official `args.lr`).
    pub fn peak_lr(&self) -> f64 {
        self.peak_lr
    }

    /// The learning rate at fractional epoch `epoch` (0 at the start of training).
    ///
    /// Past `epochs` the rate stays at `min_lr` (the official formula would climb the cosine
    /// back up, but it is never evaluated there).
    pub fn at_epoch(&self, epoch: f64) -> f64 {
        if epoch < self.warmup_epochs {
            return self.peak_lr * epoch / self.warmup_epochs;
        }
        let decay_epochs = self.epochs - self.warmup_epochs;
        let progress = if decay_epochs > 0.0 {
            ((epoch - self.warmup_epochs) / decay_epochs).min(1.0)
        } else {
            1.0
        };
        self.min_lr
            + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// The learning rate of optimiser step `step` (0-based, counted over the whole run) with
    /// `steps_per_epoch` optimiser steps per epoch: [`at_epoch`](Self::at_epoch) of
    /// `step / steps_per_epoch`.
    ///
    /// To reproduce the official code exactly under gradient accumulation, count in
    /// micro-batches instead: pass the index of the first micro-batch of the step and the
    /// number of micro-batches per epoch (it evaluates the schedule at
    /// `data_iter_step / len(data_loader)` when `data_iter_step % accum_iter == 0`).
    /// With `steps_per_epoch == 0` the rate is that of epoch 0.
    pub fn at_step(&self, step: usize, steps_per_epoch: usize) -> f64 {
        if steps_per_epoch == 0 {
            return self.at_epoch(0.0);
        }
        self.at_epoch(step as f64 / steps_per_epoch as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The official `finetuning_llama_adapter.sh` recipe: blr 9e-3, batch 4 on 8 GPUs
    /// (effective 32), 5 epochs, 2 of warmup; lr = 9e-3 · 32 / 256 = 1.125e-3.
    fn paper() -> LrSchedule {
        LrScheduleConfig::new(9e-3, 32, 5.0)
            .with_warmup_epochs(2.0)
            .init()
            .unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 + 1e-12 * b.abs()
    }

    #[test]
    fn peak_lr_is_blr_times_effective_batch_over_256() {
        assert!(close(paper().peak_lr(), 1.125e-3));
        let direct = LrScheduleConfig::new(9e-3, 32, 5.0)
            .with_lr(Some(1e-3))
            .init()
            .unwrap();
        assert_eq!(direct.peak_lr(), 1e-3);
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        let s = paper();
        assert_eq!(s.at_epoch(0.0), 0.0);
        assert!(close(s.at_epoch(1.0), 5.625e-4)); // 1.125e-3 · 1/2
        assert!(close(s.at_step(150, 100), 8.4375e-4)); // epoch 1.5: 1.125e-3 · 3/4
    }

    #[test]
    fn cosine_decays_from_peak_to_min_lr() {
        let s = paper();
        assert!(close(s.at_epoch(2.0), 1.125e-3)); // cos(0) = 1
        assert!(close(s.at_epoch(3.5), 5.625e-4)); // ½(1 + cos(π/2)) = ½
        assert!(close(s.at_epoch(4.0), 2.8125e-4)); // ½(1 + cos(2π/3)) = ¼
        assert!(s.at_epoch(5.0).abs() < 1e-18); // ½(1 + cos π) = 0
        assert!(s.at_epoch(7.0).abs() < 1e-18); // stays at min_lr
        let floored = LrScheduleConfig::new(9e-3, 32, 5.0)
            .with_warmup_epochs(2.0)
            .with_min_lr(1e-5)
            .init()
            .unwrap();
        assert!(close(floored.at_epoch(3.5), 5.675e-4)); // 1e-5 + (1.125e-3 − 1e-5) · ½
        assert!(close(floored.at_epoch(5.0), 1e-5));
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(LrScheduleConfig::new(1e-3, 0, 5.0).init().is_err());
        assert!(LrScheduleConfig::new(1e-3, 8, 0.0).init().is_err());
        assert!(LrScheduleConfig::new(-1.0, 8, 1.0).init().is_err());
        assert!(LrScheduleConfig::new(1e-3, 8, 1.0)
            .with_warmup_epochs(f64::NAN)
            .init()
            .is_err());
    }
}

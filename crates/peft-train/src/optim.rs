//! AdamW with PyTorch semantics, per-parameter weight decay, global-norm clipping, exportable
//! state, and token-weighted gradient accumulation.
//!
//! # The update
//! For each parameter `p` with gradient `g` (after clipping), at its `t`-th update, exactly as
//! `torch.optim.AdamW` (single-tensor path):
//!
//! ```text
//! p ← p · (1 − lr · weight_decay)          (only if the parameter decays; before the Adam step)
//! m ← β₁ · m + (1 − β₁) · g
//! v ← β₂ · v + (1 − β₂) · g²
//! p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! `m`, `v` and the arithmetic are f32 on the parameter's device whatever the parameter's
//! dtype (a bf16 parameter is updated in f32 and stored back in bf16).
//!
//! # How this differs from `burn::optim::AdamW` (0.21)
//! - Burn's `epsilon` defaults to `1e-5`, PyTorch's to `1e-8` (here `1e-8`). Both add it to
//!   `√v̂`, so with equal settings the update is the same.
//! - Burn's `weight_decay` defaults to `1e-4` (PyTorch `1e-2`) and applies to every
//!   parameter: there are no parameter groups, so the timm rule the official LLaMA-Adapter code
//!   uses (no decay for 1-D parameters and biases) cannot be expressed. Here it can
//!   ([`WeightDecayRule`], [`AdamW::with_weight_decay_for`]).
//! - Burn's `GradientClippingConfig::Norm` clips each parameter tensor by its own norm;
//!   `torch.nn.utils.clip_grad_norm_` (and [`clip_grad_norm`] here) scales all gradients by
//!   one factor from the global norm over every parameter.
//! - Burn keeps the moments in the parameter's dtype, in a `HashMap` record keyed by random
//!   `ParamId`s; here they are f32 and exported in the module's visit order, keyed by the
//!   parameter's module path ([`OptimizerState`]), so a checkpoint can be resumed in a new
//!   process.
//!
//! # Gradient accumulation
//! The official code divides each micro-batch's mean loss by `accum_iter` and sums the
//! gradients: the result is the mean of per-micro-batch means, which equals the big-batch
//! gradient only when every micro-batch has the same number of target tokens. Weighting each
//! micro-batch's mean loss by `targets_i / Σ targets` instead
//! ([`AccumulationWeighting::TargetTokens`], the default of [`micro_batch_weights`]) makes the
//! accumulated gradient exactly that of one batch holding all micro-batches:
//!
//! ```
//! use burn::module::AutodiffModule;
//! use burn::optim::{GradientsAccumulator, GradientsParams};
//! use burn::tensor::{backend::AutodiffBackend, Tensor};
//! use peft_train::{causal_lm_loss, micro_batch_weights, AccumulationWeighting, AdamW, Batch};
//!
//! /// One optimiser step over `micro_batches`; `logits` runs the model on a batch.
//! fn accumulate_and_step<B: AutodiffBackend, M: AutodiffModule<B>>(
//!     model: M,
//!     micro_batches: &[Batch],
//!     logits: impl Fn(&M, &Batch) -> Tensor<B, 3>,
//!     optimizer: &mut AdamW<B>,
//!     lr: f64,
//! ) -> peft_train::Result<M> {
//!     let targets: Vec<usize> = micro_batches.iter().map(|b| b.target_tokens).collect();
//!     let weights = micro_batch_weights(&targets, AccumulationWeighting::TargetTokens);
//!     let mut accumulator = GradientsAccumulator::<M>::new();
//!     for (batch, weight) in micro_batches.iter().zip(weights) {
//!         let out = causal_lm_loss(logits(&model, batch), &batch.labels)?;
//!         let grads = out.loss.mul_scalar(weight).backward();
//!         accumulator.accumulate(&model, GradientsParams::from_grads(grads, &model));
//!     }
//!     let (model, _report) = optimizer.step(lr, model, accumulator.grads());
//!     Ok(model)
//! }
//! ```

use std::collections::HashMap;

use burn::config::Config;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion, Tensor, TensorData};

use crate::error::{Result, TrainError};

/// Which parameters weight decay applies to (before per-parameter overrides).
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum WeightDecayRule {
    /// Every parameter decays (`torch.optim.AdamW` with one parameter group).
    All,
    /// timm's `add_weight_decay`, used by the official LLaMA-Adapter code: no decay for 1-D
    /// parameters and for parameters whose field is named `bias`. (The official adapter's
    /// gate is `[1, heads, 1, 1]`, not 1-D, so it does decay there.)
    SkipVectorsAndBiases,
}

/// How the micro-batches of one optimiser step are weighted.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum AccumulationWeighting {
    /// Weight `targets_i / Σ targets`: the exact gradient of the token mean over all
    /// micro-batches.
    TargetTokens,
    /// Weight `1 / micro_batches`: the official code's `loss /= accum_iter`.
    MicroBatchMean,
}

/// The loss weight of each micro-batch of one optimiser step (see the module docs).
///
/// With [`AccumulationWeighting::TargetTokens`] and no target at all, every weight is 0.
pub fn micro_batch_weights(target_tokens: &[usize], weighting: AccumulationWeighting) -> Vec<f64> {
    match weighting {
        AccumulationWeighting::MicroBatchMean => {
            vec![1.0 / target_tokens.len() as f64; target_tokens.len()]
        }
        AccumulationWeighting::TargetTokens => {
            let total: usize = target_tokens.iter().sum();
            target_tokens
                .iter()
                .map(|&n| {
                    if total == 0 {
                        0.0
                    } else {
                        n as f64 / total as f64
                    }
                })
                .collect()
        }
    }
}

/// [`AdamW`] configuration; the defaults are `torch.optim.AdamW`'s.
#[derive(Config, Debug)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    #[config(default = 0.9)]
    pub beta_1: f64,
    /// Decay of the second moment (the LLaMA-Adapter code uses 0.95).
    #[config(default = 0.999)]
    pub beta_2: f64,
    /// Added to `√v̂`.
    #[config(default = 1e-8)]
    pub epsilon: f64,
    /// Decoupled weight decay coefficient.
    #[config(default = 0.01)]
    pub weight_decay: f64,
    /// Which parameters decay.
    #[config(default = "WeightDecayRule::All")]
    pub weight_decay_rule: WeightDecayRule,
    /// Clip the global gradient norm to this value before the update
    /// (`clip_grad_norm_` semantics); `None` leaves gradients as they are.
    #[config(default = "None")]
    pub max_grad_norm: Option<f64>,
}

impl AdamWConfig {
    /// The settings of LLaMA-Adapter's `alpaca_finetuning_v1`: betas (0.9, 0.95), weight decay
    /// 0.02 (its training script's `--weight_decay`), timm's decay rule, no clipping.
    pub fn llama_adapter() -> Self {
        Self::new()
            .with_beta_2(0.95)
            .with_weight_decay(0.02)
            .with_weight_decay_rule(WeightDecayRule::SkipVectorsAndBiases)
    }

    /// Checks the settings and builds the optimiser.
    ///
    /// # Errors
    /// A beta outside `[0, 1)`, a negative or non-finite epsilon or weight decay, or a
    /// non-positive `max_grad_norm`.
    pub fn init<B: AutodiffBackend>(&self) -> Result<AdamW<B>> {
        for (setting, beta) in [("beta_1", self.beta_1), ("beta_2", self.beta_2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(TrainError::config(
                    setting,
                    format!("must be in [0, 1), got {beta}"),
                ));
            }
        }
        for (setting, value) in [
            ("epsilon", self.epsilon),
            ("weight_decay", self.weight_decay),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(TrainError::config(
                    setting,
                    format!("must be finite and >= 0, got {value}"),
                ));
            }
        }
        if let Some(max) = self.max_grad_norm {
            if !(max.is_finite() && max > 0.0) {
                return Err(TrainError::config(
                    "max_grad_norm",
                    format!("must be > 0, got {max}"),
                ));
            }
        }
        Ok(AdamW {
            config: self.clone(),
            decay_overrides: HashMap::new(),
            steps: 0,
            moments: HashMap::new(),
        })
    }
}

/// The moments of one parameter, flattened, f32, on the parameter's device.
#[derive(Debug, Clone)]
struct Moments<B: Backend> {
    /// Updates applied to this parameter (PyTorch's per-parameter `step`).
    step: u64,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
}

/// AdamW over the float parameters of a Burn module; see the module docs.
#[derive(Debug, Clone)]
pub struct AdamW<B: AutodiffBackend> {
    config: AdamWConfig,
    decay_overrides: HashMap<ParamId, bool>,
    steps: u64,
    moments: HashMap<ParamId, Moments<B::InnerBackend>>,
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 without clipping).
    pub clip_scale: f64,
    /// Parameters updated (those with a gradient).
    pub updated: usize,
    /// The gradients held NaN or infinity: nothing was updated and the step was not counted.
    pub skipped_non_finite: bool,
}

/// Optimiser state on the host, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Optimiser steps taken.
    pub steps: u64,
    /// One entry per parameter with state, in the module's visit order.
    pub params: Vec<ParamMoments>,
}

/// The moments of one parameter (PyTorch's `exp_avg` = `m`, `exp_avg_sq` = `v`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamMoments {
    /// Dotted module path of the parameter (e.g. `layers.3.gate`): the key in checkpoints.
    pub path: String,
    /// The parameter's shape.
    pub shape: Vec<usize>,
    /// Updates applied to this parameter.
    pub step: u64,
    /// First moment, row-major, `shape.iter().product()` values.
    pub m: Vec<f32>,
    /// Second moment, same layout.
    pub v: Vec<f32>,
}

/// Global L2 norm over all gradients of `module`'s parameters, and the gradients scaled by
/// `max_norm / (norm + 1e-6)` when that is below 1 (`torch.nn.utils.clip_grad_norm_`).
///
/// The norm is accumulated in f32 on the device and read back once.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    let norm = grad_norm(module, &grads);
    let scale = clip_scale(norm, Some(max_norm));
    if scale == 1.0 {
        return (grads, norm);
    }
    let mut scaler = GradScaler::<B> {
        grads,
        scale,
        phantom: std::marker::PhantomData,
    };
    module.visit(&mut scaler);
    (scaler.grads, norm)
}

fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) => (max / (norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

/// Global L2 norm over the gradients of `module`'s parameters.
pub fn grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut visitor = NormVisitor::<B> { grads, sum: None };
    module.visit(&mut visitor);
    visitor
        .sum
        .map_or(0.0, |sum| f64::from(sum.into_scalar().elem::<f32>()).sqrt())
}

struct NormVisitor<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NormVisitor<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let squares = to_f32(grad).square().sum();
            self.sum = Some(match self.sum.take() {
                Some(sum) => sum + squares,
                None => squares,
            });
        }
    }
}

struct GradScaler<B: AutodiffBackend> {
    grads: GradientsParams,
    scale: f64,
    phantom: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradScaler<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, grad.mul_scalar(self.scale));
        }
    }
}

fn to_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Tensor<B, D> {
    if tensor.dtype() == DType::F32 {
        tensor
    } else {
        tensor.cast(DType::F32)
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    /// The settings.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Optimiser steps taken (skipped steps not counted).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Forces weight decay on (`true`) or off (`false`) for one parameter, whatever the rule.
    pub fn with_weight_decay_for(mut self, id: ParamId, decay: bool) -> Self {
        self.decay_overrides.insert(id, decay);
        self
    }

    /// Applies one update to every parameter of `module` that has a gradient in `grads`, at
    /// learning rate `lr`; parameters without a gradient are left as they are.
    ///
    /// The global gradient norm is always computed (one device read-back per step); if it is
    /// not finite nothing changes and the report says so.
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        lr: f64,
        module: M,
        grads: GradientsParams,
    ) -> (M, StepReport) {
        let grad_norm = grad_norm(&module, &grads);
        if !grad_norm.is_finite() {
            let report = StepReport {
                grad_norm,
                clip_scale: 1.0,
                updated: 0,
                skipped_non_finite: true,
            };
            return (module, report);
        }
        let clip_scale = clip_scale(grad_norm, self.config.max_grad_norm);
        let mut mapper = AdamWMapper {
            optimizer: self,
            grads,
            lr,
            clip_scale,
            path: Vec::new(),
            updated: 0,
        };
        let module = module.map(&mut mapper);
        let updated = mapper.updated;
        self.steps += 1;
        (
            module,
            StepReport {
                grad_norm,
                clip_scale,
                updated,
                skipped_non_finite: false,
            },
        )
    }

    /// Copies the moments to the host, keyed by module path, in `module`'s visit order.
    ///
    /// # Errors
    /// A moment tensor cannot be read back.
    pub fn state<M: AutodiffModule<B>>(&self, module: &M) -> Result<OptimizerState> {
        let mut params = Vec::new();
        for entry in parameter_entries(module) {
            let Some(moments) = self.moments.get(&entry.id) else {
                continue;
            };
            let read =
                |tensor: &Tensor<B::InnerBackend, 1>| {
                    tensor.clone().into_data().to_vec::<f32>().map_err(|e| {
                        TrainError::OptimizerState {
                            path: entry.path.clone(),
                            message: format!("cannot read the moments back: {e:?}"),
                        }
                    })
                };
            params.push(ParamMoments {
                path: entry.path.clone(),
                shape: entry.shape.clone(),
                step: moments.step,
                m: read(&moments.m)?,
                v: read(&moments.v)?,
            });
        }
        Ok(OptimizerState {
            steps: self.steps,
            params,
        })
    }

    /// Replaces the moments with `state`, matching parameters of `module` by path; returns the
    /// paths of trainable parameters (`require_grad`) that `state` has no moments for (they
    /// start fresh, as in PyTorch).
    ///
    /// # Errors
    /// A path that is not a float parameter of `module` (an unexpected entry), a shape that
    /// differs from the parameter's, or moments of the wrong length. Nothing is replaced then.
    pub fn load_state<M: AutodiffModule<B>>(
        &mut self,
        module: &M,
        state: &OptimizerState,
    ) -> Result<Vec<String>> {
        let entries = parameter_entries(module);
        let by_path: HashMap<&str, &ParamEntry<B::InnerBackend>> =
            entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let mut moments = HashMap::new();
        for saved in &state.params {
            let error = |message: String| TrainError::OptimizerState {
                path: saved.path.clone(),
                message,
            };
            let entry = by_path
                .get(saved.path.as_str())
                .ok_or_else(|| error("no float parameter of the module has this path".into()))?;
            if saved.shape != entry.shape {
                return Err(error(format!(
                    "saved shape {:?}, the parameter has shape {:?}",
                    saved.shape, entry.shape
                )));
            }
            let numel: usize = saved.shape.iter().product();
            if saved.m.len() != numel || saved.v.len() != numel {
                return Err(error(format!(
                    "{} and {} moment values for {numel} elements",
                    saved.m.len(),
                    saved.v.len()
                )));
            }
            let tensor = |values: &[f32]| {
                to_f32(Tensor::<B::InnerBackend, 1>::from_data(
                    TensorData::new(values.to_vec(), [numel]),
                    &entry.device,
                ))
            };
            moments.insert(
                entry.id,
                Moments {
                    step: saved.step,
                    m: tensor(&saved.m),
                    v: tensor(&saved.v),
                },
            );
        }
        let missing = entries
            .iter()
            .filter(|e| e.require_grad && !moments.contains_key(&e.id))
            .map(|e| e.path.clone())
            .collect();
        self.moments = moments;
        self.steps = state.steps;
        Ok(missing)
    }

    fn decays(&self, id: ParamId, path: &[String], rank: usize) -> bool {
        if self.config.weight_decay == 0.0 {
            return false;
        }
        if let Some(&decay) = self.decay_overrides.get(&id) {
            return decay;
        }
        match self.config.weight_decay_rule {
            WeightDecayRule::All => true,
            WeightDecayRule::SkipVectorsAndBiases => {
                rank > 1 && path.last().is_none_or(|name| name != "bias")
            }
        }
    }

    /// One AdamW update of a flattened f32 parameter; returns the new value.
    fn update(
        &self,
        param: Tensor<B::InnerBackend, 1>,
        grad: Tensor<B::InnerBackend, 1>,
        state: Option<Moments<B::InnerBackend>>,
        lr: f64,
        decay: bool,
    ) -> (Tensor<B::InnerBackend, 1>, Moments<B::InnerBackend>) {
        let AdamWConfig {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            ..
        } = self.config;
        let (step, m, v) = match state {
            Some(Moments { step, m, v }) => (
                step + 1,
                m.mul_scalar(beta_1) + grad.clone().mul_scalar(1.0 - beta_1),
                v.mul_scalar(beta_2) + grad.square().mul_scalar(1.0 - beta_2),
            ),
            None => (
                1,
                grad.clone().mul_scalar(1.0 - beta_1),
                grad.square().mul_scalar(1.0 - beta_2),
            ),
        };
        let exponent = i32::try_from(step).unwrap_or(i32::MAX);
        let bias_correction_1 = 1.0 - beta_1.powi(exponent);
        let bias_correction_2 = 1.0 - beta_2.powi(exponent);
        let denominator = v
            .clone()
            .sqrt()
            .div_scalar(bias_correction_2.sqrt())
            .add_scalar(epsilon);
        let param = if decay {
            param.mul_scalar(1.0 - lr * weight_decay)
        } else {
            param
        };
        let param = param
            - m.clone()
                .div(denominator)
                .mul_scalar(lr / bias_correction_1);
        (param, Moments { step, m, v })
    }
}

struct AdamWMapper<'a, B: AutodiffBackend> {
    optimizer: &'a mut AdamW<B>,
    grads: GradientsParams,
    lr: f64,
    clip_scale: f64,
    path: Vec<String>,
    updated: usize,
}

impl<B: AutodiffBackend> ModuleMapper<B> for AdamWMapper<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let inner = tensor.inner();
        let (dtype, shape) = (inner.dtype(), inner.dims());
        let numel = shape.iter().product::<usize>();
        let mut grad = to_f32(grad).reshape([numel]);
        if self.clip_scale != 1.0 {
            grad = grad.mul_scalar(self.clip_scale);
        }
        let decay = self.optimizer.decays(id, &self.path, D);
        let state = self.optimizer.moments.remove(&id);
        let (updated, moments) =
            self.optimizer
                .update(to_f32(inner).reshape([numel]), grad, state, self.lr, decay);
        self.optimizer.moments.insert(id, moments);
        let mut updated = updated.reshape(shape);
        if updated.dtype() != dtype {
            updated = updated.cast(dtype);
        }
        let mut tensor = Tensor::<B, D>::from_inner(updated);
        if require_grad {
            tensor = tensor.require_grad();
        }
        self.updated += 1;
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// A float parameter of a module, as the optimiser's state sees it.
struct ParamEntry<B: Backend> {
    id: ParamId,
    path: String,
    shape: Vec<usize>,
    require_grad: bool,
    device: B::Device,
}

/// The float parameters of `module` in visit order, with dotted paths.
fn parameter_entries<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
) -> Vec<ParamEntry<B::InnerBackend>> {
    struct Collector<B: AutodiffBackend> {
        path: Vec<String>,
        entries: Vec<ParamEntry<B::InnerBackend>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collector<B> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            self.entries.push(ParamEntry {
                id: param.id,
                path: self.path.join("."),
                shape: value.dims().to_vec(),
                require_grad: value.is_require_grad(),
                device: value.device(),
            });
        }
    }
    let mut collector = Collector::<B> {
        path: Vec::new(),
        entries: Vec::new(),
    };
    module.visit(&mut collector);
    collector.entries
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::module::Module;
    use burn::optim::GradientsAccumulator;

    use super::*;
    use crate::data::{BatchingConfig, Example, IGNORE_INDEX};
    use crate::loss::causal_lm_loss;

    type TestBackend = Autodiff<NdArray<f32>>;

    /// A weight matrix and a bias vector, like a `Linear`.
    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        weight: Param<Tensor<B, 2>>,
        bias: Param<Tensor<B, 1>>,
    }

    fn toy(weight: [[f32; 2]; 2], bias: [f32; 2]) -> Toy<TestBackend> {
        let device = Default::default();
        Toy {
            weight: Param::from_tensor(Tensor::from_data(weight, &device)),
            bias: Param::from_tensor(Tensor::from_data(bias, &device)),
        }
    }

    /// Gradients equal to `gw` and `gb`: the loss is Σ weight·gw + Σ bias·gb.
    fn grads_of(model: &Toy<TestBackend>, gw: [[f32; 2]; 2], gb: [f32; 2]) -> GradientsParams {
        let device = Default::default();
        let loss = (model.weight.val() * Tensor::<TestBackend, 2>::from_data(gw, &device)).sum()
            + (model.bias.val() * Tensor::<TestBackend, 1>::from_data(gb, &device)).sum();
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn values<const D: usize>(param: &Param<Tensor<TestBackend, D>>) -> Vec<f32> {
        param.val().into_data().to_vec::<f32>().unwrap()
    }

    fn assert_close(found: &[f32], expected: &[f32], tolerance: f32) {
        assert_eq!(found.len(), expected.len());
        for (f, e) in found.iter().zip(expected) {
            assert!(
                (f - e).abs() <= tolerance,
                "found {found:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn two_steps_match_torch_adamw() {
        // Expected values from torch 2.x (/opt/pyref/bin/python), f32:
        //   w = Parameter([[0.5, -1.0], [2.0, 0.25]]); b = Parameter([0.1, -0.3])
        //   opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1},
        //                            {"params": [b], "weight_decay": 0.0}],
        //                           lr=0.01, betas=(0.9, 0.95), eps=1e-8)
        //   for gw, gb in [([[0.1, -0.2], [0.3, 0.0]], [1.0, -0.5]),
        //                  ([[-0.4, 0.2], [0.1, 0.05]], [0.5, 0.25])]:
        //       w.grad, b.grad = torch.tensor(gw), torch.tensor(gb); opt.step()
        //       print(w.flatten().tolist(), b.tolist())   # shown below as f32
        let config = AdamWConfig::new()
            .with_beta_2(0.95)
            .with_weight_decay(0.1)
            .with_weight_decay_rule(WeightDecayRule::SkipVectorsAndBiases);
        let mut optimizer = config.init::<TestBackend>().unwrap();
        let model = toy([[0.5, -1.0], [2.0, 0.25]], [0.1, -0.3]);

        let grads = grads_of(&model, [[0.1, -0.2], [0.3, 0.0]], [1.0, -0.5]);
        let (model, report) = optimizer.step(0.01, model, grads);
        assert_eq!(report.updated, 2);
        assert_close(
            &values(&model.weight),
            &[0.48950002, -0.989, 1.988, 0.24975],
            1e-6,
        );
        assert_close(&values(&model.bias), &[0.09, -0.29000002], 1e-6);

        let grads = grads_of(&model, [[-0.4, 0.2], [0.1, 0.05]], [0.5, 0.25]);
        let (model, _) = optimizer.step(0.01, model, grads);
        assert_close(
            &values(&model.weight),
            &[0.49454454, -0.9885374, 1.9772124, 0.24215066],
            1e-6,
        );
        assert_close(&values(&model.bias), &[0.08060707, -0.28731632], 1e-6);
        assert_eq!(optimizer.steps(), 2);
        assert!(
            model.weight.val().is_require_grad(),
            "parameters stay trainable"
        );
    }

    #[test]
    fn weight_decay_follows_the_rule_and_overrides() {
        // Zero gradients: the Adam term is 0 / (0 + eps) = 0, so only decay moves parameters:
        // p · (1 − lr · wd) = p · (1 − 0.1 · 0.5) = 0.95 p.
        let zero = ([[0.0; 2]; 2], [0.0; 2]);
        let config = AdamWConfig::new()
            .with_weight_decay(0.5)
            .with_weight_decay_rule(WeightDecayRule::SkipVectorsAndBiases);
        let model = toy([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0]);
        let grads = grads_of(&model, zero.0, zero.1);
        let (model, _) = config
            .init::<TestBackend>()
            .unwrap()
            .step(0.1, model, grads);
        assert_close(&values(&model.weight), &[0.95, 1.9, 2.85, 3.8], 1e-6);
        assert_close(&values(&model.bias), &[1.0, 2.0], 0.0);

        let model = toy([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0]);
        let mut optimizer = config
            .clone()
            .with_weight_decay_rule(WeightDecayRule::All)
            .init::<TestBackend>()
            .unwrap()
            .with_weight_decay_for(model.weight.id, false);
        let grads = grads_of(&model, zero.0, zero.1);
        let (model, _) = optimizer.step(0.1, model, grads);
        assert_close(&values(&model.weight), &[1.0, 2.0, 3.0, 4.0], 0.0);
        assert_close(&values(&model.bias), &[0.95, 1.9], 1e-6);
    }

    #[test]
    fn clipping_scales_all_gradients_by_the_global_norm() {
        let model = toy([[0.0; 2]; 2], [0.0; 2]);
        // ‖g‖ = √(4·3² + 4²) = √52.
        let grads = grads_of(&model, [[3.0; 2]; 2], [4.0, 0.0]);
        let (clipped, norm) = clip_grad_norm(&model, grads, 1.0);
        assert!((norm - 52f64.sqrt()).abs() < 1e-5);
        let scale = (1.0 / (52f64.sqrt() + 1e-6)) as f32;
        let weight = clipped.get::<NdArray<f32>, 2>(model.weight.id).unwrap();
        let bias = clipped.get::<NdArray<f32>, 1>(model.bias.id).unwrap();
        assert_close(
            &weight.into_data().to_vec::<f32>().unwrap(),
            &[3.0 * scale; 4],
            1e-6,
        );
        assert_close(
            &bias.into_data().to_vec::<f32>().unwrap(),
            &[4.0 * scale, 0.0],
            1e-6,
        );
        assert!((grad_norm(&model, &clipped) - 1.0).abs() < 1e-5);

        // Below the threshold nothing changes.
        let grads = grads_of(&model, [[0.1; 2]; 2], [0.0; 2]);
        let (kept, _) = clip_grad_norm(&model, grads, 1.0);
        let weight = kept.get::<NdArray<f32>, 2>(model.weight.id).unwrap();
        assert_close(&weight.into_data().to_vec::<f32>().unwrap(), &[0.1; 4], 0.0);

        // Inside the optimiser: the first moment is (1 − β₁) · clipped gradient.
        let mut optimizer = AdamWConfig::new()
            .with_max_grad_norm(Some(1.0))
            .init::<TestBackend>()
            .unwrap();
        let grads = grads_of(&model, [[3.0; 2]; 2], [4.0, 0.0]);
        let (model, report) = optimizer.step(0.01, model, grads);
        assert!((report.clip_scale - f64::from(scale)).abs() < 1e-7);
        let state = optimizer.state(&model).unwrap();
        assert_close(&state.params[0].m, &[0.1 * 3.0 * scale; 4], 1e-7);
    }

    #[test]
    fn non_finite_gradients_skip_the_step() {
        let model = toy([[1.0; 2]; 2], [1.0; 2]);
        let mut optimizer = AdamWConfig::new().init::<TestBackend>().unwrap();
        let grads = grads_of(&model, [[f32::NAN, 0.0], [0.0, 0.0]], [0.0; 2]);
        let (model, report) = optimizer.step(0.1, model, grads);
        assert!(report.skipped_non_finite);
        assert_eq!(optimizer.steps(), 0);
        assert_close(&values(&model.weight), &[1.0; 4], 0.0);
    }

    #[test]
    fn state_round_trips_through_the_host_and_resumes_identically() {
        let config = AdamWConfig::llama_adapter();
        let mut first = config.init::<TestBackend>().unwrap();
        let model = toy([[0.5, -1.0], [2.0, 0.25]], [0.1, -0.3]);
        let grads = grads_of(&model, [[0.1, -0.2], [0.3, 0.0]], [1.0, -0.5]);
        let (model, _) = first.step(0.01, model, grads);
        let state = first.state(&model).unwrap();
        assert_eq!(state.steps, 1);
        let paths: Vec<&str> = state.params.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["weight", "bias"], "visit order, field paths");
        assert_eq!(state.params[0].shape, vec![2, 2]);

        // A fresh optimiser and a fresh module with the same values (new ParamIds).
        let (w, b) = (values(&model.weight), values(&model.bias));
        let copy = toy([[w[0], w[1]], [w[2], w[3]]], [b[0], b[1]]);
        assert_ne!(copy.weight.id, model.weight.id);
        let mut second = config.init::<TestBackend>().unwrap();
        let missing = second.load_state(&copy, &state).unwrap();
        assert!(missing.is_empty(), "{missing:?}");
        let step = |optimizer: &mut AdamW<TestBackend>, model: Toy<TestBackend>| {
            let grads = grads_of(&model, [[-0.4, 0.2], [0.1, 0.05]], [0.5, 0.25]);
            optimizer.step(0.01, model, grads).0
        };
        let a = step(&mut first, model);
        let b = step(&mut second, copy);
        assert_eq!(values(&a.weight), values(&b.weight));
        assert_eq!(values(&a.bias), values(&b.bias));
        assert_eq!(first.state(&a).unwrap(), second.state(&b).unwrap());
    }

    #[test]
    fn loading_state_for_another_module_is_an_error() {
        let model = toy([[0.0; 2]; 2], [0.0; 2]);
        let mut optimizer = AdamWConfig::new().init::<TestBackend>().unwrap();
        let mut state = OptimizerState {
            steps: 1,
            params: vec![ParamMoments {
                path: "gate".into(),
                shape: vec![2],
                step: 1,
                m: vec![0.0; 2],
                v: vec![0.0; 2],
            }],
        };
        let message = optimizer
            .load_state(&model, &state)
            .unwrap_err()
            .to_string();
        assert!(message.contains("`gate`"), "{message}");
        state.params[0].path = "bias".into();
        state.params[0].shape = vec![3];
        let message = optimizer
            .load_state(&model, &state)
            .unwrap_err()
            .to_string();
        assert!(message.contains("saved shape [3]"), "{message}");
        state.params[0].shape = vec![2];
        let missing = optimizer.load_state(&model, &state).unwrap();
        assert_eq!(missing, vec!["weight".to_string()]);
    }

    /// A bigram "language model": the logits of token `i` are row `i` of a `[vocab, vocab]`
    /// table, so the loss depends only on the real tokens and padding is inert.
    #[derive(Module, Debug)]
    struct Bigram<B: Backend> {
        table: Param<Tensor<B, 2>>,
    }

    impl Bigram<TestBackend> {
        fn logits(&self, ids: &[u32], batch: usize, seq: usize) -> Tensor<TestBackend, 3> {
            let vocab = self.table.dims()[0];
            let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
            let ids = Tensor::<TestBackend, 1, burn::tensor::Int>::from_data(
                TensorData::new(ids, [batch * seq]),
                &Default::default(),
            );
            self.table.val().select(0, ids).reshape([batch, seq, vocab])
        }
    }

    #[test]
    fn token_weighted_accumulation_of_two_by_two_equals_one_batch_of_four() {
        let vocab = 5;
        let table: Vec<f32> = (0..vocab * vocab)
            .map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let model = Bigram::<TestBackend> {
            table: Param::from_tensor(Tensor::from_data(
                TensorData::new(table, [vocab, vocab]),
                &Default::default(),
            )),
        };
        let example = |ids: &[u32], prompt: usize| Example {
            input_ids: ids.to_vec(),
            labels: ids
                .iter()
                .enumerate()
                .map(|(t, &id)| {
                    if t < prompt {
                        IGNORE_INDEX
                    } else {
                        i64::from(id)
                    }
                })
                .collect(),
            features: None,
        };
        // Target counts 4 + 1 | 1 + 3: unequal totals, so the mean of micro-batch means differs.
        let examples = [
            example(&[1, 2, 3, 4, 0], 1),
            example(&[1, 3, 2], 2),
            example(&[1, 4, 4, 2], 3),
            example(&[1, 2, 2, 3], 1),
        ];
        let batcher = BatchingConfig::new(4).init().unwrap();
        let gradient = |batches: &[Vec<&Example>], weighting| {
            let collated: Vec<_> = batches
                .iter()
                .map(|rows| batcher.collate(rows).unwrap())
                .collect();
            let targets: Vec<usize> = collated.iter().map(|b| b.target_tokens).collect();
            let weights = micro_batch_weights(&targets, weighting);
            let mut accumulator = GradientsAccumulator::<Bigram<TestBackend>>::new();
            for (batch, weight) in collated.iter().zip(weights) {
                let logits = model.logits(&batch.tokens.ids, batch.tokens.batch, batch.tokens.seq);
                let out = causal_lm_loss(logits, &batch.labels).unwrap();
                assert_eq!(out.targets, batch.target_tokens);
                let grads = out.loss.mul_scalar(weight).backward();
                accumulator.accumulate(&model, GradientsParams::from_grads(grads, &model));
            }
            let grads = accumulator.grads();
            grads
                .get::<NdArray<f32>, 2>(model.table.id)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let all: Vec<&Example> = examples.iter().collect();
        let one_batch = gradient(
            std::slice::from_ref(&all),
            AccumulationWeighting::TargetTokens,
        );
        let split = [all[..2].to_vec(), all[2..].to_vec()];
        let accumulated = gradient(&split, AccumulationWeighting::TargetTokens);
        assert_close(&accumulated, &one_batch, 1e-6);
        let averaged = gradient(&split, AccumulationWeighting::MicroBatchMean);
        let gap = averaged
            .iter()
            .zip(&one_batch)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            gap > 1e-3,
            "the micro-batch mean differs when target counts differ"
        );
    }

    #[test]
    fn micro_batch_weights_sum_to_one() {
        let w = micro_batch_weights(&[3, 1], AccumulationWeighting::TargetTokens);
        assert_eq!(w, vec![0.75, 0.25]);
        assert_eq!(
            micro_batch_weights(&[3, 1], AccumulationWeighting::MicroBatchMean),
            vec![0.5, 0.5]
        );
        assert_eq!(
            micro_batch_weights(&[0, 0], AccumulationWeighting::TargetTokens),
            vec![0.0, 0.0]
        );
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(AdamWConfig::new()
            .with_beta_1(1.0)
            .init::<TestBackend>()
            .is_err());
        assert!(AdamWConfig::new()
            .with_epsilon(-1.0)
            .init::<TestBackend>()
            .is_err());
        assert!(AdamWConfig::new()
            .with_max_grad_norm(Some(0.0))
            .init::<TestBackend>()
            .is_err());
    }
}

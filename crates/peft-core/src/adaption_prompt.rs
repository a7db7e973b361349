//! LLaMA-Adapter (Zhang et al. 2023): learnable adaption prompts with zero-initialised gated
//! attention in the top `L` layers.
//!
//! In each adapted layer the `K` prompt vectors pass through the layer's frozen key/value
//! projections (no rotary encoding). Every query attends to all `K` prompts with its own
//! softmax, scaled by a gate that starts at zero, and the result is added to the causal
//! attention output before `o_proj`:
//!
//! `out_h = softmax(Q Kₜᵀ/√d + causal) Vₜ + act(g_h) · softmax(Q Kₚᵀ/√d) Vₚ`
//!
//! The official training code uses one gate per head with `tanh`; Hugging Face PEFT uses one
//! gate per layer without an activation. Both are settings ([`GateShape`], [`GateActivation`]).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_ops::blocks::attention_softmax;
use peft_ops::tensor::{cast_to, matmul, repeat_kv};

use peft_io::TensorMap;
use serde_json::json;

use crate::adapter::{host_values, Adapter, NamedTensor, PeftMethod};
use crate::error::{PeftError, Result};
use crate::hooks::{Features, LayerHooks};
use crate::model::{require_point, AdaptableModel, InsertionPoint, ModelGeometry};
use crate::native_format::{NativeAdapter, NativeConfig};
use crate::peft_format::{tensor, FromPeft, PeftConfigFile};

/// How many gates an adapted layer has.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum GateShape {
    /// One gate per attention head (official LLaMA-Adapter: "different gates for different heads").
    PerHead,
    /// One gate per layer (Hugging Face PEFT's `adaption_gate`).
    Scalar,
}

/// The function applied to a gate before it scales the prompt attention.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum GateActivation {
    /// `tanh(g)`, as the official training code.
    Tanh,
    /// `g`, as Hugging Face PEFT and the official inference code.
    Identity,
}

/// How the gates start.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum GateInit {
    /// At zero, so that the adapted model starts exactly at the base model (the paper's
    /// zero-initialised attention).
    Zero,
    /// Drawn from N(0, std²): the randomly initialised gates of the paper's ablation (its
    /// Table 5 and Figure 5), which disturb the base model from the first step.
    Random {
        /// Standard deviation of the raw gates (before the activation).
        std: f64,
    },
}

/// Configuration of [`AdaptionPrompt`].
#[derive(Config, Debug, PartialEq)]
pub struct AdaptionPromptConfig {
    /// Number of prompt tokens `K` per adapted layer.
    #[config(default = 10)]
    pub adapter_len: usize,
    /// Number of adapted layers `L`, counted from the top.
    #[config(default = 30)]
    pub adapter_layers: usize,
    /// One gate per head or per layer.
    #[config(default = "GateShape::PerHead")]
    pub gate_shape: GateShape,
    /// Gate activation.
    #[config(default = "GateActivation::Tanh")]
    pub gate_activation: GateActivation,
    /// How the gates start; `None` means [`GateInit::Zero`]. An `Option` so that
    /// configurations written before this setting existed still read.
    #[config(default = "None")]
    pub gate_init: Option<GateInit>,
}

impl AdaptionPromptConfig {
    /// Hugging Face PEFT's variant: one gate per layer, no activation.
    pub fn peft_compatible(adapter_len: usize, adapter_layers: usize) -> Self {
        Self::new()
            .with_adapter_len(adapter_len)
            .with_adapter_layers(adapter_layers)
            .with_gate_shape(GateShape::Scalar)
            .with_gate_activation(GateActivation::Identity)
    }

    fn gates_per_layer(&self, model: &ModelGeometry) -> usize {
        match self.gate_shape {
            GateShape::PerHead => model.num_attention_heads,
            GateShape::Scalar => 1,
        }
    }

    /// Checks the configuration against a model.
    ///
    /// # Errors
    /// Zero sizes, more adapted layers than the model has, or a random gate initialisation
    /// whose standard deviation is not a positive finite number.
    pub fn validate(&self, model: &ModelGeometry) -> Result<()> {
        if self.adapter_len == 0 || self.adapter_layers == 0 {
            return Err(PeftError::Config(
                "adapter_len and adapter_layers must be positive".into(),
            ));
        }
        if let Some(GateInit::Random { std }) = self.gate_init {
            if !(std.is_finite() && std > 0.0) {
                return Err(PeftError::Config(format!(
                    "gate_init: the standard deviation of random gates must be positive and finite, got {std}"
                )));
            }
        }
        if self.adapter_layers > model.num_hidden_layers {
            return Err(PeftError::Incompatible(format!(
                "adapter_layers = {} but the model has {} layers",
                self.adapter_layers, model.num_hidden_layers
            )));
        }
        Ok(())
    }

    /// Trainable parameters for `model`, computed without allocating anything:
    /// `L·K·d` prompt values plus `L` or `L·H` gates.
    pub fn num_trainable_parameters(&self, model: &ModelGeometry) -> usize {
        self.adapter_layers * (self.adapter_len * model.hidden_size + self.gates_per_layer(model))
    }

    /// Creates the adapter for `model`: prompts drawn from N(0, 1) as the official code's
    /// `nn.Embedding`, gates zero so that the adapted model starts exactly at the base model
    /// (or random, with [`GateInit::Random`]).
    ///
    /// # Errors
    /// See [`AdaptionPromptConfig::validate`].
    pub fn init<B: Backend>(
        &self,
        model: &(impl AdaptableModel<B> + ?Sized),
        device: &B::Device,
    ) -> Result<AdaptionPrompt<B>> {
        let geometry = model.geometry();
        self.validate(&geometry)?;
        require_point(model, InsertionPoint::AttentionBranch, "an adaption prompt")?;
        let prompts = Tensor::random(
            [self.adapter_layers, self.adapter_len, geometry.hidden_size],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let gate_shape = [self.adapter_layers, self.gates_per_layer(&geometry)];
        let gates = match self.gate_init.unwrap_or(GateInit::Zero) {
            GateInit::Zero => Tensor::zeros(gate_shape, device),
            GateInit::Random { std } => {
                Tensor::random(gate_shape, Distribution::Normal(0.0, std), device)
            }
        };
        Ok(AdaptionPrompt::from_tensors(
            self.clone(),
            model,
            prompts,
            gates,
        ))
    }
}

/// Adaption prompts and gates for the top `L` layers of a model.
#[derive(Module, Debug)]
pub struct AdaptionPrompt<B: Backend> {
    /// Prompts `[L, K, hidden]`, bottom adapted layer first.
    pub prompts: Param<Tensor<B, 3>>,
    /// Raw gates `[L, H]` (per head) or `[L, 1]` (scalar), before the activation.
    pub gates: Param<Tensor<B, 2>>,
    /// Settings.
    #[module(skip)]
    pub config: AdaptionPromptConfig,
    /// Index of the lowest adapted layer (`N - L`).
    pub first_layer: usize,
    /// The module path of each adapted layer's attention, bottom first (PEFT's keys).
    #[module(skip)]
    pub attention_paths: Vec<String>,
}

impl<B: Backend> AdaptionPrompt<B> {
    /// Builds the adapter for the top layers of `model` from given tensors (prompts
    /// `[L, K, hidden]`, gates `[L, H or 1]`).
    pub fn from_tensors(
        config: AdaptionPromptConfig,
        model: &(impl AdaptableModel<B> + ?Sized),
        prompts: Tensor<B, 3>,
        gates: Tensor<B, 2>,
    ) -> Self {
        let layers = model.geometry().num_hidden_layers;
        let first_layer = layers.saturating_sub(config.adapter_layers);
        Self {
            prompts: Param::from_tensor(prompts),
            gates: Param::from_tensor(gates),
            first_layer,
            attention_paths: (first_layer..layers)
                .map(|layer| model.attention_path(layer))
                .collect(),
            config,
        }
    }

    /// The activated gate of each layer when every head shares it (PEFT's form), else an error.
    fn scalar_gates(&self) -> Result<Vec<f32>> {
        let activated = host_values(self.activated_gates());
        let per_layer = activated.len() / self.config.adapter_layers.max(1);
        let mut gates = Vec::with_capacity(self.config.adapter_layers);
        for (layer, chunk) in activated.chunks(per_layer.max(1)).enumerate() {
            if chunk.iter().any(|&g| g != chunk[0]) {
                return Err(PeftError::Unsupported(format!(
                    "this adaption prompt has a different gate per head (adapted layer {layer}: \
                     {chunk:?}); Hugging Face PEFT stores one gate per layer, so it cannot be saved \
                     in PEFT's format without changing its output: save it in this crate's own \
                     format instead"
                )));
            }
            gates.push(chunk[0]);
        }
        Ok(gates)
    }

    /// The gates after the activation, `[L, H or 1]`.
    pub fn activated_gates(&self) -> Tensor<B, 2> {
        match self.config.gate_activation {
            GateActivation::Tanh => self.gates.val().tanh(),
            GateActivation::Identity => self.gates.val(),
        }
    }

    /// Hooks whose prompts are shifted per example: `offset` `[batch, hidden]` is added to every
    /// prompt of every adapted layer (multimodal LLaMA-Adapter, paper eq. 10, where the offset
    /// is the projected image feature). The batch of the tokens must be `batch`. With zero gates
    /// the output still equals the base model's.
    pub fn hooks_with_prompt_offset<'a>(
        &'a self,
        model: &dyn AdaptableModel<B>,
        offset: Tensor<B, 2>,
    ) -> Box<dyn LayerHooks<B> + 'a> {
        self.prepare(model, Some(offset))
    }

    fn prepare<'a>(
        &'a self,
        model: &dyn AdaptableModel<B>,
        offset: Option<Tensor<B, 2>>,
    ) -> Box<dyn LayerHooks<B> + 'a> {
        let geometry = model.geometry();
        let n_rep = geometry.kv_groups();
        let prompts = self.prompts.val();
        let gates = self.activated_gates();
        let dtype = model.dtype();
        let [layers, _, _] = prompts.dims();
        let prepared = (0..layers)
            .map(|index| {
                let prompt = prompts.clone().narrow(0, index, 1);
                // [1, K, hidden] + [batch, 1, hidden] → [batch, K, hidden]
                let prompt = match &offset {
                    Some(offset) => prompt + offset.clone().unsqueeze_dim::<3>(1),
                    None => prompt,
                };
                let prompt = cast_to(prompt, dtype);
                let (keys, values) = model.project_key_values(self.first_layer + index, prompt)?;
                let gate = gates.clone().narrow(0, index, 1);
                let count = gate.dims()[1];
                Some((
                    repeat_kv(keys, n_rep),
                    repeat_kv(values, n_rep),
                    gate.reshape([1, count, 1, 1]),
                ))
            })
            .collect();
        Box::new(PreparedPrompts {
            first_layer: self.first_layer,
            layers: prepared,
            scale: 1.0 / (geometry.head_dim as f64).sqrt(),
        })
    }
}

/// Prompt keys/values of every adapted layer, computed once per forward pass.
struct PreparedPrompts<B: Backend> {
    first_layer: usize,
    /// Per adapted layer, bottom first: keys and values `[1 or batch, heads, K, head_dim]`,
    /// activated gate `[1, G, 1, 1]`; `None` for a layer whose projections the model does not
    /// give, so that every other layer keeps its own index.
    #[allow(clippy::type_complexity)]
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)>>,
    scale: f64,
}

impl<B: Backend> LayerHooks<B> for PreparedPrompts<B> {
    fn attention_branch(&self, layer: usize, queries: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        let (keys, values, gate) = self
            .layers
            .get(layer.checked_sub(self.first_layer)?)?
            .as_ref()?;
        let [batch, heads, _, head_dim] = queries.dims();
        let prompt_len = keys.dims()[2];
        let keys = keys.clone().expand([batch, heads, prompt_len, head_dim]);
        let values = values.clone().expand([batch, heads, prompt_len, head_dim]);
        let dtype = queries.dtype();
        let scores = matmul(queries.clone(), keys.swap_dims(2, 3));
        // The prompt softmax runs in f32 like the main one and returns the queries' dtype; the
        // gate scales those probabilities, as the official code (`gate.tanh() *
        // softmax(scores.float()).type_as(xq)`) and PEFT do.
        let probabilities = attention_softmax(scores, self.scale, None);
        let weights = probabilities * cast_to(gate.clone(), dtype);
        Some(matmul(weights, values))
    }

    fn first_adapted_layer(&self) -> Option<usize> {
        Some(self.first_layer)
    }
}

impl<B: Backend> Adapter<B> for AdaptionPrompt<B> {
    fn method(&self) -> PeftMethod {
        PeftMethod::AdaptionPrompt
    }

    fn peft_config(&self, _model: &dyn AdaptableModel<B>) -> Result<serde_json::Value> {
        self.scalar_gates()?;
        Ok(json!({
            "adapter_len": self.config.adapter_len,
            "adapter_layers": self.config.adapter_layers,
            "target_modules": "self_attn",
        }))
    }

    /// PEFT stores one activated gate per layer, `[1]`.
    fn peft_tensors(&self) -> Result<Vec<NamedTensor>> {
        let gates = self.scalar_gates()?;
        let mut tensors = self.named_tensors();
        for (tensor, gate) in tensors
            .iter_mut()
            .filter(|t| t.key.ends_with(".adaption_gate"))
            .zip(gates)
        {
            tensor.shape = vec![1];
            tensor.values = vec![gate];
        }
        Ok(tensors)
    }

    fn check_compatible(&self, model: &dyn AdaptableModel<B>) -> Result<()> {
        let config = model.geometry();
        self.config.validate(&config)?;
        require_point(model, InsertionPoint::AttentionBranch, "an adaption prompt")?;
        let [layers, len, width] = self.prompts.dims();
        let gates = self.gates.dims();
        let expected_gates = self.config.gates_per_layer(&config);
        if width != config.hidden_size {
            return Err(PeftError::Incompatible(format!(
                "adaption prompts have width {width}, the model's hidden size is {}",
                config.hidden_size
            )));
        }
        if [layers, len] != [self.config.adapter_layers, self.config.adapter_len]
            || gates != [layers, expected_gates]
        {
            return Err(PeftError::Incompatible(format!(
                "prompts {:?} / gates {:?} do not match adapter_layers {}, adapter_len {} and {} gate(s) per layer",
                self.prompts.dims(),
                gates,
                self.config.adapter_layers,
                self.config.adapter_len,
                expected_gates
            )));
        }
        if self.first_layer + layers != config.num_hidden_layers {
            return Err(PeftError::Incompatible(format!(
                "adapter starts at layer {} with {layers} layers, the model has {}",
                self.first_layer, config.num_hidden_layers
            )));
        }
        Ok(())
    }

    fn hooks<'a>(&'a self, model: &dyn AdaptableModel<B>) -> Box<dyn LayerHooks<B> + 'a> {
        self.prepare(model, None)
    }

    /// The features are the prompt offset of [`AdaptionPrompt::hooks_with_prompt_offset`],
    /// `[batch, hidden]` (rows without features: no offset).
    fn hooks_with_features<'a>(
        &'a self,
        model: &dyn AdaptableModel<B>,
        features: Features<B>,
    ) -> Result<Box<dyn LayerHooks<B> + 'a>> {
        let [_, width] = features.values.dims();
        let hidden = model.geometry().hidden_size;
        if width != hidden {
            return Err(PeftError::Incompatible(format!(
                "prompt offsets have width {width}, the model's hidden size is {hidden}"
            )));
        }
        Ok(self.prepare(model, Some(features.masked(features.values.clone()))))
    }

    /// PEFT's names: `...layers.{i}.self_attn.adaption_prompt` `[1, K, hidden]` and
    /// `...adaption_gate` `[1]` (gates of the per-head variant are stored `[H]`; the files
    /// module refuses to write those as PEFT).
    fn named_tensors(&self) -> Vec<NamedTensor> {
        let [layers, len, width] = self.prompts.dims();
        let prompts = host_values(self.prompts.val());
        let gates = host_values(self.gates.val());
        let per_layer = gates.len() / layers;
        let mut out = Vec::with_capacity(2 * layers);
        for index in 0..layers {
            let prefix = format!("base_model.model.{}", self.attention_paths[index]);
            out.push(NamedTensor {
                key: format!("{prefix}.adaption_prompt"),
                shape: vec![1, len, width],
                values: prompts[index * len * width..(index + 1) * len * width].to_vec(),
            });
            out.push(NamedTensor {
                key: format!("{prefix}.adaption_gate"),
                shape: vec![per_layer],
                values: gates[index * per_layer..(index + 1) * per_layer].to_vec(),
            });
        }
        out
    }
}

impl<B: Backend> FromPeft<B> for AdaptionPrompt<B> {
    const PEFT_TYPE: &'static str = "ADAPTION_PROMPT";

    fn from_peft(
        file: &PeftConfigFile<'_>,
        tensors: &mut TensorMap,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self> {
        let geometry = model.geometry();
        let len = file.usize("adapter_len")?;
        let layers = file.usize("adapter_layers")?;
        file.refuse("target_modules", |v| v.as_str() == Some("self_attn"))?;
        let config = AdaptionPromptConfig::peft_compatible(len, layers);
        config
            .validate(&geometry)
            .map_err(|e| file.error(e.to_string()))?;
        let first = geometry.num_hidden_layers - layers;
        let width = geometry.hidden_size;
        // Nothing is reserved from the configuration's sizes (`"adapter_len": 3000000000` would
        // abort, and the product can overflow): `take_f32` checks each tensor's shape against
        // the file before reading it, so memory follows what the file holds.
        let mut prompts = Vec::new();
        let mut gates = Vec::new();
        for layer in first..geometry.num_hidden_layers {
            let prefix = format!("base_model.model.{}", model.attention_path(layer));
            prompts
                .extend(tensors.take_f32(&format!("{prefix}.adaption_prompt"), &[1, len, width])?);
            gates.extend(tensors.take_f32(&format!("{prefix}.adaption_gate"), &[1])?);
        }
        Ok(AdaptionPrompt::from_tensors(
            config,
            model,
            tensor(prompts, [layers, len, width], device),
            tensor(gates, [layers, 1], device),
        ))
    }
}

impl AdaptionPromptConfig {
    /// The number of trainable values for a model of `model`'s sizes, with checked arithmetic
    /// (for sizes read from a file); `None` on overflow.
    pub fn checked_parameters(&self, model: &ModelGeometry) -> Option<usize> {
        let gates = match self.gate_shape {
            GateShape::PerHead => model.num_attention_heads,
            GateShape::Scalar => 1,
        };
        let per_layer = self
            .adapter_len
            .checked_mul(model.hidden_size)?
            .checked_add(gates)?;
        self.adapter_layers.checked_mul(per_layer)
    }
}

impl<B: Backend> NativeAdapter<B> for AdaptionPrompt<B> {
    fn native_config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("adaption prompt configurations serialise")
    }

    fn init_native(
        manifest: &NativeConfig<'_>,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self> {
        manifest.expect_type("ADAPTION_PROMPT")?;
        let config: AdaptionPromptConfig = manifest.parse()?;
        let geometry = model.geometry();
        config
            .validate(&geometry)
            .map_err(|e| manifest.invalid(e))?;
        manifest.check_parameters(config.checked_parameters(&geometry))?;
        config.init(model, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    use crate::testing::SizedModel;

    type B = NdArray<f32>;

    fn small_model() -> SizedModel<B> {
        SizedModel::new(16, 24, 3, 4, 2, 4, &Default::default())
    }

    #[test]
    fn zero_gate_init_starts_every_gate_at_zero() {
        let device = Default::default();
        for gate_init in [None, Some(GateInit::Zero)] {
            let adapter = AdaptionPromptConfig::new()
                .with_adapter_layers(2)
                .with_gate_init(gate_init)
                .init::<B>(&small_model(), &device)
                .unwrap();
            assert_eq!(host_values(adapter.gates.val()), vec![0.0; 2 * 4]);
        }
    }

    #[test]
    fn random_gate_init_draws_gates_with_the_given_spread() {
        let device = Default::default();
        B::seed(&device, 7);
        let model = SizedModel::<B>::new(256, 24, 3, 64, 64, 4, &device);
        let adapter = AdaptionPromptConfig::new()
            .with_adapter_layers(3)
            .with_gate_init(Some(GateInit::Random { std: 0.5 }))
            .init::<B>(&model, &device)
            .unwrap();
        let gates = host_values(adapter.gates.val());
        assert_eq!(gates.len(), 3 * 64);
        assert!(gates.iter().all(|&g| g != 0.0));
        let mean = gates.iter().sum::<f32>() / gates.len() as f32;
        let std =
            (gates.iter().map(|g| (g - mean).powi(2)).sum::<f32>() / gates.len() as f32).sqrt();
        // 192 draws: the sample standard deviation is within 20% of 0.5 with overwhelming
        // probability, and the mean within 4 standard errors of zero.
        assert!((std - 0.5).abs() < 0.1, "sample std {std}");
        assert!(
            mean.abs() < 4.0 * 0.5 / (gates.len() as f32).sqrt(),
            "mean {mean}"
        );
    }

    #[test]
    fn a_layer_without_projections_leaves_the_other_layers_their_own_prompts() {
        let device = Default::default();
        let mut model = SizedModel::<B>::new(16, 24, 3, 4, 2, 4, &device);
        let adapter = AdaptionPromptConfig::new()
            .with_adapter_len(2)
            .with_adapter_layers(2)
            .with_gate_init(Some(GateInit::Random { std: 1.0 }))
            .init::<B>(&model, &device)
            .unwrap();
        let queries = Tensor::<B, 4>::random([1, 4, 3, 4], Distribution::Default, &device);
        let complete = host_values(adapter.hooks(&model).attention_branch(2, &queries).unwrap());
        // Layer 1, the lower adapted layer, gives no keys/values.
        model.key_values[1] = None;
        let hooks = adapter.hooks(&model);
        assert!(hooks.attention_branch(1, &queries).is_none());
        assert_eq!(
            host_values(hooks.attention_branch(2, &queries).unwrap()),
            complete
        );
    }

    #[test]
    fn random_gate_init_rejects_a_non_positive_spread() {
        for std in [0.0, -1.0, f64::NAN] {
            let config = AdaptionPromptConfig::new()
                .with_adapter_layers(2)
                .with_gate_init(Some(GateInit::Random { std }));
            assert!(matches!(
                config.validate(&AdaptableModel::<B>::geometry(&small_model())),
                Err(PeftError::Config(message)) if message.contains("gate_init")
            ));
        }
    }

    #[test]
    fn configuration_written_without_gate_init_still_reads_as_zero_init() {
        let old = r#"{"adapter_len":10,"adapter_layers":3,"gate_shape":"PerHead","gate_activation":"Tanh"}"#;
        let config: AdaptionPromptConfig = serde_json::from_str(old).unwrap();
        assert_eq!(config.gate_init, None);
        assert_eq!(config, AdaptionPromptConfig::new().with_adapter_layers(3));
        let random =
            AdaptionPromptConfig::new().with_gate_init(Some(GateInit::Random { std: 1.0 }));
        let text = serde_json::to_string(&random).unwrap();
        assert_eq!(
            serde_json::from_str::<AdaptionPromptConfig>(&text).unwrap(),
            random
        );
    }
}

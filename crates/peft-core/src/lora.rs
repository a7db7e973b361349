//! LoRA (Hu et al. 2021) with Hugging Face PEFT semantics:
//! `y = W x + (lora_alpha / r) · B A dropout(x)` (`lora_alpha / √r` with rsLoRA), computed in
//! activation space (`x·A·B`), never as a dense delta per step.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_llama::model::{cast_to, matmul, upcast};
use peft_llama::{LayerHooks, Llama, LlamaConfig, Projection};

use crate::adapter::{host_values, Adapter, NamedTensor, PeftMethod};
use crate::error::{PeftError, Result};

/// Configuration of [`Lora`].
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    #[config(default = 8)]
    pub r: usize,
    /// Scaling numerator.
    #[config(default = 8.0)]
    pub lora_alpha: f64,
    /// Projections to adapt.
    #[config(default = "vec![Projection::Query, Projection::Value]")]
    pub target_modules: Vec<Projection>,
    /// Dropout on the LoRA branch's input during training.
    #[config(default = 0.0)]
    pub lora_dropout: f64,
    /// Scale by `lora_alpha / √r` (rank-stabilised LoRA) instead of `lora_alpha / r`.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Layers to adapt; `None` adapts every layer.
    #[config(default = "None")]
    pub layers_to_transform: Option<Vec<usize>>,
}

impl LoraConfig {
    /// The scale applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Parses PEFT's `target_modules`: module names, or `all-linear` for every projection
    /// except the output head.
    ///
    /// # Errors
    /// An unknown module name.
    pub fn parse_target_modules<S: AsRef<str>>(names: &[S]) -> Result<Vec<Projection>> {
        if names.len() == 1 && names[0].as_ref() == "all-linear" {
            return Ok(Projection::ALL.to_vec());
        }
        let mut targets: Vec<Projection> = names
            .iter()
            .map(|name| {
                Projection::from_hf_name(name.as_ref()).ok_or_else(|| {
                    PeftError::Config(format!(
                        "unknown target module `{}` (known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, all-linear)",
                        name.as_ref()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        targets.sort();
        targets.dedup();
        Ok(targets)
    }

    fn layers(&self, model: &LlamaConfig) -> Vec<usize> {
        match &self.layers_to_transform {
            Some(layers) => layers.clone(),
            None => (0..model.num_hidden_layers).collect(),
        }
    }

    /// `(layer, projection, in, out)` of every adapted linear layer.
    pub(crate) fn targets(&self, model: &LlamaConfig) -> Vec<(usize, Projection, usize, usize)> {
        let mut out = Vec::new();
        for layer in self.layers(model) {
            for &projection in &self.target_modules {
                let (d, q, kv, f) = (
                    model.hidden_size,
                    model.query_width(),
                    model.kv_width(),
                    model.intermediate_size,
                );
                let (input, output) = match projection {
                    Projection::Query => (d, q),
                    Projection::Key | Projection::Value => (d, kv),
                    Projection::Output => (q, d),
                    Projection::Gate | Projection::Up => (d, f),
                    Projection::Down => (f, d),
                };
                out.push((layer, projection, input, output));
            }
        }
        out
    }

    /// Checks the configuration against a model.
    ///
    /// # Errors
    /// Zero rank, no targets, dropout outside [0, 1), or layers the model lacks.
    pub fn validate(&self, model: &LlamaConfig) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::Config("r must be positive".into()));
        }
        if self.target_modules.is_empty() {
            return Err(PeftError::Config("target_modules is empty".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::Config(format!(
                "lora_dropout {} is not in [0, 1)",
                self.lora_dropout
            )));
        }
        if let Some(bad) = self
            .layers(model)
            .into_iter()
            .find(|&l| l >= model.num_hidden_layers)
        {
            return Err(PeftError::Incompatible(format!(
                "layers_to_transform names layer {bad}, the model has {} layers",
                model.num_hidden_layers
            )));
        }
        Ok(())
    }

    /// Trainable parameters for `model`, computed without allocating anything: `r·(in + out)`
    /// per adapted projection.
    pub fn num_trainable_parameters(&self, model: &LlamaConfig) -> usize {
        self.targets(model)
            .iter()
            .map(|&(_, _, i, o)| self.r * (i + o))
            .sum()
    }

    /// Creates the adapter: `A` Kaiming-uniform as `nn.Linear`'s default (U(±1/√in)), `B` zero,
    /// so the adapted model starts exactly at the base model.
    ///
    /// # Errors
    /// See [`LoraConfig::validate`].
    pub fn init<B: Backend>(&self, model: &LlamaConfig, device: &B::Device) -> Result<Lora<B>> {
        self.validate(model)?;
        let modules = self
            .targets(model)
            .into_iter()
            .map(|(layer, projection, input, output)| {
                let bound = 1.0 / (input as f64).sqrt();
                LoraLinear {
                    lora_a: Param::from_tensor(Tensor::random(
                        [input, self.r],
                        Distribution::Uniform(-bound, bound),
                        device,
                    )),
                    lora_b: Param::from_tensor(Tensor::zeros([self.r, output], device)),
                    dropout: DropoutConfig::new(self.lora_dropout).init(),
                    layer,
                    projection: projection.hf_name().to_string(),
                }
            })
            .collect();
        Ok(Lora {
            modules,
            config: self.clone(),
            num_layers: model.num_hidden_layers,
        })
    }
}

/// The low-rank pair of one adapted projection.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `A` `[in, r]` (PEFT stores its transpose, `lora_A.weight` `[r, in]`).
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B` `[r, out]` (PEFT: `lora_B.weight` `[out, r]`).
    pub lora_b: Param<Tensor<B, 2>>,
    /// Dropout on the input of the branch.
    pub dropout: Dropout,
    /// Decoder layer index.
    pub layer: usize,
    /// Hugging Face module name of the projection.
    pub projection: String,
}

impl<B: Backend> LoraLinear<B> {
    /// `scaling · dropout(x) A B` for `x` `[batch, seq, in]`, in the dtype of `x`.
    pub fn delta(&self, x: &Tensor<B, 3>, scaling: f64) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let lora_a = self.lora_a.val();
        let x = cast_to(x.clone(), lora_a.dtype());
        // One 2-D product per factor (see `peft_llama::model::linear_rows`).
        let [batch, seq, width] = x.dims();
        let rows = self.dropout.forward(x).reshape([batch * seq, width]);
        let low = matmul(rows, lora_a);
        let delta = matmul(low, self.lora_b.val()) * scaling;
        let [_, out] = delta.dims();
        cast_to(delta.reshape([batch, seq, out]), dtype)
    }

    /// The dense update `scaling · A B` `[in, out]` in f32.
    pub fn dense_delta(&self, scaling: f64) -> Tensor<B, 2> {
        matmul(self.lora_a.val(), self.lora_b.val()) * scaling
    }
}

/// LoRA pairs for a set of projections of a LLaMA.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// One pair per adapted projection, ordered by layer then projection.
    pub modules: Vec<LoraLinear<B>>,
    /// Settings.
    #[module(skip)]
    pub config: LoraConfig,
    /// Layers of the model the adapter was made for.
    pub num_layers: usize,
}

struct LoraHooks<'a, B: Backend> {
    /// `slots[layer][projection]` → index into `modules`.
    slots: Vec<[Option<usize>; 7]>,
    modules: &'a [LoraLinear<B>],
    scaling: f64,
}

fn projection_index(projection: Projection) -> usize {
    Projection::ALL
        .iter()
        .position(|&p| p == projection)
        .unwrap_or(0)
}

impl<B: Backend> LayerHooks<B> for LoraHooks<'_, B> {
    fn adapt_projection(
        &self,
        layer: usize,
        projection: Projection,
        input: &Tensor<B, 3>,
        output: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        match self
            .slots
            .get(layer)
            .and_then(|s| s[projection_index(projection)])
        {
            Some(index) => output + self.modules[index].delta(input, self.scaling),
            None => output,
        }
    }

    fn first_adapted_layer(&self) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.iter().any(Option::is_some))
    }
}

impl<B: Backend> Lora<B> {
    fn linear_mut<'m>(
        base: &'m mut Llama<B>,
        layer: usize,
        projection: &str,
    ) -> Option<&'m mut Linear<B>> {
        let layer = base.layers.get_mut(layer)?;
        Some(match Projection::from_hf_name(projection)? {
            Projection::Query => &mut layer.self_attn.q_proj,
            Projection::Key => &mut layer.self_attn.k_proj,
            Projection::Value => &mut layer.self_attn.v_proj,
            Projection::Output => &mut layer.self_attn.o_proj,
            Projection::Gate => &mut layer.mlp.gate_proj,
            Projection::Up => &mut layer.mlp.up_proj,
            Projection::Down => &mut layer.mlp.down_proj,
        })
    }

    fn apply_dense(&self, mut base: Llama<B>, sign: f64) -> Llama<B> {
        let scaling = self.config.scaling();
        for module in &self.modules {
            if let Some(linear) = Self::linear_mut(&mut base, module.layer, &module.projection) {
                let weight = linear.weight.val();
                let dtype = weight.dtype();
                let delta = module.dense_delta(scaling);
                let weight = upcast(weight);
                let merged = cast_to(delta, weight.dtype()).mul_scalar(sign) + weight;
                let merged = cast_to(merged, dtype);
                linear.weight = Param::from_tensor(merged).set_require_grad(false);
            }
        }
        base
    }

    /// Adds `scaling · A B` to the base weights (in f32, then back to the weights' dtype).
    pub fn merge_into(&self, base: Llama<B>) -> Llama<B> {
        self.apply_dense(base, 1.0)
    }

    /// Subtracts what [`Lora::merge_into`] added.
    pub fn unmerge_from(&self, base: Llama<B>) -> Llama<B> {
        self.apply_dense(base, -1.0)
    }
}

impl<B: Backend> Adapter<B> for Lora<B> {
    fn method(&self) -> PeftMethod {
        PeftMethod::Lora
    }

    fn check_compatible(&self, config: &LlamaConfig) -> Result<()> {
        self.config.validate(config)?;
        if self.num_layers != config.num_hidden_layers {
            return Err(PeftError::Incompatible(format!(
                "LoRA made for {} layers, the model has {}",
                self.num_layers, config.num_hidden_layers
            )));
        }
        for (module, (layer, projection, input, output)) in
            self.modules.iter().zip(self.config.targets(config))
        {
            let found = [module.lora_a.dims(), module.lora_b.dims()];
            let expected = [[input, self.config.r], [self.config.r, output]];
            if found != expected
                || module.layer != layer
                || module.projection != projection.hf_name()
            {
                return Err(PeftError::Incompatible(format!(
                    "layers.{}.{}: LoRA A/B have shapes {:?}, the model needs {:?} (layer {layer} {projection})",
                    module.layer, module.projection, found, expected
                )));
            }
        }
        Ok(())
    }

    fn hooks<'a>(&'a self, base: &'a Llama<B>) -> Box<dyn LayerHooks<B> + 'a> {
        let mut slots = vec![[None; 7]; base.config.num_hidden_layers];
        for (index, module) in self.modules.iter().enumerate() {
            if let Some(projection) = Projection::from_hf_name(&module.projection) {
                if let Some(layer) = slots.get_mut(module.layer) {
                    layer[projection_index(projection)] = Some(index);
                }
            }
        }
        Box::new(LoraHooks {
            slots,
            modules: &self.modules,
            scaling: self.config.scaling(),
        })
    }

    /// PEFT's names: `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight`
    /// `[r, in]` and `.lora_B.weight` `[out, r]`.
    fn named_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::with_capacity(2 * self.modules.len());
        for module in &self.modules {
            let parent = Projection::from_hf_name(&module.projection)
                .map_or("self_attn", Projection::hf_parent);
            let prefix = format!(
                "base_model.model.model.layers.{}.{parent}.{}",
                module.layer, module.projection
            );
            let [input, r] = module.lora_a.dims();
            let [_, output] = module.lora_b.dims();
            out.push(NamedTensor {
                key: format!("{prefix}.lora_A.weight"),
                shape: vec![r, input],
                values: host_values(module.lora_a.val().transpose()),
            });
            out.push(NamedTensor {
                key: format!("{prefix}.lora_B.weight"),
                shape: vec![output, r],
                values: host_values(module.lora_b.val().transpose()),
            });
        }
        out
    }
}

//! LoRA (Hu et al. 2021) with Hugging Face PEFT semantics:
//! `y = W x + (lora_alpha / r) · B A dropout(x)` (`lora_alpha / √r` with rsLoRA), computed in
//! activation space (`x·A·B`), never as a dense delta per step.
//!
//! LoRA attaches to any linear site a model lists ([`crate::AdaptableModel::linear_sites`]),
//! chosen by module path as PEFT's `target_modules` ([`TargetModules`]).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_ops::tensor::{cast_to, matmul, upcast};

use peft_io::{transpose, TensorMap};
use serde_json::{json, Value};

use crate::adapter::{host_values, Adapter, NamedTensor, PeftMethod};
use crate::error::{PeftError, Result};
use crate::hooks::{LayerHooks, Site};
use crate::model::{require_point, AdaptableModel, InsertionPoint, LinearSite, ModelGeometry};
use crate::native_format::{NativeAdapter, NativeConfig};
use crate::peft_format::{tensor, FromPeft, PeftConfigFile};
use crate::targets::TargetModules;

/// Configuration of [`Lora`].
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    #[config(default = 8)]
    pub r: usize,
    /// Scaling numerator.
    #[config(default = 8.0)]
    pub lora_alpha: f64,
    /// Linear sites to adapt, by module path (PEFT's `target_modules`); by default the query and
    /// value projections, PEFT's default for LLaMA.
    #[config(default = "TargetModules::names(&[\"q_proj\", \"v_proj\"])")]
    pub target_modules: TargetModules,
    /// Dropout on the LoRA branch's input during training.
    #[config(default = 0.0)]
    pub lora_dropout: f64,
    /// Scale by `lora_alpha / √r` (rank-stabilised LoRA) instead of `lora_alpha / r`.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Layers to adapt; `None` adapts every layer (and the sites outside the layers).
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

    /// The sites of `sites` (a model's [`AdaptableModel::linear_sites`]) this configuration
    /// adapts, in the model's order: those [`LoraConfig::target_modules`] selects, in the layers
    /// of [`LoraConfig::layers_to_transform`] when that is set.
    ///
    /// # Errors
    /// Targets that select nothing, a name that matches no site, a bad regular expression.
    pub fn targets(&self, sites: &[LinearSite]) -> Result<Vec<LinearSite>> {
        let selected = self.target_modules.select(sites)?;
        let selected: Vec<LinearSite> = selected
            .into_iter()
            .filter(|site| match (&self.layers_to_transform, site.layer) {
                (None, _) => true,
                (Some(layers), Some(layer)) => layers.contains(&layer),
                (Some(_), None) => false,
            })
            .cloned()
            .collect();
        if selected.is_empty() {
            return Err(PeftError::Incompatible(format!(
                "target_modules {} select no linear layer in layers_to_transform {:?}",
                self.target_modules, self.layers_to_transform
            )));
        }
        Ok(selected)
    }

    /// Checks the configuration against a model of sizes `geometry`.
    ///
    /// # Errors
    /// Zero rank, dropout outside [0, 1), or layers the model lacks.
    pub fn validate(&self, geometry: &ModelGeometry) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::Config("r must be positive".into()));
        }
        self.target_modules.matcher()?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::Config(format!(
                "lora_dropout {} is not in [0, 1)",
                self.lora_dropout
            )));
        }
        if let Some(bad) = self
            .layers_to_transform
            .iter()
            .flatten()
            .find(|&&l| l >= geometry.num_hidden_layers)
        {
            return Err(PeftError::Incompatible(format!(
                "layers_to_transform names layer {bad}, the model has {} layers",
                geometry.num_hidden_layers
            )));
        }
        Ok(())
    }

    /// Trainable parameters on a model with linear sites `sites`, computed without allocating
    /// anything: `r·(in + out)` per adapted site.
    ///
    /// # Errors
    /// See [`LoraConfig::targets`]; a count that overflows `usize`.
    pub fn num_trainable_parameters(&self, sites: &[LinearSite]) -> Result<usize> {
        self.checked_parameters(sites)?.ok_or_else(|| {
            PeftError::Config(format!(
                "r = {} gives more parameters than can be addressed",
                self.r
            ))
        })
    }

    /// [`LoraConfig::num_trainable_parameters`] with `None` on overflow (for sizes read from a
    /// file).
    pub(crate) fn checked_parameters(&self, sites: &[LinearSite]) -> Result<Option<usize>> {
        Ok(self.targets(sites)?.iter().try_fold(0usize, |sum, site| {
            sum.checked_add(
                self.r
                    .checked_mul(site.in_features.checked_add(site.out_features)?)?,
            )
        }))
    }

    /// Creates the adapter for `model`: `A` Kaiming-uniform as `nn.Linear`'s default
    /// (U(±1/√in)), `B` zero, so the adapted model starts exactly at the base model.
    ///
    /// # Errors
    /// See [`LoraConfig::validate`] and [`LoraConfig::targets`]; a model that does not call its
    /// hooks at its linear sites.
    pub fn init<B: Backend>(
        &self,
        model: &(impl AdaptableModel<B> + ?Sized),
        device: &B::Device,
    ) -> Result<Lora<B>> {
        self.validate(&model.geometry())?;
        require_point(model, InsertionPoint::Linear, "LoRA")?;
        let modules = self
            .targets(&model.linear_sites())?
            .into_iter()
            .map(|site| {
                let bound = 1.0 / (site.in_features as f64).sqrt();
                LoraLinear {
                    lora_a: Param::from_tensor(Tensor::random(
                        [site.in_features, self.r],
                        Distribution::Uniform(-bound, bound),
                        device,
                    )),
                    lora_b: Param::from_tensor(Tensor::zeros([self.r, site.out_features], device)),
                    dropout: DropoutConfig::new(self.lora_dropout).init(),
                    site,
                }
            })
            .collect();
        Ok(Lora {
            modules,
            config: self.clone(),
        })
    }
}

/// The low-rank pair of one adapted linear site.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `A` `[in, r]` (PEFT stores its transpose, `lora_A.weight` `[r, in]`).
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B` `[r, out]` (PEFT: `lora_B.weight` `[out, r]`).
    pub lora_b: Param<Tensor<B, 2>>,
    /// Dropout on the input of the branch.
    pub dropout: Dropout,
    /// The site adapted.
    #[module(skip)]
    pub site: LinearSite,
}

impl<B: Backend> LoraLinear<B> {
    /// `scaling · dropout(x) A B` for `x` `[batch, seq, in]`, in the dtype of `x`.
    pub fn delta(&self, x: &Tensor<B, 3>, scaling: f64) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let lora_a = self.lora_a.val();
        let x = cast_to(x.clone(), lora_a.dtype());
        // One 2-D product per factor (see `peft_ops::tensor::linear_rows`).
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

/// LoRA pairs for a set of linear sites of a model.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// One pair per adapted site, in the model's order of sites.
    pub modules: Vec<LoraLinear<B>>,
    /// Settings.
    #[module(skip)]
    pub config: LoraConfig,
}

struct LoraHooks<'a, B: Backend> {
    /// `layers[layer]`: `(site name, index into modules)` of the layer's adapted sites.
    layers: Vec<Vec<(&'a str, usize)>>,
    /// The same for sites outside the layers.
    top_level: Vec<(&'a str, usize)>,
    modules: &'a [LoraLinear<B>],
    scaling: f64,
}

impl<B: Backend> LayerHooks<B> for LoraHooks<'_, B> {
    fn adapt_linear(
        &self,
        site: Site<'_>,
        input: &Tensor<B, 3>,
        output: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let slots = match site.layer {
            Some(layer) => self
                .layers
                .get(layer)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            None => &self.top_level,
        };
        match slots.iter().find(|(name, _)| *name == site.name) {
            Some(&(_, index)) => output + self.modules[index].delta(input, self.scaling),
            None => output,
        }
    }

    fn first_adapted_layer(&self) -> Option<usize> {
        self.layers.iter().position(|slots| !slots.is_empty())
    }
}

impl<B: Backend> Lora<B> {
    fn apply_dense(&self, model: &mut dyn AdaptableModel<B>, sign: f64) -> Result<()> {
        let missing = |path: &str| {
            PeftError::Incompatible(format!(
                "the model has no linear layer `{path}` to merge into"
            ))
        };
        // Every site is looked up before any weight changes, so a failure leaves the model as
        // it was.
        let sites = model.linear_sites();
        if let Some(site) = self.modules.iter().find_map(|m| {
            sites
                .iter()
                .find(|s| s.path == m.site.path && s.quantized.is_some())
        }) {
            return Err(PeftError::Incompatible(format!(
                "cannot merge LoRA into `{}`: its weight is held quantized ({}), and merging \
                 would have to re-quantize it (a second rounding that changes what the adapter \
                 was trained against). Merge into the dense checkpoint instead (load it without \
                 quantization), or keep the adapter separate",
                site.path,
                site.quantized.as_deref().unwrap_or_default()
            )));
        }
        if let Some(module) = self
            .modules
            .iter()
            .find(|m| model.linear_mut(&m.site.path).is_none())
        {
            return Err(missing(&module.site.path));
        }
        let scaling = self.config.scaling();
        for module in &self.modules {
            let path = &module.site.path;
            let linear = model.linear_mut(path).ok_or_else(|| missing(path))?;
            let weight = linear.weight.val();
            let dtype = weight.dtype();
            let delta = module.dense_delta(scaling);
            let weight = upcast(weight);
            let merged = cast_to(delta, weight.dtype()).mul_scalar(sign) + weight;
            let merged = cast_to(merged, dtype);
            linear.weight = Param::from_tensor(merged).set_require_grad(false);
        }
        Ok(())
    }
}

impl<B: Backend> Adapter<B> for Lora<B> {
    fn method(&self) -> PeftMethod {
        PeftMethod::Lora
    }

    fn peft_config(&self, _model: &dyn AdaptableModel<B>) -> Result<serde_json::Value> {
        let c = &self.config;
        let targets = match &c.target_modules {
            TargetModules::Names(names) => {
                let mut names = names.clone();
                names.sort();
                names.dedup();
                json!(names)
            }
            other => json!(other),
        };
        Ok(json!({
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "target_modules": targets,
            "lora_dropout": c.lora_dropout,
            "use_rslora": c.use_rslora,
            "layers_to_transform": c.layers_to_transform,
            "layers_pattern": null,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
            "lora_bias": false,
            "layer_replication": null,
        }))
    }

    fn check_compatible(&self, model: &dyn AdaptableModel<B>) -> Result<()> {
        let geometry = model.geometry();
        self.config.validate(&geometry)?;
        require_point(model, InsertionPoint::Linear, "LoRA")?;
        let targets = self.config.targets(&model.linear_sites())?;
        if targets.len() != self.modules.len() {
            return Err(PeftError::Incompatible(format!(
                "LoRA holds {} pairs, its target_modules select {} linear layers of this model",
                self.modules.len(),
                targets.len()
            )));
        }
        for (module, site) in self.modules.iter().zip(&targets) {
            let found = [module.lora_a.dims(), module.lora_b.dims()];
            let expected = [
                [site.in_features, self.config.r],
                [self.config.r, site.out_features],
            ];
            if found != expected || module.site.path != site.path {
                return Err(PeftError::Incompatible(format!(
                    "{}: LoRA A/B have shapes {:?}, the model's `{}` needs {:?}",
                    module.site.path, found, site.path, expected
                )));
            }
        }
        Ok(())
    }

    fn hooks<'a>(&'a self, model: &dyn AdaptableModel<B>) -> Box<dyn LayerHooks<B> + 'a> {
        let mut layers = vec![Vec::new(); model.geometry().num_hidden_layers];
        let mut top_level = Vec::new();
        for (index, module) in self.modules.iter().enumerate() {
            let slot = (module.site.name.as_str(), index);
            match module.site.layer {
                Some(layer) => {
                    if let Some(slots) = layers.get_mut(layer) {
                        slots.push(slot);
                    }
                }
                None => top_level.push(slot),
            }
        }
        Box::new(LoraHooks {
            layers,
            top_level,
            modules: &self.modules,
            scaling: self.config.scaling(),
        })
    }

    /// PEFT's names: `base_model.model.{path}.lora_A.weight` `[r, in]` and
    /// `.lora_B.weight` `[out, r]`.
    fn named_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::with_capacity(2 * self.modules.len());
        for module in &self.modules {
            let prefix = format!("base_model.model.{}", module.site.path);
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

    /// Adds `scaling · A B` to the base weights (in f32, then back to the weights' dtype).
    fn merge_into(&self, model: &mut dyn AdaptableModel<B>) -> Result<()> {
        self.apply_dense(model, 1.0)
    }

    /// Subtracts what [`Adapter::merge_into`] added.
    fn unmerge_from(&self, model: &mut dyn AdaptableModel<B>) -> Result<()> {
        self.apply_dense(model, -1.0)
    }
}

impl LoraConfig {
    /// Reads PEFT's LoRA fields, refusing the settings this crate does not implement (DoRA,
    /// rank or alpha patterns, bias training, `fan_in_fan_out`, `modules_to_save`, layer
    /// replication) rather than ignoring them.
    ///
    /// # Errors
    /// A missing or malformed field, an unsupported setting.
    pub fn from_peft(file: &PeftConfigFile<'_>) -> Result<Self> {
        let empty = |v: &Value| v.is_null() || v.as_object().is_some_and(|o| o.is_empty());
        file.refuse("rank_pattern", empty)?;
        file.refuse("alpha_pattern", empty)?;
        file.refuse("use_dora", |v| v.as_bool() != Some(true))?;
        file.refuse("bias", |v| v.is_null() || v.as_str() == Some("none"))?;
        file.refuse("fan_in_fan_out", |v| v.as_bool() != Some(true))?;
        file.refuse("modules_to_save", |v| {
            v.is_null() || v.as_array().is_some_and(Vec::is_empty)
        })?;
        file.refuse("layer_replication", Value::is_null)?;
        file.refuse("lora_bias", |v| v.as_bool() != Some(true))?;
        let target_modules: TargetModules =
            serde_json::from_value(file.field("target_modules")?.clone()).map_err(|_| {
                file.error(
                    "`target_modules` must be a list of module names or a regular expression",
                )
            })?;
        let layers_to_transform = match file.get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_u64().map(|n| n as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| file.error("`layers_to_transform` must be layer indices"))?,
            ),
            Some(_) => return Err(file.error("`layers_to_transform` must be layer indices")),
        };
        Ok(LoraConfig::new()
            .with_r(file.usize("r")?)
            .with_lora_alpha(file.f64("lora_alpha")?)
            .with_target_modules(target_modules)
            .with_lora_dropout(
                file.get("lora_dropout")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
            )
            .with_use_rslora(file.bool_or("use_rslora", false)?)
            .with_layers_to_transform(layers_to_transform))
    }
}

impl<B: Backend> FromPeft<B> for Lora<B> {
    const PEFT_TYPE: &'static str = "LORA";

    fn from_peft(
        file: &PeftConfigFile<'_>,
        tensors: &mut TensorMap,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self> {
        let config = LoraConfig::from_peft(file)?;
        config
            .validate(&model.geometry())
            .map_err(|e| file.error(e.to_string()))?;
        let targets = config
            .targets(&model.linear_sites())
            .map_err(|e| file.error(e.to_string()))?;
        let r = config.r;
        let mut modules = Vec::with_capacity(targets.len());
        for site in targets {
            let (input, output) = (site.in_features, site.out_features);
            let prefix = format!("base_model.model.{}", site.path);
            // PEFT stores torch's `[out, in]`; Burn's linear weights are `[in, out]`.
            let a = tensors.take_f32(&format!("{prefix}.lora_A.weight"), &[r, input])?;
            let b = tensors.take_f32(&format!("{prefix}.lora_B.weight"), &[output, r])?;
            modules.push(LoraLinear {
                lora_a: Param::from_tensor(tensor(transpose(&a, r, input), [input, r], device)),
                lora_b: Param::from_tensor(tensor(transpose(&b, output, r), [r, output], device)),
                dropout: DropoutConfig::new(config.lora_dropout).init(),
                site,
            });
        }
        Ok(Lora { modules, config })
    }
}
impl<B: Backend> NativeAdapter<B> for Lora<B> {
    fn native_config(&self) -> Value {
        serde_json::to_value(&self.config).expect("LoRA configurations serialise")
    }

    fn init_native(
        manifest: &NativeConfig<'_>,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self> {
        manifest.expect_type("LORA")?;
        let config: LoraConfig = manifest.parse()?;
        config
            .validate(&model.geometry())
            .map_err(|e| manifest.invalid(e))?;
        // Every size is checked against the tensor file before `init` allocates anything: a
        // corrupt or hostile `"r": 2000000000` must be an error, not an abort.
        let expected = config
            .checked_parameters(&model.linear_sites())
            .map_err(|e| manifest.invalid(e))?;
        manifest.check_parameters(expected)?;
        config.init(model, device)
    }
}

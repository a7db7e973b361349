//! The one trait every PEFT method implements, and what all of them share.

use std::fmt;

use crate::error::Result;
use crate::hooks::{Features, LayerHooks};
use crate::model::AdaptableModel;
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
pub use peft_io::NamedTensor;

/// The PEFT methods, named as Hugging Face PEFT's `peft_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeftMethod {
    /// Low-rank adaptation of linear layers.
    Lora,
    /// Learned key/value prefixes joined with the real tokens in every layer's softmax.
    PrefixTuning,
    /// LLaMA-Adapter: learned prompts in the top layers with zero-initialised gated attention.
    AdaptionPrompt,
    /// A method defined outside this crate, by its `peft_type`.
    Other(&'static str),
}

impl PeftMethod {
    /// PEFT's `peft_type` string.
    pub fn peft_type(self) -> &'static str {
        match self {
            PeftMethod::Lora => "LORA",
            PeftMethod::PrefixTuning => "PREFIX_TUNING",
            PeftMethod::AdaptionPrompt => "ADAPTION_PROMPT",
            PeftMethod::Other(peft_type) => peft_type,
        }
    }
}

impl fmt::Display for PeftMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeftMethod::Lora => "lora",
            PeftMethod::PrefixTuning => "prefix-tuning",
            PeftMethod::AdaptionPrompt => "adaption-prompt",
            PeftMethod::Other(peft_type) => peft_type,
        })
    }
}

/// Reads a tensor's values to the host as f32.
pub fn host_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 conversion of float tensor data cannot fail")
}

/// A parameter-efficient adapter for a frozen model (any [`AdaptableModel`]).
///
/// An adapter is a Burn [`Module`] holding only its own (trainable) parameters. For each
/// forward pass it binds to the base model through [`Adapter::hooks`], which prepares
/// whatever does not depend on the tokens (for LLaMA-Adapter: the prompts' keys and values,
/// once per pass instead of once per token) and returns the [`LayerHooks`] the model calls.
///
/// A method of one's own implements this trait and enters [`crate::PeftModel`], the trainer
/// and the native file format like the built-in ones.
pub trait Adapter<B: Backend>: Module<B> {
    /// Which method this is.
    fn method(&self) -> PeftMethod;

    /// Checks that the adapter fits `model` (layer count, widths, heads, the sites it adapts,
    /// the insertion points it needs).
    ///
    /// # Errors
    /// [`crate::PeftError::Incompatible`] naming the mismatch.
    fn check_compatible(&self, model: &dyn AdaptableModel<B>) -> Result<()>;

    /// Binds the adapter to `model` for one or more forward passes.
    fn hooks<'a>(&'a self, model: &dyn AdaptableModel<B>) -> Box<dyn LayerHooks<B> + 'a>;

    /// Binds the adapter to `model` with per-example conditioning (the multimodal adaption
    /// prompt's image features, one row per example). Methods without conditioning refuse.
    ///
    /// # Errors
    /// [`crate::PeftError::Unsupported`] for a method that takes no features; a feature width
    /// the adapter was not made for.
    fn hooks_with_features<'a>(
        &'a self,
        model: &dyn AdaptableModel<B>,
        features: Features<B>,
    ) -> Result<Box<dyn LayerHooks<B> + 'a>> {
        let _ = (model, features);
        Err(crate::PeftError::Unsupported(format!(
            "{} adapters take no per-example features",
            self.method()
        )))
    }

    /// The trainable parameters under Hugging Face PEFT's state-dict names and shapes.
    fn named_tensors(&self) -> Vec<NamedTensor>;

    /// The method's own fields of PEFT's `adapter_config.json` for this adapter on `model`
    /// (`r`, `target_modules`, ...), as a JSON object; [`crate::peft_format::save_peft`] adds
    /// the fields every method shares (`peft_type` from [`Adapter::method`], `task_type`,
    /// `base_model_name_or_path`). Reading them back is [`crate::peft_format::FromPeft`].
    ///
    /// # Errors
    /// [`crate::PeftError::Unsupported`] (the default) for a method or a form of it that PEFT's
    /// files cannot hold.
    fn peft_config(&self, model: &dyn AdaptableModel<B>) -> Result<serde_json::Value> {
        let _ = model;
        Err(crate::PeftError::Unsupported(format!(
            "{} adapters have no Hugging Face PEFT configuration",
            self.method()
        )))
    }

    /// The tensors of PEFT's `adapter_model.safetensors`: [`Adapter::named_tensors`] unless the
    /// method stores something else there.
    ///
    /// # Errors
    /// A form of the adapter PEFT's files cannot hold.
    fn peft_tensors(&self) -> Result<Vec<NamedTensor>> {
        Ok(self.named_tensors())
    }

    /// Number of trainable parameters.
    fn num_trainable_parameters(&self) -> usize {
        self.num_params()
    }

    /// Folds the adapter into `model`'s weights, so that the model alone computes what model and
    /// adapter did.
    ///
    /// # Errors
    /// [`crate::PeftError::Unsupported`] for methods that change attention, not weights.
    fn merge_into(&self, model: &mut dyn AdaptableModel<B>) -> Result<()> {
        let _ = model;
        Err(crate::PeftError::Unsupported(format!(
            "{} adapters change attention, not weights: they cannot be merged into the base model",
            self.method()
        )))
    }

    /// Undoes [`Adapter::merge_into`].
    ///
    /// # Errors
    /// See [`Adapter::merge_into`].
    fn unmerge_from(&self, model: &mut dyn AdaptableModel<B>) -> Result<()> {
        let _ = model;
        Err(crate::PeftError::Unsupported(format!(
            "{} adapters cannot be merged, so not unmerged either",
            self.method()
        )))
    }
}

struct GradientMapper<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
}

impl<B: AutodiffBackend> ModuleMapper<B> for GradientMapper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = tensor
            .grad(self.grads)
            .unwrap_or_else(|| tensor.clone().inner().zeros_like());
        Param::from_mapped_value(id, Tensor::from_inner(grad), mapper)
    }
}

/// A copy of `module` whose parameters hold their gradients from `grads` (zeros where a
/// parameter received none), so gradients can be read with the same code as values,
/// e.g. `gradients_as_module(&adapter, &grads).named_tensors()`.
pub fn gradients_as_module<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &B::Gradients,
) -> M::InnerModule {
    module.clone().map(&mut GradientMapper { grads }).valid()
}

/// A [`ModuleMapper`] that replaces every parameter by N(0, std²) noise (`Randomise(std)`),
/// keeping whether each is trainable: an adapter whose zero-initialised parts (gates, LoRA's B)
/// are open, for tests, benchmarks and file round trips.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Initializer, LinearConfig};
/// # type B = burn::backend::NdArray<f32>;
/// let device = Default::default();
/// let zeros = LinearConfig::new(4, 8)
///     .with_initializer(Initializer::Zeros)
///     .init::<B>(&device);
/// let noisy = zeros.map(&mut peft_core::Randomise(0.1));
/// let values = peft_core::host_values(noisy.weight.val());
/// assert!(values.iter().any(|&v| v != 0.0));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Randomise(pub f64);

impl<B: Backend> ModuleMapper<B> for Randomise {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let noise = Tensor::random(
            tensor.shape(),
            Distribution::Normal(0.0, self.0),
            &tensor.device(),
        );
        let noise = if tensor.is_require_grad() {
            noise.require_grad()
        } else {
            noise
        };
        Param::from_mapped_value(id, noise, mapper)
    }
}

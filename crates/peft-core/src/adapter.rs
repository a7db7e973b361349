//! The one trait every PEFT method implements, and what all of them share.

use std::fmt;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use peft_llama::{LayerHooks, Llama, LlamaConfig};

use crate::error::Result;

/// The PEFT methods, named as Hugging Face PEFT's `peft_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeftMethod {
    /// Low-rank adaptation of linear layers.
    Lora,
    /// Learned key/value prefixes joined with the real tokens in every layer's softmax.
    PrefixTuning,
    /// LLaMA-Adapter: learned prompts in the top layers with zero-initialised gated attention.
    AdaptionPrompt,
}

impl PeftMethod {
    /// PEFT's `peft_type` string.
    pub fn peft_type(self) -> &'static str {
        match self {
            PeftMethod::Lora => "LORA",
            PeftMethod::PrefixTuning => "PREFIX_TUNING",
            PeftMethod::AdaptionPrompt => "ADAPTION_PROMPT",
        }
    }
}

impl fmt::Display for PeftMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeftMethod::Lora => "lora",
            PeftMethod::PrefixTuning => "prefix-tuning",
            PeftMethod::AdaptionPrompt => "adaption-prompt",
        })
    }
}

/// A tensor on the host under the name a file format gives it, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The key, e.g. `base_model.model.model.layers.3.self_attn.adaption_prompt`.
    pub key: String,
    /// Shape as the format stores it.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Vec<f32>,
}

/// Reads a tensor's values to the host as f32.
pub fn host_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 conversion of float tensor data cannot fail")
}

/// A parameter-efficient adapter for a frozen [`Llama`].
///
/// An adapter is a Burn [`Module`] holding only its own (trainable) parameters. For each
/// forward pass it binds to the base model through [`Adapter::hooks`], which prepares
/// whatever does not depend on the tokens (for LLaMA-Adapter: the prompts' keys and values,
/// once per pass instead of once per token) and returns the [`LayerHooks`] the model calls.
pub trait Adapter<B: Backend>: Module<B> {
    /// Which method this is.
    fn method(&self) -> PeftMethod;

    /// Checks that the adapter fits `config` (layer count, widths, heads).
    ///
    /// # Errors
    /// [`crate::PeftError::Incompatible`] naming the mismatch.
    fn check_compatible(&self, config: &LlamaConfig) -> Result<()>;

    /// Binds the adapter to `base` for one or more forward passes.
    fn hooks<'a>(&'a self, base: &'a Llama<B>) -> Box<dyn LayerHooks<B> + 'a>;

    /// The trainable parameters under Hugging Face PEFT's state-dict names and shapes.
    fn named_tensors(&self) -> Vec<NamedTensor>;

    /// Number of trainable parameters.
    fn num_trainable_parameters(&self) -> usize {
        self.num_params()
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
/// # type B = burn::backend::NdArray<f32>;
/// # let model = peft_llama::LlamaConfig::new(32, 16, 24, 2, 4, 2, 4);
/// let lora = peft_core::LoraConfig::new().init::<B>(&model, &Default::default())?;
/// let lora = lora.map(&mut peft_core::Randomise(0.1));
/// # Ok::<(), peft_core::PeftError>(())
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

//! What a model exposes so that adapters can attach to it: the interface every method is written
//! against, implemented by `peft-llama`'s decoders, `peft-vision`'s CLIP tower, and any Burn model
//! of a user's own.
//!
//! A model names its parts as Hugging Face does (`model.layers.3.self_attn.q_proj`), so that
//! adapters target them like PEFT's `target_modules` and save under PEFT's keys. Its forward
//! pass calls a [`LayerHooks`](crate::LayerHooks) at the [insertion points](InsertionPoint) it
//! supports:
//!
//! | insertion point | where the model calls it | used by |
//! | --- | --- | --- |
//! | [`InsertionPoint::Linear`] | after each linear site, with its input and output | LoRA |
//! | [`InsertionPoint::PrefixKeyValues`] | extra keys/values joined with the real tokens' in one softmax | prefix tuning |
//! | [`InsertionPoint::AttentionBranch`] | a separately normalised attention branch added before the output projection | LLaMA-Adapter |

use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Tensor};
use serde::{Deserialize, Serialize};

/// The sizes adapters are shaped by, under the names of Hugging Face's `config.json`.
///
/// For a model without some part, give what describes it best: a model without a feed-forward
/// block has `intermediate_size` 0; one without grouped-query attention has as many key/value
/// heads as heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelGeometry {
    /// Transformer layers (blocks), counted from 0 at the input.
    pub num_hidden_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Query heads per attention.
    pub num_attention_heads: usize,
    /// Key/value heads per attention (fewer than the query heads under grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the feed-forward block's hidden layer.
    pub intermediate_size: usize,
}

impl ModelGeometry {
    /// Width of all query heads, `heads · head_dim`.
    pub fn query_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads, `kv_heads · head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads served by each key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }
}

/// One linear layer of a model, named by its module path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinearSite {
    /// The full module path, as Hugging Face names it: `model.layers.3.self_attn.q_proj`,
    /// `classifier`. Adapters save their tensors under `base_model.model.{path}`.
    pub path: String,
    /// The transformer layer the site belongs to, if any (`None` for a head or an embedding
    /// projection outside the layers).
    pub layer: Option<usize>,
    /// The name the model passes to [`LayerHooks::adapt_linear`](crate::LayerHooks::adapt_linear)
    /// for this site: the path inside its layer (`self_attn.q_proj`), or the whole path for a
    /// site outside the layers.
    pub name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether this is the model's output head (left out of `all-linear`, as in PEFT).
    pub output_head: bool,
    /// The format of the site's weight when it is held quantized (`nf4`, `q4_k`, ...): adapters
    /// attach to it like any other, but nothing can be merged into it.
    pub quantized: Option<String>,
}

impl LinearSite {
    /// A site inside layer `layer`: its path is `{layers_path}.{layer}.{name}`.
    pub fn in_layer(
        layers_path: &str,
        layer: usize,
        name: &str,
        in_features: usize,
        out_features: usize,
    ) -> Self {
        Self {
            path: format!("{layers_path}.{layer}.{name}"),
            layer: Some(layer),
            name: name.to_string(),
            in_features,
            out_features,
            output_head: false,
            quantized: None,
        }
    }

    /// A site outside the layers (a classifier, a projection head), named by its whole path.
    pub fn top_level(path: &str, in_features: usize, out_features: usize) -> Self {
        Self {
            path: path.to_string(),
            layer: None,
            name: path.to_string(),
            in_features,
            out_features,
            output_head: false,
            quantized: None,
        }
    }

    /// Marks the site as the model's output head.
    pub fn as_output_head(mut self) -> Self {
        self.output_head = true;
        self
    }

    /// Marks the site's weight as held quantized in `format` (its name, e.g. `nf4`).
    pub fn quantized_as(mut self, format: impl Into<String>) -> Self {
        self.quantized = Some(format.into());
        self
    }
}

/// The places where a model's forward pass calls its hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InsertionPoint {
    /// [`LayerHooks::adapt_linear`](crate::LayerHooks::adapt_linear) after every linear site
    /// the model lists.
    Linear,
    /// [`LayerHooks::prefix_key_values`](crate::LayerHooks::prefix_key_values) in every
    /// layer's attention, joined in front of the real tokens' keys/values in one softmax.
    PrefixKeyValues,
    /// [`LayerHooks::attention_branch`](crate::LayerHooks::attention_branch) in every layer's
    /// attention, added to the per-head output before the output projection.
    AttentionBranch,
}

/// A model adapters can attach to.
///
/// Implementing it takes a model's sizes, its linear sites, mutable access to them (for merging),
/// and, for the attention-based methods, the frozen key/value projection of each layer; the
/// model's forward pass then calls a [`LayerHooks`](crate::LayerHooks) at the insertion points it
/// lists in [`AdaptableModel::insertion_points`]. `examples/custom_model.rs` in the repository
/// implements it for a small model of its own.
pub trait AdaptableModel<B: Backend> {
    /// The model's sizes.
    fn geometry(&self) -> ModelGeometry;

    /// Every linear layer the forward pass runs through [`LayerHooks::adapt_linear`](crate::LayerHooks::adapt_linear),
    /// in the order the forward pass runs them.
    fn linear_sites(&self) -> Vec<LinearSite>;

    /// The linear layer at `path` (one of [`AdaptableModel::linear_sites`]), for merging an
    /// adapter into its weight; `None` for an unknown path or a site whose weight is held
    /// quantized ([`LinearSite::quantized`]). Its weight is `[in, out]`, as Burn's [`Linear`]
    /// stores it.
    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear<B>>;

    /// The insertion points the forward pass calls (an adapter needing another is refused).
    fn insertion_points(&self) -> &'static [InsertionPoint];

    /// The floating-point type of the frozen weights; adapters cast what they add to it.
    fn dtype(&self) -> DType;

    /// The module path of layer `layer`'s attention (`model.layers.3.self_attn`), under which
    /// adaption prompts are saved.
    fn attention_path(&self, layer: usize) -> String;

    /// Layer `layer`'s frozen key and value projections of `x` `[batch, tokens, hidden]`,
    /// `[batch, kv_heads, tokens, head_dim]` each, without positional encoding (adaption prompts
    /// are keyed this way). `None` when the model has no such layer or no attention.
    fn project_key_values(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)>;

    /// The name or path of the base checkpoint, for `base_model_name_or_path` in PEFT files.
    fn name_or_path(&self) -> Option<String> {
        None
    }

    /// PEFT's `task_type` for this model (`CAUSAL_LM` for a decoder, `FEATURE_EXTRACTION` for an
    /// encoder, `None` for a model PEFT has no task for).
    fn task_type(&self) -> Option<&'static str> {
        None
    }
}

/// Fails unless `model` calls its hooks at `point`.
pub(crate) fn require_point<B: Backend>(
    model: &(impl AdaptableModel<B> + ?Sized),
    point: InsertionPoint,
    method: &str,
) -> crate::Result<()> {
    if model.insertion_points().contains(&point) {
        Ok(())
    } else {
        Err(crate::PeftError::Incompatible(format!(
            "{method} needs the model to call its hooks at {point:?}, and this model does not \
             (it supports {:?})",
            model.insertion_points()
        )))
    }
}

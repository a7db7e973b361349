//! The callbacks a model's forward pass makes at its insertion points (see [`crate::model`]).
//!
//! An adapter prepares them once per forward pass ([`crate::Adapter::hooks`]): whatever does not
//! depend on the tokens (LLaMA-Adapter's prompt keys and values, prefix tuning's prefixes) is
//! computed then, not once per layer or per decoding step.

use burn::tensor::{backend::Backend, Tensor};

/// Which linear site a call to [`LayerHooks::adapt_linear`] comes from: the layer, and the
/// site's name inside it (see [`crate::LinearSite::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Site<'a> {
    /// The layer, or `None` for a site outside the layers.
    pub layer: Option<usize>,
    /// `self_attn.q_proj` inside a layer; the whole module path outside.
    pub name: &'a str,
}

impl<'a> Site<'a> {
    /// A site of layer `layer`.
    pub fn in_layer(layer: usize, name: &'a str) -> Self {
        Self {
            layer: Some(layer),
            name,
        }
    }

    /// A site outside the layers, named by its module path.
    pub fn top_level(path: &'a str) -> Self {
        Self {
            layer: None,
            name: path,
        }
    }
}

/// Callbacks a model's forward pass makes; every method defaults to "no change".
///
/// Layer indices count from 0 at the input.
pub trait LayerHooks<B: Backend> {
    /// Adapts a linear site's output. `input` is `[batch, seq, in]`, `output` is
    /// `[batch, seq, out]` as computed by the frozen weight; returns `[batch, seq, out]`.
    fn adapt_linear(
        &self,
        site: Site<'_>,
        input: &Tensor<B, 3>,
        output: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let _ = (site, input);
        output
    }

    /// Number of virtual tokens whose keys/values [`LayerHooks::prefix_key_values`] returns
    /// (the same in every layer). A model with positions gives the real tokens positions
    /// `P..P+T-1`.
    fn num_prefix_tokens(&self) -> usize {
        0
    }

    /// Keys and values joined in front of the real tokens' in the layer's softmax, each
    /// `[batch, kv_heads, P, head_dim]`, already in the attention's key space (no positional
    /// encoding applied).
    fn prefix_key_values(
        &self,
        layer: usize,
        batch: usize,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let _ = (layer, batch);
        None
    }

    /// A separately normalised attention branch, added to the per-head attention output
    /// before the output projection. `queries` are the queries as the attention scores them
    /// (after any positional encoding) `[batch, heads, seq, head_dim]`; returns
    /// `[batch, heads, seq, head_dim]`.
    fn attention_branch(&self, layer: usize, queries: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        let _ = (layer, queries);
        None
    }

    /// The lowest layer any hook changes, if any. A model may run the layers below it exactly
    /// as the base model and keep no gradient graph for them. A hook on a site outside the
    /// layers leaves this `None` unless it also changes a layer.
    fn first_adapted_layer(&self) -> Option<usize> {
        None
    }
}

/// Per-example conditioning for [`crate::Adapter::hooks_with_features`]: one row of `values`
/// per example of the batch (a multimodal adapter's image features), and which rows have any
/// (`present[row]` false: that row's values are ignored and the example runs unconditioned).
#[derive(Debug, Clone)]
pub struct Features<B: Backend> {
    /// `[batch, width]`.
    pub values: Tensor<B, 2>,
    /// One flag per row.
    pub present: Vec<bool>,
}

impl<B: Backend> Features<B> {
    /// Every row conditioned.
    pub fn all(values: Tensor<B, 2>) -> Self {
        let rows = values.dims()[0];
        Self {
            values,
            present: vec![true; rows],
        }
    }

    /// The rows without conditioning set to zero in `values` (`[batch, width]`) via a mask, or
    /// `values` unchanged when every row is conditioned.
    pub fn masked(&self, values: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.present.iter().all(|&p| p) {
            return values;
        }
        let mask: Vec<f32> = self
            .present
            .iter()
            .map(|&p| if p { 1.0 } else { 0.0 })
            .collect();
        let device = values.device();
        let mask = Tensor::<B, 1>::from_floats(mask.as_slice(), &device)
            .reshape([self.present.len(), 1])
            .cast(values.dtype());
        values * mask
    }
}

/// Hooks that change nothing: the base model.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl<B: Backend> LayerHooks<B> for NoHooks {}

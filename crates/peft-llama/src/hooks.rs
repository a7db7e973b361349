//! Insertion points where parameter-efficient adapters plug into a decoder layer.
//!
//! The model code calls these hooks at fixed places in every decoder layer, so adapters in
//! `peft-core` change the computation without copying the model:
//!
//! | hook | where | used by |
//! | --- | --- | --- |
//! | [`LayerHooks::adapt_projection`] | after each of the seven linear projections | LoRA |
//! | [`LayerHooks::prefix_key_values`] | keys/values joined with the real tokens' in one softmax | prefix tuning |
//! | [`LayerHooks::attention_branch`] | a separately normalised branch added to the attention output before `o_proj` | LLaMA-Adapter |

use std::fmt;

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// The linear projections of a LLaMA decoder layer, named as in Hugging Face's implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Projection {
    /// `self_attn.q_proj`
    #[serde(rename = "q_proj")]
    Query,
    /// `self_attn.k_proj`
    #[serde(rename = "k_proj")]
    Key,
    /// `self_attn.v_proj`
    #[serde(rename = "v_proj")]
    Value,
    /// `self_attn.o_proj`
    #[serde(rename = "o_proj")]
    Output,
    /// `mlp.gate_proj`
    #[serde(rename = "gate_proj")]
    Gate,
    /// `mlp.up_proj`
    #[serde(rename = "up_proj")]
    Up,
    /// `mlp.down_proj`
    #[serde(rename = "down_proj")]
    Down,
}

impl Projection {
    /// All projections, in the order they run.
    pub const ALL: [Projection; 7] = [
        Projection::Query,
        Projection::Key,
        Projection::Value,
        Projection::Output,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The Hugging Face module name (`q_proj`, ..., `down_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Projection::Query => "q_proj",
            Projection::Key => "k_proj",
            Projection::Value => "v_proj",
            Projection::Output => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The Hugging Face parent module (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Projection::Query | Projection::Key | Projection::Value | Projection::Output => {
                "self_attn"
            }
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    /// Parses a Hugging Face module name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.hf_name() == name)
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// Callbacks the decoder layers make; every method defaults to "no change".
///
/// Layer indices count from 0 at the bottom of the stack.
pub trait LayerHooks<B: Backend> {
    /// Adapts a projection's output. `input` is `[batch, seq, in]`, `output` is
    /// `[batch, seq, out]` as computed by the frozen weight; returns `[batch, seq, out]`.
    fn adapt_projection(
        &self,
        layer: usize,
        projection: Projection,
        input: &Tensor<B, 3>,
        output: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let _ = (layer, projection, input);
        output
    }

    /// Number of virtual tokens whose keys/values [`LayerHooks::prefix_key_values`] returns
    /// (the same in every layer). Real tokens then take positions `P..P+T-1`.
    fn num_prefix_tokens(&self) -> usize {
        0
    }

    /// Keys and values joined in front of the real tokens' in the layer's softmax, each
    /// `[batch, kv_heads, P, head_dim]`, already in the attention's key space (no rotary).
    fn prefix_key_values(
        &self,
        layer: usize,
        batch: usize,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let _ = (layer, batch);
        None
    }

    /// A separately normalised attention branch, added to the per-head attention output
    /// before `o_proj`. `queries` are the rotated queries `[batch, heads, seq, head_dim]`;
    /// returns `[batch, heads, seq, head_dim]`.
    fn attention_branch(&self, layer: usize, queries: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
        let _ = (layer, queries);
        None
    }

    /// The lowest layer any hook changes, if any. Layers below it run exactly as the base
    /// model, and their activations need no gradient graph.
    fn first_adapted_layer(&self) -> Option<usize> {
        None
    }
}

/// Hooks that change nothing: the base model.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl<B: Backend> LayerHooks<B> for NoHooks {}

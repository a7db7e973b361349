//! The CLIP vision tower as a model `peft-core`'s adapters attach to: its sizes, its linear
//! sites under `transformers`' module paths (`encoder.layers.{i}.self_attn.q_proj`), and its
//! attention's key/value projections; and its forward pass through a [`PeftModel`].
//!
//! An encoder is not a decoder: every token sees every token, there is no rotary encoding, and
//! projections have biases. LoRA, prefix tuning and adaption prompts attach through the same code
//! as on LLaMA: prefix keys/values join the tokens' in one softmax, adaption prompts are keyed and
//! valued by the frozen projections (biases included) and added as a gated branch.

use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Tensor};
use peft_core::{AdaptableModel, Adapter, InsertionPoint, LinearSite, ModelGeometry, PeftModel};

use crate::clip::{sites, ClipVisionModel, ClipVisionOutput};
use crate::config::ClipVisionConfig;
use crate::error::Result;

/// The module path of the encoder layers in `transformers`' `CLIPVisionModel`.
pub const LAYERS_PATH: &str = "encoder.layers";

impl ClipVisionConfig {
    /// The sizes adapters are shaped by (one key/value head per head).
    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_hidden_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_attention_heads,
            head_dim: self.hidden_size / self.num_attention_heads,
            intermediate_size: self.intermediate_size,
        }
    }

    /// The linear sites of a tower of this configuration, in the order the forward pass runs
    /// them.
    pub fn linear_sites(&self) -> Vec<LinearSite> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let per_layer = [
            (sites::Q_PROJ, d, d),
            (sites::K_PROJ, d, d),
            (sites::V_PROJ, d, d),
            (sites::OUT_PROJ, d, d),
            (sites::FC1, d, f),
            (sites::FC2, f, d),
        ];
        (0..self.num_hidden_layers)
            .flat_map(|layer| {
                per_layer.iter().map(move |&(name, input, output)| {
                    LinearSite::in_layer(LAYERS_PATH, layer, name, input, output)
                })
            })
            .collect()
    }
}

impl<B: Backend> AdaptableModel<B> for ClipVisionModel<B> {
    fn geometry(&self) -> ModelGeometry {
        self.config.geometry()
    }

    fn linear_sites(&self) -> Vec<LinearSite> {
        self.config.linear_sites()
    }

    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear<B>> {
        let rest = path.strip_prefix(LAYERS_PATH)?.strip_prefix('.')?;
        let (index, name) = rest.split_once('.')?;
        let layer = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        Some(match name {
            sites::Q_PROJ => &mut layer.self_attn.q_proj,
            sites::K_PROJ => &mut layer.self_attn.k_proj,
            sites::V_PROJ => &mut layer.self_attn.v_proj,
            sites::OUT_PROJ => &mut layer.self_attn.out_proj,
            sites::FC1 => &mut layer.mlp.fc1,
            sites::FC2 => &mut layer.mlp.fc2,
            _ => return None,
        })
    }

    fn insertion_points(&self) -> &'static [InsertionPoint] {
        &[
            InsertionPoint::Linear,
            InsertionPoint::PrefixKeyValues,
            InsertionPoint::AttentionBranch,
        ]
    }

    fn dtype(&self) -> DType {
        self.position_embedding.val().dtype()
    }

    fn attention_path(&self, layer: usize) -> String {
        format!("{LAYERS_PATH}.{layer}.self_attn")
    }

    fn project_key_values(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        Some(self.layers.get(layer)?.self_attn.project_key_values(x))
    }

    fn name_or_path(&self) -> Option<String> {
        self.name_or_path.clone()
    }

    fn task_type(&self) -> Option<&'static str> {
        Some("FEATURE_EXTRACTION")
    }
}

/// What a [`PeftModel`] over the CLIP tower adds: its forward pass with the active adapter.
pub trait PeftClip<B: Backend> {
    /// `last_hidden_state` and `pooler_output` of `pixels` `[batch, channels, image, image]`
    /// with the active adapter.
    ///
    /// # Errors
    /// Pixels of the wrong size.
    fn forward(&self, pixels: Tensor<B, 4>) -> Result<ClipVisionOutput<B>>;
}

impl<B: Backend, A: Adapter<B>> PeftClip<B> for PeftModel<B, ClipVisionModel<B>, A> {
    fn forward(&self, pixels: Tensor<B, 4>) -> Result<ClipVisionOutput<B>> {
        self.base().forward(pixels, self.hooks().as_ref())
    }
}

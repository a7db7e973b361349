//! A stand-in model for the unit tests of this crate: the sizes and sites of a small
//! LLaMA-shaped decoder, key/value projections that are plain products with fixed weights.

use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, DType, Tensor};

use crate::model::{AdaptableModel, InsertionPoint, LinearSite, ModelGeometry};

/// Sizes and linear sites of a decoder, with one key and one value projection per layer.
pub(crate) struct SizedModel<B: Backend> {
    pub geometry: ModelGeometry,
    /// Each layer's key and value projections; `None` for a layer that gives none.
    pub key_values: Vec<Option<(Linear<B>, Linear<B>)>>,
}

impl<B: Backend> SizedModel<B> {
    /// `layers` layers of width `hidden` with `heads` heads, `kv_heads` key/value heads of
    /// width `head_dim`, and a feed-forward width of `intermediate`.
    pub fn new(
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Self {
        let geometry = ModelGeometry {
            num_hidden_layers: layers,
            hidden_size: hidden,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            intermediate_size: intermediate,
        };
        let linear = || LinearConfig::new(hidden, kv_heads * head_dim).init(device);
        Self {
            geometry,
            key_values: (0..layers).map(|_| Some((linear(), linear()))).collect(),
        }
    }
}

impl<B: Backend> AdaptableModel<B> for SizedModel<B> {
    fn geometry(&self) -> ModelGeometry {
        self.geometry
    }

    fn linear_sites(&self) -> Vec<LinearSite> {
        let g = self.geometry;
        let (d, q, kv, f) = (
            g.hidden_size,
            g.query_width(),
            g.kv_width(),
            g.intermediate_size,
        );
        let mut sites = Vec::new();
        for layer in 0..g.num_hidden_layers {
            for (name, input, output) in [
                ("self_attn.q_proj", d, q),
                ("self_attn.k_proj", d, kv),
                ("self_attn.v_proj", d, kv),
                ("self_attn.o_proj", q, d),
                ("mlp.gate_proj", d, f),
                ("mlp.up_proj", d, f),
                ("mlp.down_proj", f, d),
            ] {
                sites.push(LinearSite::in_layer(
                    "model.layers",
                    layer,
                    name,
                    input,
                    output,
                ));
            }
        }
        sites
    }

    fn linear_mut(&mut self, _path: &str) -> Option<&mut Linear<B>> {
        None
    }

    fn insertion_points(&self) -> &'static [InsertionPoint] {
        &[
            InsertionPoint::Linear,
            InsertionPoint::PrefixKeyValues,
            InsertionPoint::AttentionBranch,
        ]
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn attention_path(&self, layer: usize) -> String {
        format!("model.layers.{layer}.self_attn")
    }

    fn project_key_values(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let (k, v) = self.key_values.get(layer)?.as_ref()?;
        let heads = |t: Tensor<B, 3>| {
            let [batch, seq, _] = t.dims();
            t.reshape([
                batch,
                seq,
                self.geometry.num_key_value_heads,
                self.geometry.head_dim,
            ])
            .swap_dims(1, 2)
        };
        Some((heads(k.forward(x.clone())), heads(v.forward(x))))
    }
}

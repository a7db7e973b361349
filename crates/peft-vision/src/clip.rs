//! The CLIP vision transformer (Radford et al. 2021) as Hugging Face's `CLIPVisionModel`:
//! patch embedding, class token, learned position embeddings, `pre_layrnorm`, pre-norm encoder
//! layers (attention, then a quick-GELU MLP) and `post_layernorm` on the class token.
//!
//! The patch embedding is a stride-`P` convolution with a `P × P` kernel, which equals a matrix
//! product of every non-overlapping patch, flattened `(channel, row, column)`, with the kernel
//! flattened the same way; that is how it runs here.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::activation::{gelu, sigmoid, softmax};
use burn::tensor::{backend::Backend, Tensor};
use peft_core::{LayerHooks, NoHooks, Site};

use crate::config::{ClipVisionConfig, HiddenAct};
use crate::error::{Result, VisionError};

/// The names of an encoder layer's linear sites, as Hugging Face's `CLIPEncoderLayer` names its
/// modules: what the forward pass passes to [`LayerHooks::adapt_linear`] and what
/// [`peft_core::AdaptableModel::linear_sites`] lists.
pub mod sites {
    /// The query projection.
    pub const Q_PROJ: &str = "self_attn.q_proj";
    /// The key projection.
    pub const K_PROJ: &str = "self_attn.k_proj";
    /// The value projection.
    pub const V_PROJ: &str = "self_attn.v_proj";
    /// The attention's output projection.
    pub const OUT_PROJ: &str = "self_attn.out_proj";
    /// The MLP's first layer.
    pub const FC1: &str = "mlp.fc1";
    /// The MLP's second layer.
    pub const FC2: &str = "mlp.fc2";
}

/// What [`ClipVisionModel::forward`] returns, as `transformers`' `CLIPVisionModel` names it.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput<B: Backend> {
    /// The last encoder layer's output, `[batch, 1 + patches, hidden]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `post_layernorm` of its class token, `[batch, hidden]`.
    pub pooler_output: Tensor<B, 2>,
}

/// Multi-head self-attention of an encoder layer (no mask: every token sees every token).
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// `q_proj`, `[hidden, hidden]` with bias.
    pub q_proj: Linear<B>,
    /// `k_proj`.
    pub k_proj: Linear<B>,
    /// `v_proj`.
    pub v_proj: Linear<B>,
    /// `out_proj`.
    pub out_proj: Linear<B>,
    /// Number of heads.
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    fn split_heads(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [batch, seq, width] = x.dims();
        x.reshape([batch, seq, heads, width / heads])
            .swap_dims(1, 2)
    }

    /// `x` `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(0, x, &NoHooks)
    }

    /// The keys and values of `x` `[batch, tokens, hidden]` by the frozen projections (biases
    /// included), `[batch, heads, tokens, head_dim]` each.
    pub fn project_key_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            Self::split_heads(self.k_proj.forward(x.clone()), self.num_heads),
            Self::split_heads(self.v_proj.forward(x), self.num_heads),
        )
    }

    /// The attention of layer `layer`, calling `hooks` after each projection, for prefix keys
    /// and values joined in front of the tokens' own, and for a gated attention branch added
    /// before the output projection.
    pub fn forward_with(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        hooks: &dyn LayerHooks<B>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let project = |linear: &Linear<B>, name: &str| {
            hooks.adapt_linear(Site::in_layer(layer, name), &x, linear.forward(x.clone()))
        };
        let queries = Self::split_heads(project(&self.q_proj, sites::Q_PROJ), self.num_heads);
        let mut keys = Self::split_heads(project(&self.k_proj, sites::K_PROJ), self.num_heads);
        let mut values = Self::split_heads(project(&self.v_proj, sites::V_PROJ), self.num_heads);
        if let Some((prefix_keys, prefix_values)) = hooks.prefix_key_values(layer, batch) {
            keys = Tensor::cat(vec![prefix_keys, keys], 2);
            values = Tensor::cat(vec![prefix_values, values], 2);
        }
        let head_dim = queries.dims()[3];
        let scores = queries.clone().matmul(keys.swap_dims(2, 3)) / (head_dim as f64).sqrt();
        let mut context = softmax(scores, 3).matmul(values);
        if let Some(branch) = hooks.attention_branch(layer, &queries) {
            context = context + branch;
        }
        let width = self.num_heads * head_dim;
        let merged = context.swap_dims(1, 2).reshape([batch, seq, width]);
        let output = self.out_proj.forward(merged.clone());
        hooks.adapt_linear(Site::in_layer(layer, sites::OUT_PROJ), &merged, output)
    }
}

/// The MLP of an encoder layer: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// `fc1`, `[hidden, intermediate]`.
    pub fc1: Linear<B>,
    /// `fc2`, `[intermediate, hidden]`.
    pub fc2: Linear<B>,
    /// Activation.
    #[module(skip)]
    pub act: HiddenAct,
}

impl<B: Backend> ClipMlp<B> {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(0, x, &NoHooks)
    }

    /// The MLP of layer `layer`, calling `hooks` after `fc1` and `fc2`.
    pub fn forward_with(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        hooks: &dyn LayerHooks<B>,
    ) -> Tensor<B, 3> {
        let hidden = self.fc1.forward(x.clone());
        let hidden = hooks.adapt_linear(Site::in_layer(layer, sites::FC1), &x, hidden);
        let hidden = match self.act {
            HiddenAct::QuickGelu => hidden.clone() * sigmoid(hidden * 1.702),
            HiddenAct::Gelu => gelu(hidden),
        };
        let output = self.fc2.forward(hidden.clone());
        hooks.adapt_linear(Site::in_layer(layer, sites::FC2), &hidden, output)
    }
}

/// A pre-norm encoder layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// `layer_norm1`.
    pub layer_norm1: LayerNorm<B>,
    /// `self_attn`.
    pub self_attn: ClipAttention<B>,
    /// `layer_norm2`.
    pub layer_norm2: LayerNorm<B>,
    /// `mlp`.
    pub mlp: ClipMlp<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(0, x, &NoHooks)
    }

    /// Layer `layer`, calling `hooks` in its attention and MLP.
    pub fn forward_with(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        hooks: &dyn LayerHooks<B>,
    ) -> Tensor<B, 3> {
        let attended =
            self.self_attn
                .forward_with(layer, self.layer_norm1.forward(x.clone()), hooks);
        let x = x + attended;
        let fed = self
            .mlp
            .forward_with(layer, self.layer_norm2.forward(x.clone()), hooks);
        x + fed
    }
}

/// The CLIP vision tower. Frozen: built by [`crate::ClipVisionLoader`] with every parameter
/// marked as not requiring gradients.
#[derive(Module, Debug)]
pub struct ClipVisionModel<B: Backend> {
    /// The patch convolution's kernel flattened to `[channels · patch², hidden]`.
    pub patch_embedding: Param<Tensor<B, 2>>,
    /// `class_embedding` `[hidden]`.
    pub class_embedding: Param<Tensor<B, 1>>,
    /// `position_embedding` `[1 + patches, hidden]`.
    pub position_embedding: Param<Tensor<B, 2>>,
    /// `pre_layrnorm` (sic, Hugging Face's name).
    pub pre_layrnorm: LayerNorm<B>,
    /// Encoder layers, bottom first.
    pub layers: Vec<ClipEncoderLayer<B>>,
    /// `post_layernorm`, applied to the last class token only.
    pub post_layernorm: LayerNorm<B>,
    /// The configuration.
    #[module(skip)]
    pub config: ClipVisionConfig,
    /// The checkpoint it was loaded from, for `base_model_name_or_path` in adapter files.
    #[module(skip)]
    pub name_or_path: Option<String>,
}

impl<B: Backend> ClipVisionModel<B> {
    fn check_pixels(&self, pixels: &Tensor<B, 4>) -> Result<()> {
        let [batch, channels, height, width] = pixels.dims();
        let side = self.config.image_size;
        if [channels, height, width] != [self.config.num_channels, side, side] || batch == 0 {
            return Err(VisionError::Shape {
                what: "pixel values".into(),
                expected: vec![batch.max(1), self.config.num_channels, side, side],
                found: vec![batch, channels, height, width],
            });
        }
        Ok(())
    }

    /// The encoder's input: class token and patch embeddings plus position embeddings, after
    /// `pre_layrnorm`. `pixels` `[batch, channels, image, image]` → `[batch, 1 + patches, hidden]`.
    ///
    /// # Errors
    /// [`VisionError::Shape`] if `pixels` does not have the configured size.
    pub fn embed(&self, pixels: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
        self.check_pixels(&pixels)?;
        let config = &self.config;
        let [batch, channels, _, _] = pixels.dims();
        let (grid, patch, hidden) = (config.grid(), config.patch_size, config.hidden_size);
        // [B, C, G·P, G·P] → [B, C, G, P, G, P] → [B, G, G, C, P, P]: patches row by row, each
        // flattened (channel, row, column) like the convolution kernel.
        let patches = pixels
            .reshape([batch, channels, grid, patch, grid, patch])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([batch, grid * grid, config.patch_values()]);
        let patch_embeds = patches.matmul(self.patch_embedding.val().unsqueeze::<3>());
        let class = self
            .class_embedding
            .val()
            .reshape([1, 1, hidden])
            .expand([batch, 1, hidden]);
        let embeddings = Tensor::cat(vec![class, patch_embeds], 1)
            + self.position_embedding.val().unsqueeze::<3>();
        Ok(self.pre_layrnorm.forward(embeddings))
    }

    /// Every hidden state as `transformers`' `output_hidden_states` gives them: entry 0 is
    /// [`ClipVisionModel::embed`]'s output, entry `i` the output of encoder layer `i`
    /// (`num_hidden_layers + 1` entries of `[batch, 1 + patches, hidden]`).
    ///
    /// # Errors
    /// [`VisionError::Shape`] if `pixels` does not have the configured size.
    pub fn hidden_states(&self, pixels: Tensor<B, 4>) -> Result<Vec<Tensor<B, 3>>> {
        self.hidden_states_with(pixels, &NoHooks)
    }

    /// [`ClipVisionModel::hidden_states`] with an adapter's hooks. The layers below the first
    /// one the hooks change run as the base model's, and keep no gradient graph.
    ///
    /// # Errors
    /// [`VisionError::Shape`] if `pixels` does not have the configured size.
    pub fn hidden_states_with(
        &self,
        pixels: Tensor<B, 4>,
        hooks: &dyn LayerHooks<B>,
    ) -> Result<Vec<Tensor<B, 3>>> {
        self.hidden_states_up_to(pixels, self.config.num_hidden_layers, hooks)
    }

    fn hidden_states_up_to(
        &self,
        pixels: Tensor<B, 4>,
        last: usize,
        hooks: &dyn LayerHooks<B>,
    ) -> Result<Vec<Tensor<B, 3>>> {
        let first_adapted = hooks.first_adapted_layer().unwrap_or(0);
        let mut states = vec![self.embed(pixels)?];
        for (index, layer) in self.layers[..last].iter().enumerate() {
            let mut input = states[states.len() - 1].clone();
            if index == first_adapted && index > 0 {
                input = input.detach();
            }
            states.push(layer.forward_with(index, input, hooks));
        }
        Ok(states)
    }

    /// `last_hidden_state` and `pooler_output` with an adapter's hooks, as `transformers`'
    /// `CLIPVisionModel` returns them (with [`NoHooks`]: the base model).
    ///
    /// # Errors
    /// [`VisionError::Shape`] if `pixels` does not have the configured size.
    pub fn forward(
        &self,
        pixels: Tensor<B, 4>,
        hooks: &dyn LayerHooks<B>,
    ) -> Result<ClipVisionOutput<B>> {
        let mut states = self.hidden_states_with(pixels, hooks)?;
        let last_hidden_state = states.pop().expect("embeddings are always a hidden state");
        let [batch, _, hidden] = last_hidden_state.dims();
        let class = last_hidden_state
            .clone()
            .narrow(1, 0, 1)
            .reshape([batch, hidden]);
        Ok(ClipVisionOutput {
            pooler_output: self.post_layernorm.forward(class),
            last_hidden_state,
        })
    }

    /// The class token of chosen hidden states, concatenated: the multi-scale global feature
    /// of LLaMA-Adapter (paper eq. 9, before the projection). `layers` index the hidden states
    /// as [`ClipVisionModel::hidden_states`] does (0 = embeddings, `i` = after layer `i`); only
    /// the layers up to the highest one asked for run.
    /// `pixels` `[batch, channels, image, image]` → `[batch, layers.len() · hidden]`.
    ///
    /// # Errors
    /// An empty or out-of-range layer list, or pixels of the wrong size.
    pub fn class_token_features(
        &self,
        pixels: Tensor<B, 4>,
        layers: &[usize],
    ) -> Result<Tensor<B, 2>> {
        let last = check_feature_layers(layers, self.config.num_hidden_layers)?;
        let states = self.hidden_states_up_to(pixels, last, &NoHooks)?;
        let [batch, _, hidden] = states[0].dims();
        let tokens = layers
            .iter()
            .map(|&i| states[i].clone().narrow(1, 0, 1).reshape([batch, hidden]))
            .collect();
        Ok(Tensor::cat(tokens, 1))
    }

    /// `pooler_output`: `post_layernorm` of the last layer's class token, `[batch, hidden]`.
    ///
    /// # Errors
    /// [`VisionError::Shape`] if `pixels` does not have the configured size.
    pub fn pooled_output(&self, pixels: Tensor<B, 4>) -> Result<Tensor<B, 2>> {
        Ok(self.forward(pixels, &NoHooks)?.pooler_output)
    }
}

/// Checks a list of hidden-state indices for a tower of `num_layers` layers and returns the
/// highest.
///
/// # Errors
/// [`VisionError::Config`] for an empty list or an index above `num_layers`.
pub fn check_feature_layers(layers: &[usize], num_layers: usize) -> Result<usize> {
    let bad = |message: String| VisionError::Config {
        origin: "feature layers".into(),
        message,
    };
    let last = *layers
        .iter()
        .max()
        .ok_or_else(|| bad("at least one layer is needed".into()))?;
    if last > num_layers {
        return Err(bad(format!(
            "layer {last} asked for, the vision tower has hidden states 0..={num_layers}"
        )));
    }
    Ok(last)
}

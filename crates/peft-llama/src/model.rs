//! The LLaMA decoder: RMSNorm, grouped-query attention with RoPE, SwiGLU, and the causal-LM head.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use peft_core::{LayerHooks, Site};
use peft_ops::quant::{FrozenLinear, QuantFormat};
use peft_ops::tensor::{cast_to, linear_rows, mask_value, matmul, repeat_kv};

use crate::cache::KvCache;
use crate::config::LlamaConfig;
use crate::error::{LlamaError, Result};
use crate::rope::{apply_rotary, RotaryEmbedding};
pub use crate::tokens::TokenBatch;

/// The names of a decoder layer's linear sites, as Hugging Face names the modules inside a
/// layer: what the forward pass passes to [`LayerHooks::adapt_linear`] and what
/// [`crate::adaptable`] lists and looks up.
pub mod sites {
    /// `self_attn.q_proj`
    pub const Q_PROJ: &str = "self_attn.q_proj";
    /// `self_attn.k_proj`
    pub const K_PROJ: &str = "self_attn.k_proj";
    /// `self_attn.v_proj`
    pub const V_PROJ: &str = "self_attn.v_proj";
    /// `self_attn.o_proj`
    pub const O_PROJ: &str = "self_attn.o_proj";
    /// `mlp.gate_proj`
    pub const GATE_PROJ: &str = "mlp.gate_proj";
    /// `mlp.up_proj`
    pub const UP_PROJ: &str = "mlp.up_proj";
    /// `mlp.down_proj`
    pub const DOWN_PROJ: &str = "mlp.down_proj";
}

/// Root-mean-square layer normalisation, computed in at least f32 whatever the weights' dtype.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Scale `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Normalises `x` `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        peft_ops::blocks::rms_norm(x, self.weight.val(), self.eps)
    }

    /// Normalises each head of `x` `[batch, heads, seq, head_dim]` over `head_dim` (Qwen3's
    /// q/k norms).
    pub fn forward_heads(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, heads, seq, dim] = x.dims();
        self.forward(x.reshape([batch, heads * seq, dim]))
            .reshape([batch, heads, seq, dim])
    }
}

fn norm_heads<B: Backend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match norm {
        Some(norm) => norm.forward_heads(x),
        None => x,
    }
}

/// Multi-head (or grouped-query) self-attention with rotary embeddings.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, heads · head_dim]`
    pub q_proj: FrozenLinear<B>,
    /// `[hidden, kv_heads · head_dim]`
    pub k_proj: FrozenLinear<B>,
    /// `[hidden, kv_heads · head_dim]`
    pub v_proj: FrozenLinear<B>,
    /// `[heads · head_dim, hidden]`
    pub o_proj: FrozenLinear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// RMSNorm over each query head before RoPE (Qwen3).
    pub q_norm: Option<RmsNorm<B>>,
    /// RMSNorm over each key head before RoPE (Qwen3).
    pub k_norm: Option<RmsNorm<B>>,
    /// Whether this layer attends through the sliding window (see [`LayerContext::window_bias`]).
    #[module(skip)]
    pub sliding: bool,
}

/// Everything a layer needs besides its input that is the same for all layers of one call.
pub struct LayerContext<B: Backend> {
    /// `[batch, 1, seq, head_dim]`
    pub cos: Tensor<B, 4>,
    /// `[batch, 1, seq, head_dim]`
    pub sin: Tensor<B, 4>,
    /// `[batch, 1, seq, prefix + past + seq]` in f32, or `[1, ...]` when every row has the same
    /// mask: `-inf` where attention is not allowed, 0 elsewhere; added to the scaled attention
    /// scores. `None` when nothing is masked.
    pub bias: Option<Tensor<B, 4>>,
    /// The same for the sliding-window layers, which also mask keys `window` or more positions
    /// before the query; `None` when the model has no such layer.
    pub window_bias: Option<Tensor<B, 4>>,
}

impl<B: Backend> Attention<B> {
    /// Splits `[batch, seq, heads · dim]` into `[batch, heads, seq, dim]`.
    pub fn split_heads(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [batch, seq, width] = x.dims();
        x.reshape([batch, seq, heads, width / heads])
            .swap_dims(1, 2)
    }

    /// Projects `x` `[batch, seq, hidden]` to keys and values `[batch, kv_heads, seq, head_dim]`
    /// without rotary encoding and without hooks (adaption prompts use this). Keys pass through
    /// the key norm where the layer has one (Qwen3), so that they live where the layer's own
    /// keys do.
    pub fn project_key_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let keys = Self::split_heads(self.k_proj.forward(x.clone()), self.num_kv_heads);
        let keys = norm_heads(&self.k_norm, keys);
        let values = Self::split_heads(self.v_proj.forward(x), self.num_kv_heads);
        (keys, values)
    }

    /// Attention for `x` `[batch, seq, hidden]`; returns `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        context: &LayerContext<B>,
        hooks: &dyn LayerHooks<B>,
        cache: Option<&mut crate::cache::LayerKv<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let project = |linear: &FrozenLinear<B>, name| {
            hooks.adapt_linear(Site::in_layer(layer, name), &x, linear.forward(x.clone()))
        };
        let queries = Self::split_heads(project(&self.q_proj, sites::Q_PROJ), self.num_heads);
        let keys = Self::split_heads(project(&self.k_proj, sites::K_PROJ), self.num_kv_heads);
        let values = Self::split_heads(project(&self.v_proj, sites::V_PROJ), self.num_kv_heads);
        let queries = norm_heads(&self.q_norm, queries);
        let keys = norm_heads(&self.k_norm, keys);
        let queries = apply_rotary(queries, &context.cos, &context.sin);
        let mut keys = apply_rotary(keys, &context.cos, &context.sin);
        let mut values = values;
        if let Some((cached_keys, cached_values)) = cache {
            if let (Some(past_k), Some(past_v)) = (cached_keys.take(), cached_values.take()) {
                keys = Tensor::cat(vec![past_k, keys], 2);
                values = Tensor::cat(vec![past_v, values], 2);
            }
            *cached_keys = Some(keys.clone());
            *cached_values = Some(values.clone());
        }
        if let Some((prefix_keys, prefix_values)) = hooks.prefix_key_values(layer, batch) {
            keys = Tensor::cat(vec![prefix_keys, keys], 2);
            values = Tensor::cat(vec![prefix_values, values], 2);
        }
        let n_rep = self.num_heads / self.num_kv_heads;
        let keys = repeat_kv(keys, n_rep);
        let values = repeat_kv(values, n_rep);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let bias = if self.sliding {
            &context.window_bias
        } else {
            &context.bias
        };
        let mut output =
            peft_ops::blocks::attention(queries.clone(), keys, values, scale, bias.clone());
        if let Some(branch) = hooks.attention_branch(layer, &queries) {
            output = output + branch;
        }
        let output = output
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        hooks.adapt_linear(
            Site::in_layer(layer, sites::O_PROJ),
            &output,
            self.o_proj.forward(output.clone()),
        )
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, intermediate]`
    pub gate_proj: FrozenLinear<B>,
    /// `[hidden, intermediate]`
    pub up_proj: FrozenLinear<B>,
    /// `[intermediate, hidden]`
    pub down_proj: FrozenLinear<B>,
}

impl<B: Backend> Mlp<B> {
    /// `x` `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        hooks: &dyn LayerHooks<B>,
    ) -> Tensor<B, 3> {
        let gate = hooks.adapt_linear(
            Site::in_layer(layer, sites::GATE_PROJ),
            &x,
            self.gate_proj.forward(x.clone()),
        );
        let up = hooks.adapt_linear(
            Site::in_layer(layer, sites::UP_PROJ),
            &x,
            self.up_proj.forward(x.clone()),
        );
        let hidden = peft_ops::blocks::swiglu(gate, up);
        hooks.adapt_linear(
            Site::in_layer(layer, sites::DOWN_PROJ),
            &hidden,
            self.down_proj.forward(hidden.clone()),
        )
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention block.
    pub self_attn: Attention<B>,
    /// Feed-forward block.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// `x` `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        layer: usize,
        x: Tensor<B, 3>,
        context: &LayerContext<B>,
        hooks: &dyn LayerHooks<B>,
        cache: Option<&mut crate::cache::LayerKv<B>>,
    ) -> Tensor<B, 3> {
        let attended = self.self_attn.forward(
            layer,
            self.input_layernorm.forward(x.clone()),
            context,
            hooks,
            cache,
        );
        let x = x + attended;
        let fed = self.mlp.forward(
            layer,
            self.post_attention_layernorm.forward(x.clone()),
            hooks,
        );
        x + fed
    }
}

/// A LLaMA causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// Decoder layers, bottom first.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Output head `[hidden, vocab]`; `None` when tied to the embeddings.
    pub lm_head: Option<Linear<B>>,
    /// Architecture.
    #[module(skip)]
    pub config: LlamaConfig,
    /// RoPE frequencies.
    #[module(skip)]
    pub rope: RotaryEmbedding,
    /// The checkpoint it was loaded from (`None` for a model built in memory), written as
    /// `base_model_name_or_path` into adapter files.
    #[module(skip)]
    pub name_or_path: Option<String>,
}

impl<B: Backend> Llama<B> {
    /// The model's device.
    pub fn device(&self) -> B::Device {
        self.embed_tokens.val().device()
    }

    /// The floating-point type of the frozen weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.val().dtype()
    }

    /// Every decoder projection, in layer order (q, k, v, o, gate, up, down).
    pub fn projections(&self) -> impl Iterator<Item = &FrozenLinear<B>> {
        self.layers.iter().flat_map(|layer| {
            let (attention, mlp) = (&layer.self_attn, &layer.mlp);
            [
                &attention.q_proj,
                &attention.k_proj,
                &attention.v_proj,
                &attention.o_proj,
                &mlp.gate_proj,
                &mlp.up_proj,
                &mlp.down_proj,
            ]
        })
    }

    /// Quantizes every decoder projection to `format` (QLoRA's frozen base); embeddings, norms
    /// and the output head stay dense. Projections already in `format` (from a GGUF file) are
    /// kept as they are.
    ///
    /// # Errors
    /// A projection the format cannot hold (Q8_0 needs widths that are multiples of 32), or one
    /// already quantized to another format. The model is consumed either way.
    pub fn quantize(self, format: QuantFormat) -> Result<Self> {
        self.try_map_projections(|linear| Ok(linear.quantize(format)?))
    }

    /// The model with every quantized projection replaced by a dense one holding its
    /// dequantized values (in the model's dtype): what a LoRA can be merged into, and the dense
    /// twin a quantized model is compared with.
    pub fn dequantize(self) -> Self {
        let (device, dtype) = (self.device(), self.dtype());
        self.try_map_projections(|linear| Ok(FrozenLinear::Dense(linear.to_dense(&device, dtype))))
            .unwrap_or_else(|e| unreachable!("dequantizing cannot fail: {e}"))
    }

    /// The model with `f` applied to every decoder projection, layer by layer.
    fn try_map_projections(
        mut self,
        mut f: impl FnMut(FrozenLinear<B>) -> Result<FrozenLinear<B>>,
    ) -> Result<Self> {
        self.layers = self
            .layers
            .into_iter()
            .map(|layer| -> Result<DecoderLayer<B>> {
                let (attention, mlp) = (layer.self_attn, layer.mlp);
                Ok(DecoderLayer {
                    self_attn: Attention {
                        q_proj: f(attention.q_proj)?,
                        k_proj: f(attention.k_proj)?,
                        v_proj: f(attention.v_proj)?,
                        o_proj: f(attention.o_proj)?,
                        ..attention
                    },
                    mlp: Mlp {
                        gate_proj: f(mlp.gate_proj)?,
                        up_proj: f(mlp.up_proj)?,
                        down_proj: f(mlp.down_proj)?,
                    },
                    ..layer
                })
            })
            .collect::<Result<_>>()?;
        Ok(self)
    }

    /// Bytes the decoder projections' weights take (quantized: blocks and scales; dense: values
    /// in their dtype).
    pub fn projection_bytes(&self) -> usize {
        self.projections()
            .map(|p| match p {
                FrozenLinear::Dense(linear) => {
                    linear.weight.val().shape().num_elements() * self.dtype().size()
                }
                FrozenLinear::Quantized(linear) => linear.weight.0.storage_bytes(),
            })
            .sum()
    }

    /// The format of the quantized projections: `None` when every projection is dense, the
    /// format when all are quantized to one, and the first when they differ (a GGUF file may
    /// mix block types).
    pub fn quant_format(&self) -> Option<QuantFormat> {
        self.projections().find_map(FrozenLinear::quant_format)
    }

    /// Positions, RoPE tables and the attention mask for `tokens` following `cache`.
    fn context(
        &self,
        tokens: &TokenBatch,
        cache: Option<&KvCache<B>>,
        prefix: usize,
    ) -> LayerContext<B> {
        let device = self.device();
        let (batch, seq) = (tokens.batch, tokens.seq);
        let past = cache.map_or(0, KvCache::len);
        let mut positions = Vec::with_capacity(batch * seq);
        for row in 0..batch {
            // Real tokens take consecutive positions after the row's earlier real tokens; prefix
            // tuning's virtual tokens occupy the first `prefix` positions.
            let mut next = prefix + cache.map_or(0, |c| c.next_position(row));
            for column in 0..seq {
                if tokens.is_real(row, column) {
                    positions.push(next);
                    next += 1;
                } else {
                    // A padding token's position only affects its own (ignored) output; use its
                    // column, as Hugging Face does without explicit position ids.
                    positions.push(prefix + past + column);
                }
            }
        }
        let (cos, sin) = self.rope.tables(&positions, batch, seq, &device);
        let dtype = self.dtype();
        let (cos, sin) = (cast_to(cos, dtype), cast_to(sin, dtype));
        let bias = self.attention_bias(tokens, cache, prefix, None);
        let window_bias = self
            .config
            .sliding_window
            .filter(|_| !self.config.sliding_window_layers.is_empty())
            .and_then(|window| self.attention_bias(tokens, cache, prefix, Some(window)));
        LayerContext {
            cos,
            sin,
            bias,
            window_bias,
        }
    }

    /// The additive attention mask `[rows, 1, seq, prefix + past + seq]` in f32 (see
    /// [`LayerContext::bias`]), `None` when nothing is masked. With a `window`, a query also
    /// loses the keys `window` or more positions before it, counted as `transformers` counts
    /// them: over the whole key sequence, virtual prefix tokens first.
    fn attention_bias(
        &self,
        tokens: &TokenBatch,
        cache: Option<&KvCache<B>>,
        prefix: usize,
        window: Option<usize>,
    ) -> Option<Tensor<B, 4>> {
        let (batch, seq) = (tokens.batch, tokens.seq);
        let past = cache.map_or(0, KvCache::len);
        // Without padding (and no cache, or one row) every row has the same causal mask: one
        // `[1, 1, seq, keys]` bias then serves the whole batch.
        let shared = batch == 1 || (cache.is_none() && tokens.mask.is_none());
        let rows = if shared { 1 } else { batch };
        let keys = prefix + past + seq;
        let mut bias = vec![0f32; rows * seq * keys];
        let mut any_masked = false;
        let too_far = |query: usize, key: usize| window.is_some_and(|w| query - key >= w);
        for row in 0..rows {
            for column in 0..seq {
                let query = past + column;
                let row_start = (row * seq + column) * keys;
                let start = row_start + prefix;
                let mut visible = false;
                for virtual_key in 0..prefix {
                    if too_far(prefix + query, virtual_key) {
                        bias[row_start + virtual_key] = mask_value();
                        any_masked = true;
                    } else {
                        visible = true;
                    }
                }
                for key in 0..past + seq {
                    let real = if key < past {
                        cache.is_some_and(|c| c.is_real(row, key))
                    } else {
                        tokens.is_real(row, key - past)
                    };
                    if key > query || !real || too_far(query, key) {
                        bias[start + key] = mask_value();
                        any_masked = true;
                    } else {
                        visible = true;
                    }
                }
                if !visible {
                    // A padding query with nothing to attend to (left padding): let it see
                    // itself, so that masking with -inf never yields a row of NaN.
                    bias[start + query] = 0.0;
                }
            }
        }
        any_masked.then(|| {
            cast_to(
                Tensor::<B, 4>::from_data(
                    TensorData::new(bias, [rows, 1, seq, keys]),
                    &self.device(),
                ),
                DType::F32,
            )
        })
    }

    /// Embeds `tokens` → `[batch, seq, hidden]`.
    pub fn embed(&self, tokens: &TokenBatch) -> Tensor<B, 3> {
        let device = self.device();
        let ids: Vec<i64> = tokens.ids.iter().map(|&id| id as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [tokens.ids.len()]), &device);
        self.embed_tokens.val().select(0, ids).reshape([
            tokens.batch,
            tokens.seq,
            self.config.hidden_size,
        ])
    }

    /// Runs the decoder stack and the final norm: `[batch, seq, hidden]`.
    ///
    /// With a `cache`, `tokens` continue the cached sequence and the cache is extended.
    ///
    /// # Errors
    /// Token ids outside the vocabulary, or a cache for another batch size.
    pub fn forward_hidden(
        &self,
        tokens: &TokenBatch,
        hooks: &dyn LayerHooks<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.check_tokens(tokens)?;
        if let Some(cache) = cache.as_deref() {
            if cache.batch() != tokens.batch {
                return Err(LlamaError::Input(format!(
                    "cache holds {} rows, the batch has {}",
                    cache.batch(),
                    tokens.batch
                )));
            }
        }
        let context = self.context(tokens, cache.as_deref(), hooks.num_prefix_tokens());
        let first_adapted = hooks.first_adapted_layer().unwrap_or(0);
        let mut hidden = self.embed(tokens);
        for (index, layer) in self.layers.iter().enumerate() {
            if index == first_adapted && index > 0 {
                // Nothing below the first adapted layer is trained: cut the graph here so
                // autodiff backends keep no activations for the frozen bottom layers.
                hidden = hidden.detach();
            }
            let layer_cache = cache.as_deref_mut().map(|c| c.layer_mut(index));
            hidden = layer.forward(index, hidden, &context, hooks, layer_cache);
        }
        if let Some(cache) = cache {
            cache.append(tokens);
        }
        Ok(self.norm.forward(hidden))
    }

    /// Projects final hidden states `[batch, seq, hidden]` to logits `[batch, seq, vocab]`.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => linear_rows(head, hidden),
            None => {
                let [batch, seq, width] = hidden.dims();
                matmul(
                    hidden.reshape([batch * seq, width]),
                    self.embed_tokens.val().transpose(),
                )
                .reshape([batch, seq, self.config.vocab_size])
            }
        }
    }

    /// Logits `[batch, seq, vocab]` for `tokens`.
    ///
    /// # Errors
    /// See [`Llama::forward_hidden`].
    pub fn forward(
        &self,
        tokens: &TokenBatch,
        hooks: &dyn LayerHooks<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let hidden = self.forward_hidden(tokens, hooks, cache)?;
        Ok(self.head(hidden))
    }

    fn check_tokens(&self, tokens: &TokenBatch) -> Result<()> {
        if tokens.batch == 0 || tokens.seq == 0 || tokens.ids.len() != tokens.batch * tokens.seq {
            return Err(LlamaError::Input(format!(
                "token batch of {} ids does not have shape [{}, {}] with both positive",
                tokens.ids.len(),
                tokens.batch,
                tokens.seq
            )));
        }
        if let Some(mask) = &tokens.mask {
            if mask.len() != tokens.ids.len() {
                return Err(LlamaError::Input(
                    "attention mask and ids differ in length".into(),
                ));
            }
        }
        if let Some(&bad) = tokens
            .ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(LlamaError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }
}

impl LlamaConfig {
    /// A model of this architecture with random weights (N(0, 0.02²) as Hugging Face's
    /// `initializer_range`, norms at 1) in `dtype`, created directly on `device`: for benchmarks
    /// and tests where no checkpoint exists. Every parameter is frozen, as a base model is.
    pub fn init<B: Backend>(&self, device: &B::Device, dtype: DType) -> Llama<B> {
        match self.random(device, dtype, None) {
            Ok(model) => model,
            Err(_) => unreachable!("only quantizing a projection can fail"),
        }
    }

    /// [`LlamaConfig::init`] with every decoder projection quantized to `format` as it is
    /// created, so that no more than one projection is ever dense: a 7B-shaped QLoRA base fits
    /// where its dense weights would not. Embeddings, norms and the output head are dense in
    /// `dtype`.
    ///
    /// # Errors
    /// A projection the format cannot hold (Q8_0 needs widths that are multiples of 32).
    pub fn init_quantized<B: Backend>(
        &self,
        device: &B::Device,
        dtype: DType,
        format: QuantFormat,
    ) -> Result<Llama<B>> {
        self.random(device, dtype, Some(format))
    }

    fn random<B: Backend>(
        &self,
        device: &B::Device,
        dtype: DType,
        format: Option<QuantFormat>,
    ) -> Result<Llama<B>> {
        use burn::tensor::Distribution;
        let weight = |shape: [usize; 2]| {
            let tensor = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 0.02), device);
            Param::from_tensor(cast_to(tensor, dtype)).set_require_grad(false)
        };
        // `[out, in]` in memory, used transposed, as loaded checkpoints are (see `weights.rs`).
        let linear = |input: usize, output: usize, bias: bool| {
            let tensor =
                Tensor::<B, 2>::random([output, input], Distribution::Normal(0.0, 0.02), device);
            let bias = bias.then(|| {
                let zeros = Tensor::<B, 1>::zeros([output], device);
                Param::from_tensor(cast_to(zeros, dtype)).set_require_grad(false)
            });
            Linear {
                weight: Param::from_tensor(cast_to(tensor, dtype).transpose())
                    .set_require_grad(false),
                bias,
            }
        };
        let frozen = |input: usize, output: usize, bias: bool| -> Result<FrozenLinear<B>> {
            let dense = FrozenLinear::Dense(linear(input, output, bias));
            match format {
                Some(format) => Ok(dense.quantize(format)?),
                None => Ok(dense),
            }
        };
        let norm = |width: usize| RmsNorm {
            weight: Param::from_tensor(cast_to(Tensor::ones([width], device), dtype))
                .set_require_grad(false),
            eps: self.rms_norm_eps,
        };
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let (qkv_bias, mlp_bias) = (self.attention_bias, self.mlp_bias);
        let layers = (0..self.num_hidden_layers)
            .map(|layer| -> Result<DecoderLayer<B>> {
                Ok(DecoderLayer {
                    self_attn: Attention {
                        q_proj: frozen(d, self.query_width(), qkv_bias)?,
                        k_proj: frozen(d, self.kv_width(), qkv_bias)?,
                        v_proj: frozen(d, self.kv_width(), qkv_bias)?,
                        o_proj: frozen(self.query_width(), d, self.o_proj_bias)?,
                        num_heads: self.num_attention_heads,
                        num_kv_heads: self.num_key_value_heads,
                        head_dim: self.head_dim,
                        q_norm: self.qk_norm.then(|| norm(self.head_dim)),
                        k_norm: self.qk_norm.then(|| norm(self.head_dim)),
                        sliding: self.is_sliding(layer),
                    },
                    mlp: Mlp {
                        gate_proj: frozen(d, f, mlp_bias)?,
                        up_proj: frozen(d, f, mlp_bias)?,
                        down_proj: frozen(f, d, mlp_bias)?,
                    },
                    input_layernorm: norm(d),
                    post_attention_layernorm: norm(d),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Llama {
            embed_tokens: weight([self.vocab_size, d]),
            layers,
            norm: norm(d),
            lm_head: (!self.tie_word_embeddings).then(|| linear(d, self.vocab_size, false)),
            config: self.clone(),
            rope: RotaryEmbedding::new(self),
            name_or_path: None,
        })
    }
}

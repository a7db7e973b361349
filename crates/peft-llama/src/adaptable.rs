//! LLaMA as a model `peft-core`'s adapters attach to: its sizes, its linear sites under Hugging
//! Face's module paths, its attention's key/value projections; and what only a causal language
//! model adds (forward and generation through a [`PeftModel`], prefixes initialised from tokens).

use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Tensor};
use peft_core::{
    AdaptableModel, Adapter, InsertionPoint, LinearSite, ModelGeometry, NoHooks, PeftError,
    PeftModel, PrefixTuning, PrefixTuningConfig,
};

use crate::cache::KvCache;
use crate::config::LlamaConfig;
use crate::generate::{generate, Generation, GenerationConfig};
use crate::model::{sites, DecoderLayer, Llama, TokenBatch};
use peft_ops::quant::FrozenLinear;

/// The module path of the decoder layers, as Hugging Face's `LlamaForCausalLM` names them.
pub const LAYERS_PATH: &str = "model.layers";

/// The linear sites of one decoder layer, in the order the forward pass runs them: the name
/// the model passes to its hooks, and the input and output widths.
fn layer_sites(config: &LlamaConfig) -> [(&'static str, usize, usize); 7] {
    let (d, q, kv, f) = (
        config.hidden_size,
        config.query_width(),
        config.kv_width(),
        config.intermediate_size,
    );
    [
        (sites::Q_PROJ, d, q),
        (sites::K_PROJ, d, kv),
        (sites::V_PROJ, d, kv),
        (sites::O_PROJ, q, d),
        (sites::GATE_PROJ, d, f),
        (sites::UP_PROJ, d, f),
        (sites::DOWN_PROJ, f, d),
    ]
}

impl LlamaConfig {
    /// The sizes adapters are shaped by.
    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_hidden_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            intermediate_size: self.intermediate_size,
        }
    }

    /// The linear sites of a model of this configuration (`model.layers.{i}.self_attn.q_proj`,
    /// ..., `model.layers.{i}.mlp.down_proj`), without allocating it: for counting an adapter's
    /// parameters on a model one does not load.
    pub fn linear_sites(&self) -> Vec<LinearSite> {
        let per_layer = layer_sites(self);
        (0..self.num_hidden_layers)
            .flat_map(|layer| {
                per_layer.iter().map(move |&(name, input, output)| {
                    LinearSite::in_layer(LAYERS_PATH, layer, name, input, output)
                })
            })
            .collect()
    }
}

/// The projection of `layer` at `name` (a path inside the layer, [`sites`]).
fn projection<'a, B: Backend>(
    layer: &'a DecoderLayer<B>,
    name: &str,
) -> Option<&'a FrozenLinear<B>> {
    Some(match name {
        sites::Q_PROJ => &layer.self_attn.q_proj,
        sites::K_PROJ => &layer.self_attn.k_proj,
        sites::V_PROJ => &layer.self_attn.v_proj,
        sites::O_PROJ => &layer.self_attn.o_proj,
        sites::GATE_PROJ => &layer.mlp.gate_proj,
        sites::UP_PROJ => &layer.mlp.up_proj,
        sites::DOWN_PROJ => &layer.mlp.down_proj,
        _ => return None,
    })
}

fn projection_mut<'a, B: Backend>(
    layer: &'a mut DecoderLayer<B>,
    name: &str,
) -> Option<&'a mut FrozenLinear<B>> {
    Some(match name {
        sites::Q_PROJ => &mut layer.self_attn.q_proj,
        sites::K_PROJ => &mut layer.self_attn.k_proj,
        sites::V_PROJ => &mut layer.self_attn.v_proj,
        sites::O_PROJ => &mut layer.self_attn.o_proj,
        sites::GATE_PROJ => &mut layer.mlp.gate_proj,
        sites::UP_PROJ => &mut layer.mlp.up_proj,
        sites::DOWN_PROJ => &mut layer.mlp.down_proj,
        _ => return None,
    })
}

impl<B: Backend> AdaptableModel<B> for Llama<B> {
    fn geometry(&self) -> ModelGeometry {
        self.config.geometry()
    }

    fn linear_sites(&self) -> Vec<LinearSite> {
        self.config
            .linear_sites()
            .into_iter()
            .map(|site| {
                let format = site
                    .layer
                    .and_then(|layer| projection(&self.layers[layer], &site.name))
                    .and_then(FrozenLinear::quant_format);
                match format {
                    Some(format) => site.quantized_as(format.name()),
                    None => site,
                }
            })
            .collect()
    }

    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear<B>> {
        let rest = path.strip_prefix(LAYERS_PATH)?.strip_prefix('.')?;
        let (index, name) = rest.split_once('.')?;
        let layer = self.layers.get_mut(index.parse::<usize>().ok()?)?;
        projection_mut(layer, name)?.dense_mut()
    }

    fn insertion_points(&self) -> &'static [InsertionPoint] {
        &[
            InsertionPoint::Linear,
            InsertionPoint::PrefixKeyValues,
            InsertionPoint::AttentionBranch,
        ]
    }

    fn dtype(&self) -> DType {
        Llama::dtype(self)
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
        Some("CAUSAL_LM")
    }
}

/// What a [`PeftModel`] over a LLaMA adds: the causal LM's forward pass and generation with the
/// active adapter.
pub trait PeftLlama<B: Backend> {
    /// Logits `[batch, seq, vocab]` with the active adapter.
    ///
    /// # Errors
    /// See [`Llama::forward`].
    fn forward(
        &self,
        tokens: &TokenBatch,
        cache: Option<&mut KvCache<B>>,
    ) -> peft_core::Result<Tensor<B, 3>>;

    /// Generates with the active adapter (its prompt keys/values prepared once for all steps).
    ///
    /// # Errors
    /// See [`generate`].
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> peft_core::Result<Vec<Generation>>;
}

impl<B: Backend, A: Adapter<B>> PeftLlama<B> for PeftModel<B, Llama<B>, A> {
    fn forward(
        &self,
        tokens: &TokenBatch,
        cache: Option<&mut KvCache<B>>,
    ) -> peft_core::Result<Tensor<B, 3>> {
        Ok(self.base().forward(tokens, self.hooks().as_ref(), cache)?)
    }

    fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> peft_core::Result<Vec<Generation>> {
        Ok(generate(
            self.base(),
            self.hooks().as_ref(),
            prompts,
            config,
        )?)
    }
}

/// Prefix tuning initialised from real tokens on a LLaMA.
pub trait PrefixFromTokens {
    /// Creates the adapter with each prefix set to the keys and values `base` computes for
    /// `token_ids` (one id per virtual token): Li & Liang's initialisation from the activations
    /// of real words. Since real tokens take positions `P..`, the untrained adapter is exactly the
    /// base model reading `token_ids` before every input, instead of the large perturbation that
    /// N(0, 1) prefixes are. The files it produces are ordinary PEFT prefix-tuning files.
    ///
    /// # Errors
    /// `prefix_projection` set (an MLP's output cannot be set directly), a number of ids other
    /// than `num_virtual_tokens`, or ids outside the vocabulary.
    fn init_from_tokens<B: Backend>(
        &self,
        base: &Llama<B>,
        token_ids: &[u32],
    ) -> peft_core::Result<PrefixTuning<B>>;
}

impl PrefixFromTokens for PrefixTuningConfig {
    fn init_from_tokens<B: Backend>(
        &self,
        base: &Llama<B>,
        token_ids: &[u32],
    ) -> peft_core::Result<PrefixTuning<B>> {
        if self.prefix_projection {
            return Err(PeftError::Config(
                "prefixes initialised from tokens cannot be reparameterised through an MLP \
                 (prefix_projection must be false)"
                    .into(),
            ));
        }
        if token_ids.len() != self.num_virtual_tokens {
            return Err(PeftError::Config(format!(
                "prefix initialisation needs {} token ids (num_virtual_tokens), got {}",
                self.num_virtual_tokens,
                token_ids.len()
            )));
        }
        let layers = base.config.num_hidden_layers;
        let tokens = TokenBatch::right_padded(&[token_ids.to_vec()], 0)
            .map_err(|e| PeftError::Config(format!("prefix initialisation tokens: {e}")))?;
        let mut cache = KvCache::new(layers, 1);
        base.forward_hidden(&tokens, &NoHooks, Some(&mut cache))
            .map_err(|e| PeftError::Config(format!("prefix initialisation tokens: {e}")))?;
        let key_values = (0..layers)
            .map(|layer| {
                cache.layer(layer).ok_or_else(|| {
                    PeftError::Config(format!("layer {layer} cached no keys/values"))
                })
            })
            .collect::<peft_core::Result<Vec<_>>>()?;
        self.init_from_key_values(base, key_values)
    }
}

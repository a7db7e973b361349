//! Prefix tuning (Li & Liang 2021) with Hugging Face PEFT semantics: `num_virtual_tokens` `P`
//! learned key/value vectors per layer (key/value-head width under GQA), joined in front of the
//! real tokens' keys/values in one softmax; the real tokens take positions `P..P+T-1`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_llama::model::{cast_to, upcast};
use peft_llama::{KvCache, LayerHooks, Llama, LlamaConfig, NoHooks, TokenBatch};

use crate::adapter::{host_values, Adapter, NamedTensor, PeftMethod};
use crate::error::{PeftError, Result};

/// Configuration of [`PrefixTuning`].
#[derive(Config, Debug, PartialEq)]
pub struct PrefixTuningConfig {
    /// Number of virtual tokens `P`.
    #[config(default = 20)]
    pub num_virtual_tokens: usize,
    /// Reparameterise the prefixes through a two-layer MLP during training.
    #[config(default = false)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP.
    #[config(default = 512)]
    pub encoder_hidden_size: usize,
}

impl PrefixTuningConfig {
    /// Width of all prefixes of one virtual token: keys and values of every layer.
    pub fn prompt_width(model: &LlamaConfig) -> usize {
        2 * model.num_hidden_layers * model.kv_width()
    }

    /// Trainable parameters for `model`, computed without allocating anything.
    pub fn num_trainable_parameters(&self, model: &LlamaConfig) -> usize {
        let width = Self::prompt_width(model);
        if self.prefix_projection {
            let token = model.kv_width();
            let hidden = self.encoder_hidden_size;
            self.num_virtual_tokens * token + (token + 1) * hidden + (hidden + 1) * width
        } else {
            self.num_virtual_tokens * width
        }
    }

    /// Creates the adapter, prefixes drawn from N(0, 1) as PEFT's `nn.Embedding`.
    ///
    /// # Errors
    /// Zero virtual tokens.
    pub fn init<B: Backend>(
        &self,
        model: &LlamaConfig,
        device: &B::Device,
    ) -> Result<PrefixTuning<B>> {
        if self.num_virtual_tokens == 0 {
            return Err(PeftError::Config(
                "num_virtual_tokens must be positive".into(),
            ));
        }
        let width = Self::prompt_width(model);
        let (embedding_width, projection) = if self.prefix_projection {
            let token = model.kv_width();
            let projection = PrefixProjection {
                first: LinearConfig::new(token, self.encoder_hidden_size).init(device),
                second: LinearConfig::new(self.encoder_hidden_size, width).init(device),
            };
            (token, Some(projection))
        } else {
            (width, None)
        };
        let embedding = Tensor::random(
            [self.num_virtual_tokens, embedding_width],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        Ok(PrefixTuning {
            embedding: Param::from_tensor(embedding),
            projection,
            config: self.clone(),
            num_layers: model.num_hidden_layers,
            kv_heads: model.num_key_value_heads,
            head_dim: model.head_dim,
        })
    }
}

impl PrefixTuningConfig {
    /// Creates the adapter with each prefix set to the keys and values `base` computes for
    /// `token_ids` (one id per virtual token): Li & Liang's initialisation from the activations
    /// of real words. Since real tokens take positions `P..`, the untrained adapter is exactly the
    /// base model reading `token_ids` before every input, instead of the large perturbation that
    /// N(0, 1) prefixes are. The files it produces are ordinary PEFT prefix-tuning files.
    ///
    /// # Errors
    /// `prefix_projection` set (an MLP's output cannot be set directly), a number of ids other
    /// than `num_virtual_tokens`, or ids outside the vocabulary.
    pub fn init_from_tokens<B: Backend>(
        &self,
        base: &Llama<B>,
        token_ids: &[u32],
    ) -> Result<PrefixTuning<B>> {
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
        let config = &base.config;
        let tokens = TokenBatch::right_padded(&[token_ids.to_vec()], 0)
            .map_err(|e| PeftError::Config(format!("prefix initialisation tokens: {e}")))?;
        let mut cache = KvCache::new(config.num_hidden_layers, 1);
        base.forward_hidden(&tokens, &NoHooks, Some(&mut cache))
            .map_err(|e| PeftError::Config(format!("prefix initialisation tokens: {e}")))?;
        // Per layer: keys then values, each [1, kv_heads, P, head_dim]; PEFT's layout puts the
        // virtual token first and then, for every layer, its key block and its value block.
        let mut blocks = Vec::with_capacity(2 * config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let (keys, values) = cache
                .layer(layer)
                .ok_or_else(|| PeftError::Config(format!("layer {layer} cached no keys/values")))?;
            blocks.push(keys);
            blocks.push(values);
        }
        let width = Self::prompt_width(config);
        let embedding = upcast(Tensor::cat(blocks, 0))
            .permute([2, 0, 1, 3])
            .reshape([self.num_virtual_tokens, width])
            .detach();
        Ok(PrefixTuning {
            embedding: Param::from_tensor(embedding),
            projection: None,
            config: self.clone(),
            num_layers: config.num_hidden_layers,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        })
    }
}

/// The reparameterisation MLP `Linear → tanh → Linear` of PEFT's prefix encoder.
#[derive(Module, Debug)]
pub struct PrefixProjection<B: Backend> {
    /// `[kv_width, encoder_hidden_size]` with bias.
    pub first: Linear<B>,
    /// `[encoder_hidden_size, 2·layers·kv_width]` with bias.
    pub second: Linear<B>,
}

/// Learned key/value prefixes for every layer.
#[derive(Module, Debug)]
pub struct PrefixTuning<B: Backend> {
    /// `[P, 2·layers·kv_width]`, or `[P, kv_width]` when reparameterised.
    pub embedding: Param<Tensor<B, 2>>,
    /// The reparameterisation MLP, if any.
    pub projection: Option<PrefixProjection<B>>,
    /// Settings.
    #[module(skip)]
    pub config: PrefixTuningConfig,
    /// Layers of the model.
    pub num_layers: usize,
    /// Key/value heads of the model.
    pub kv_heads: usize,
    /// Head width of the model.
    pub head_dim: usize,
}

impl<B: Backend> PrefixTuning<B> {
    /// The prefixes of every layer, `[P, 2·layers·kv_width]`, in PEFT's layout: for layer `i`,
    /// block `2i` holds keys and block `2i + 1` values, each `[kv_heads, head_dim]`.
    pub fn prompt_embeddings(&self) -> Tensor<B, 2> {
        let embedding = self.embedding.val();
        match &self.projection {
            Some(mlp) => mlp.second.forward(mlp.first.forward(embedding).tanh()),
            None => embedding,
        }
    }

    /// Replaces the reparameterisation MLP by the prefixes it produces (what PEFT saves).
    pub fn into_inference(self) -> Self {
        let embedding = self.prompt_embeddings();
        Self {
            embedding: Param::from_tensor(embedding),
            projection: None,
            config: self.config.clone().with_prefix_projection(false),
            ..self
        }
    }
}

struct PreparedPrefix<B: Backend> {
    /// `[2·layers, kv_heads, P, head_dim]`
    key_values: Tensor<B, 4>,
    tokens: usize,
}

impl<B: Backend> LayerHooks<B> for PreparedPrefix<B> {
    fn num_prefix_tokens(&self) -> usize {
        self.tokens
    }

    fn prefix_key_values(
        &self,
        layer: usize,
        batch: usize,
    ) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let [_, heads, tokens, dim] = self.key_values.dims();
        let pick = |index: usize| {
            self.key_values
                .clone()
                .narrow(0, index, 1)
                .expand([batch, heads, tokens, dim])
        };
        Some((pick(2 * layer), pick(2 * layer + 1)))
    }

    fn first_adapted_layer(&self) -> Option<usize> {
        Some(0)
    }
}

impl<B: Backend> Adapter<B> for PrefixTuning<B> {
    fn method(&self) -> PeftMethod {
        PeftMethod::PrefixTuning
    }

    fn check_compatible(&self, config: &LlamaConfig) -> Result<()> {
        let found = [self.num_layers, self.kv_heads, self.head_dim];
        let expected = [
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
        ];
        if found != expected {
            return Err(PeftError::Incompatible(format!(
                "prefix made for layers/kv_heads/head_dim {found:?}, the model has {expected:?}"
            )));
        }
        let [tokens, width] = self.embedding.dims();
        let expected_width = match &self.projection {
            Some(_) => config.kv_width(),
            None => PrefixTuningConfig::prompt_width(config),
        };
        if tokens != self.config.num_virtual_tokens || width != expected_width {
            return Err(PeftError::Incompatible(format!(
                "prefix embedding has shape [{tokens}, {width}], expected [{}, {expected_width}]",
                self.config.num_virtual_tokens
            )));
        }
        Ok(())
    }

    fn hooks<'a>(&'a self, base: &'a Llama<B>) -> Box<dyn LayerHooks<B> + 'a> {
        let prompts = self.prompt_embeddings();
        let tokens = prompts.dims()[0];
        let key_values = prompts
            .reshape([tokens, 2 * self.num_layers, self.kv_heads, self.head_dim])
            .permute([1, 2, 0, 3]);
        let dtype = base.dtype();
        let key_values = cast_to(key_values, dtype);
        Box::new(PreparedPrefix { key_values, tokens })
    }

    /// PEFT's name: `prompt_embeddings` `[P, 2·layers·kv_width]` (the MLP's output when
    /// reparameterised, as PEFT saves it).
    fn named_tensors(&self) -> Vec<NamedTensor> {
        let prompts = self.prompt_embeddings();
        let shape = prompts.dims().to_vec();
        vec![NamedTensor {
            key: "prompt_embeddings".into(),
            shape,
            values: host_values(prompts),
        }]
    }
}

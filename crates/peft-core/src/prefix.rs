//! Prefix tuning (Li & Liang 2021) with Hugging Face PEFT semantics: `num_virtual_tokens` `P`
//! learned key/value vectors per layer (key/value-head width under GQA), joined in front of the
//! real tokens' keys/values in one softmax; the real tokens take positions `P..P+T-1`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use peft_ops::tensor::{cast_to, upcast};

use peft_io::TensorMap;
use serde_json::{json, Value};

use crate::adapter::{host_values, Adapter, NamedTensor, PeftMethod};
use crate::error::{PeftError, Result};
use crate::hooks::LayerHooks;
use crate::model::{require_point, AdaptableModel, InsertionPoint, ModelGeometry};
use crate::native_format::{NativeAdapter, NativeConfig};
use crate::peft_format::{tensor, FromPeft, PeftConfigFile};

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
    pub fn prompt_width(model: &ModelGeometry) -> usize {
        2 * model.num_hidden_layers * model.kv_width()
    }

    /// Trainable parameters for `model`, computed without allocating anything.
    pub fn num_trainable_parameters(&self, model: &ModelGeometry) -> usize {
        let width = Self::prompt_width(model);
        if self.prefix_projection {
            let token = model.kv_width();
            let hidden = self.encoder_hidden_size;
            self.num_virtual_tokens * token + (token + 1) * hidden + (hidden + 1) * width
        } else {
            self.num_virtual_tokens * width
        }
    }

    /// Creates the adapter for `model`, prefixes drawn from N(0, 1) as PEFT's `nn.Embedding`.
    ///
    /// # Errors
    /// Zero virtual tokens; a model that takes no prefix keys/values.
    pub fn init<B: Backend>(
        &self,
        model: &(impl AdaptableModel<B> + ?Sized),
        device: &B::Device,
    ) -> Result<PrefixTuning<B>> {
        require_point(model, InsertionPoint::PrefixKeyValues, "prefix tuning")?;
        self.init_for(&model.geometry(), device)
    }

    /// [`PrefixTuningConfig::init`] from the model's sizes alone (for loading files).
    ///
    /// # Errors
    /// Zero virtual tokens.
    pub fn init_for<B: Backend>(
        &self,
        model: &ModelGeometry,
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

    /// Creates the adapter with each layer's prefix set to given keys and values, each
    /// `[1, kv_heads, P, head_dim]`, bottom layer first: Li & Liang's initialisation from the
    /// activations of real words, when `key_values` are what the model computes for `P` real
    /// tokens (`peft_llama::PrefixFromTokens` does that for LLaMA). The files it produces are
    /// ordinary PEFT prefix-tuning files.
    ///
    /// # Errors
    /// `prefix_projection` set (an MLP's output cannot be set directly), a number of layers or a
    /// shape that does not match the model and `num_virtual_tokens`.
    pub fn init_from_key_values<B: Backend>(
        &self,
        model: &(impl AdaptableModel<B> + ?Sized),
        key_values: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Result<PrefixTuning<B>> {
        require_point(model, InsertionPoint::PrefixKeyValues, "prefix tuning")?;
        if self.prefix_projection {
            return Err(PeftError::Config(
                "prefixes initialised from tokens cannot be reparameterised through an MLP \
                 (prefix_projection must be false)"
                    .into(),
            ));
        }
        let geometry = model.geometry();
        if key_values.len() != geometry.num_hidden_layers {
            return Err(PeftError::Incompatible(format!(
                "prefix initialisation got keys/values of {} layers, the model has {}",
                key_values.len(),
                geometry.num_hidden_layers
            )));
        }
        let expected = [
            1,
            geometry.num_key_value_heads,
            self.num_virtual_tokens,
            geometry.head_dim,
        ];
        let mut blocks = Vec::with_capacity(2 * geometry.num_hidden_layers);
        for (layer, (keys, values)) in key_values.into_iter().enumerate() {
            for tensor in [&keys, &values] {
                if tensor.dims() != expected {
                    return Err(PeftError::Incompatible(format!(
                        "prefix initialisation: layer {layer} has keys/values of shape {:?}, \
                         expected {expected:?} (num_virtual_tokens {})",
                        tensor.dims(),
                        self.num_virtual_tokens
                    )));
                }
            }
            blocks.push(keys);
            blocks.push(values);
        }
        // Per layer: keys then values, each [1, kv_heads, P, head_dim]; PEFT's layout puts the
        // virtual token first and then, for every layer, its key block and its value block.
        let width = Self::prompt_width(&geometry);
        let embedding = upcast(Tensor::cat(blocks, 0))
            .permute([2, 0, 1, 3])
            .reshape([self.num_virtual_tokens, width])
            .detach();
        Ok(PrefixTuning {
            embedding: Param::from_tensor(embedding),
            projection: None,
            config: self.clone(),
            num_layers: geometry.num_hidden_layers,
            kv_heads: geometry.num_key_value_heads,
            head_dim: geometry.head_dim,
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

    fn peft_config(&self, model: &dyn AdaptableModel<B>) -> Result<serde_json::Value> {
        if self.projection.is_some() {
            return Err(PeftError::Unsupported(
                "a prefix reparameterised through an MLP (prefix_projection) is saved by PEFT as \
                 its projected prefixes only after training; save it in this crate's own format"
                    .into(),
            ));
        }
        let geometry = model.geometry();
        Ok(json!({
            "num_virtual_tokens": self.config.num_virtual_tokens,
            "token_dim": geometry.kv_width(),
            "num_transformer_submodules": 1,
            "num_attention_heads": geometry.num_key_value_heads,
            "num_layers": geometry.num_hidden_layers,
            "encoder_hidden_size": self.config.encoder_hidden_size,
            "prefix_projection": false,
            "modules_to_save": null,
        }))
    }

    fn check_compatible(&self, model: &dyn AdaptableModel<B>) -> Result<()> {
        require_point(model, InsertionPoint::PrefixKeyValues, "prefix tuning")?;
        let config = model.geometry();
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
            None => PrefixTuningConfig::prompt_width(&config),
        };
        if tokens != self.config.num_virtual_tokens || width != expected_width {
            return Err(PeftError::Incompatible(format!(
                "prefix embedding has shape [{tokens}, {width}], expected [{}, {expected_width}]",
                self.config.num_virtual_tokens
            )));
        }
        Ok(())
    }

    fn hooks<'a>(&'a self, model: &dyn AdaptableModel<B>) -> Box<dyn LayerHooks<B> + 'a> {
        let prompts = self.prompt_embeddings();
        let tokens = prompts.dims()[0];
        let key_values = prompts
            .reshape([tokens, 2 * self.num_layers, self.kv_heads, self.head_dim])
            .permute([1, 2, 0, 3]);
        let key_values = cast_to(key_values, model.dtype());
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

impl<B: Backend> FromPeft<B> for PrefixTuning<B> {
    const PEFT_TYPE: &'static str = "PREFIX_TUNING";

    fn from_peft(
        file: &PeftConfigFile<'_>,
        tensors: &mut TensorMap,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self> {
        let geometry = model.geometry();
        let tokens = file.usize("num_virtual_tokens")?;
        if let Some(layers) = file.get("num_layers").and_then(Value::as_u64) {
            if layers as usize != geometry.num_hidden_layers {
                return Err(PeftError::Incompatible(format!(
                    "{}: prefix made for {layers} layers, the model has {}",
                    file.path.display(),
                    geometry.num_hidden_layers
                )));
            }
        }
        let width = PrefixTuningConfig::prompt_width(&geometry);
        let values = tensors.take_f32("prompt_embeddings", &[tokens, width])?;
        let config = PrefixTuningConfig::new()
            .with_num_virtual_tokens(tokens)
            .with_encoder_hidden_size(
                file.get("encoder_hidden_size")
                    .and_then(Value::as_u64)
                    .unwrap_or(512) as usize,
            );
        Ok(PrefixTuning {
            embedding: Param::from_tensor(tensor(values, [tokens, width], device)),
            projection: None,
            config,
            num_layers: geometry.num_hidden_layers,
            kv_heads: geometry.num_key_value_heads,
            head_dim: geometry.head_dim,
        })
    }
}
impl PrefixTuningConfig {
    /// The number of trainable values for a model of `model`'s sizes, with checked arithmetic
    /// (for sizes read from a file); `None` on overflow.
    pub fn checked_parameters(&self, model: &ModelGeometry) -> Option<usize> {
        let width = Self::prompt_width(model);
        let tokens = self.num_virtual_tokens;
        if self.prefix_projection {
            let token = model.kv_width();
            let hidden = self.encoder_hidden_size;
            let embedding = tokens.checked_mul(token)?;
            let first = token.checked_add(1)?.checked_mul(hidden)?;
            let second = hidden.checked_add(1)?.checked_mul(width)?;
            embedding.checked_add(first)?.checked_add(second)
        } else {
            tokens.checked_mul(width)
        }
    }
}

impl<B: Backend> NativeAdapter<B> for PrefixTuning<B> {
    fn native_config(&self) -> Value {
        serde_json::to_value(&self.config).expect("prefix configurations serialise")
    }

    fn init_native(
        manifest: &NativeConfig<'_>,
        model: &dyn AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Self> {
        manifest.expect_type("PREFIX_TUNING")?;
        let config: PrefixTuningConfig = manifest.parse()?;
        if config.num_virtual_tokens == 0 {
            return Err(manifest.error("`config`: num_virtual_tokens must be positive"));
        }
        if config.prefix_projection && config.encoder_hidden_size == 0 {
            return Err(manifest
                .error("`config`: encoder_hidden_size must be positive with prefix_projection"));
        }
        manifest.check_parameters(config.checked_parameters(&model.geometry()))?;
        config.init(model, device)
    }
}

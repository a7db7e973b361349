//! Model configuration: Hugging Face `config.json`, Meta `params.json`, and named presets.

use std::path::Path;

use burn::config::Config;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LlamaError, Result};

/// Llama-3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Config, Debug, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor applied to low frequencies.
    pub factor: f64,
    /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// The member of the LLaMA family a checkpoint belongs to: `config.json`'s `model_type`.
///
/// They share the pre-norm decoder with grouped-query attention, RoPE and SwiGLU, and differ in
/// what [`LlamaConfig`]'s switches say: biases ([`LlamaConfig::attention_bias`]), per-head q/k
/// norms ([`LlamaConfig::qk_norm`]) and sliding-window layers ([`LlamaConfig::sliding_window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// LLaMA 1/2/3.x, TinyLlama, SmolLM/SmolLM2 (`LlamaForCausalLM`).
    #[default]
    Llama,
    /// Mistral (`MistralForCausalLM`): LLaMA with an optional sliding attention window.
    Mistral,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): biases on the q/k/v projections.
    Qwen2,
    /// Qwen3 (`Qwen3ForCausalLM`): an RMSNorm over each query and key head before RoPE.
    Qwen3,
}

impl Family {
    /// Every supported family, by its `model_type`.
    pub const ALL: [Family; 4] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3];

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The `transformers` class of the causal LM (`architectures` in `config.json`).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The family of a `model_type` or an `architectures` entry.
    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == name || f.architecture() == name)
    }

    fn supported() -> String {
        Family::ALL.map(Family::model_type).join(", ")
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Architecture of a LLaMA-family decoder (LLaMA-1/2/3, Mistral, Qwen2, Qwen3: see [`Family`]).
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder layers `N`.
    pub num_hidden_layers: usize,
    /// Number of query heads `H`.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); equals `H` for multi-head attention.
    pub num_key_value_heads: usize,
    /// Width of one head; `hidden_size / num_attention_heads` unless the config says otherwise.
    pub head_dim: usize,
    /// Epsilon of RMSNorm.
    #[config(default = 1e-6)]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Llama-3 RoPE scaling, if any.
    #[config(default = "None")]
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Explicit divisors of the `head_dim / 2` RoPE inverse frequencies: llama.cpp's form of
    /// Llama-3.1+ scaling (a GGUF file's `rope_freqs.weight`), used instead of `rope_scaling`.
    #[config(default = "None")]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Whether the output head shares the token embedding matrix.
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    #[config(default = 2048)]
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token id.
    #[config(default = "Some(1)")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (Llama-3 has several).
    #[config(default = "vec![2]")]
    pub eos_token_ids: Vec<u32>,
    /// The family the checkpoint declares (`model_type`).
    #[config(default = "Family::Llama")]
    pub family: Family,
    /// Biases on the query, key and value projections (Qwen2; `attention_bias` of LLaMA/Qwen3).
    #[config(default = false)]
    pub attention_bias: bool,
    /// A bias on the output projection (`attention_bias` of LLaMA/Qwen3; Qwen2 has none).
    #[config(default = false)]
    pub o_proj_bias: bool,
    /// Biases on the three feed-forward projections (`mlp_bias` of LLaMA).
    #[config(default = false)]
    pub mlp_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3's `q_norm`/`k_norm`).
    #[config(default = false)]
    pub qk_norm: bool,
    /// Width of the attention window of the sliding-window layers: a query at position `t` sees
    /// keys `s` with `t - window < s <= t` (Mistral; Qwen2/Qwen3 with `use_sliding_window`).
    #[config(default = "None")]
    pub sliding_window: Option<usize>,
    /// The layers that attend through [`LlamaConfig::sliding_window`] (`layer_types` of
    /// `config.json`); the others attend to every earlier position.
    #[config(default = "Vec::new()")]
    pub sliding_window_layers: Vec<usize>,
}

/// The fields of a Hugging Face `config.json` this crate reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
}

/// The fields of Meta's `params.json`.
#[derive(Deserialize)]
struct MetaParams {
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: Option<usize>,
    vocab_size: Option<i64>,
    multiple_of: Option<usize>,
    ffn_dim_multiplier: Option<f64>,
    norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    use_scaled_rope: Option<bool>,
    // Meta's Llama 3.1 code hard-codes the scaling constants; these optional keys override them.
    rope_scaling_factor: Option<f64>,
    rope_low_freq_factor: Option<f64>,
    rope_high_freq_factor: Option<f64>,
    rope_original_max_position_embeddings: Option<usize>,
}

fn read_json(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))
}

fn token_ids(value: &Option<Value>, origin: &str, key: &str) -> Result<Vec<u32>> {
    let bad = || {
        LlamaError::config(
            origin,
            format!("`{key}` must be a token id or a list of ids"),
        )
    };
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        // An id beyond u32 is refused rather than wrapped into another token.
        Some(Value::Number(n)) => Ok(vec![n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)?]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn parse_rope_scaling(value: &Value, origin: &str) -> Result<Option<Llama3RopeScaling>> {
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let number = |key: &str| {
                value
                    .get(key)
                    .and_then(Value::as_f64)
                    .filter(|v| *v > 0.0)
                    .ok_or_else(|| {
                        LlamaError::config(
                            origin,
                            format!("llama3 rope scaling needs a positive numeric `{key}`"),
                        )
                    })
            };
            Ok(Some(Llama3RopeScaling {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?
                    as usize,
            }))
        }
        other => Err(LlamaError::config(
            origin,
            format!("unsupported rope scaling type `{other}` (supported: default, llama3)"),
        )),
    }
}

impl LlamaConfig {
    /// Builds a configuration from the text of a Hugging Face `config.json`.
    ///
    /// `origin` names the source in error messages.
    ///
    /// # Errors
    /// Malformed JSON, a model type outside [`Family`], a non-SiLU activation, an unknown RoPE
    /// scaling type or layer type, or inconsistent head counts.
    pub fn from_hf_json(text: &str, origin: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| LlamaError::Json {
            path: origin.into(),
            message: e.to_string(),
        })?;
        let family = Self::family_of(&hf, origin)?;
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(LlamaError::config(
                    origin,
                    format!("hidden_act `{act}` is not supported (the LLaMA family uses silu)"),
                ));
            }
        }
        let bias = hf.attention_bias == Some(true);
        // Qwen2 always has q/k/v biases and never an output bias; the others follow
        // `attention_bias` on all four projections.
        let (attention_bias, o_proj_bias) = match family {
            Family::Qwen2 => (true, false),
            _ => (bias, bias),
        };
        let layers = hf.num_hidden_layers;
        let (sliding_window, sliding_window_layers) =
            Self::sliding_layers(&hf, family, layers, origin)?;
        // transformers >= 4.5x keeps RoPE settings in `rope_parameters`; older files use
        // top-level `rope_theta` and `rope_scaling`.
        let mut rope_theta = hf.rope_theta;
        let mut rope_scaling = None;
        if let Some(params) = &hf.rope_parameters {
            if let Some(theta) = params.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = Some(theta);
            }
            rope_scaling = parse_rope_scaling(params, origin)?;
        }
        if let Some(scaling) = &hf.rope_scaling {
            if !scaling.is_null() {
                rope_scaling = parse_rope_scaling(scaling, origin)?;
            }
        }
        let heads = hf.num_attention_heads;
        let head_dim =
            match hf.head_dim {
                Some(d) => d,
                None if heads > 0 && hf.hidden_size.is_multiple_of(heads) => hf.hidden_size / heads,
                None => return Err(LlamaError::config(
                    origin,
                    "hidden_size is not a multiple of num_attention_heads and no head_dim is given",
                )),
            };
        let eos = token_ids(&hf.eos_token_id, origin, "eos_token_id")?;
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            bos_token_id: token_ids(&hf.bos_token_id, origin, "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: if eos.is_empty() { vec![2] } else { eos },
            family,
            attention_bias,
            o_proj_bias,
            mlp_bias: hf.mlp_bias == Some(true),
            qk_norm: family == Family::Qwen3,
            sliding_window,
            sliding_window_layers,
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// The family `config.json` declares by `model_type` (or, without one, by its first
    /// `architectures` entry); LLaMA when it declares neither.
    fn family_of(hf: &HfConfig, origin: &str) -> Result<Family> {
        let declared = hf
            .model_type
            .as_deref()
            .or_else(|| hf.architectures.as_ref()?.first().map(String::as_str));
        match declared {
            None => Ok(Family::Llama),
            Some(name) => Family::from_name(name).ok_or_else(|| {
                LlamaError::config(
                    origin,
                    format!(
                        "model_type `{name}` is not supported; supported model types: {}",
                        Family::supported()
                    ),
                )
            }),
        }
    }

    /// The attention window and the layers that use it, as `transformers` derives them: every
    /// layer for Mistral; for Qwen2/Qwen3 with `use_sliding_window`, the `layer_types` list when
    /// the file has one, otherwise the layers from `max_window_layers` up.
    fn sliding_layers(
        hf: &HfConfig,
        family: Family,
        layers: usize,
        origin: &str,
    ) -> Result<(Option<usize>, Vec<usize>)> {
        let window = match family {
            Family::Llama => None,
            Family::Mistral => hf.sliding_window,
            Family::Qwen2 | Family::Qwen3 => hf
                .sliding_window
                .filter(|_| hf.use_sliding_window == Some(true)),
        };
        let Some(window) = window else {
            return Ok((None, Vec::new()));
        };
        if window == 0 {
            return Err(LlamaError::config(
                origin,
                "sliding_window must be positive",
            ));
        }
        let sliding: Vec<usize> = match &hf.layer_types {
            // `MistralModel` puts every layer behind the window whatever `layer_types` says.
            _ if family == Family::Mistral => (0..layers).collect(),
            Some(types) => {
                if types.len() != layers {
                    return Err(LlamaError::config(
                        origin,
                        format!(
                            "layer_types lists {} layers, num_hidden_layers is {layers}",
                            types.len()
                        ),
                    ));
                }
                let mut sliding = Vec::new();
                for (layer, kind) in types.iter().enumerate() {
                    match kind.as_str() {
                        "sliding_attention" => sliding.push(layer),
                        "full_attention" => {}
                        other => {
                            return Err(LlamaError::config(
                                origin,
                                format!(
                                    "layer_types[{layer}] is `{other}` (supported: \
                                     full_attention, sliding_attention)"
                                ),
                            ))
                        }
                    }
                }
                sliding
            }
            None => (hf.max_window_layers.unwrap_or(0)..layers).collect(),
        };
        Ok((Some(window), sliding))
    }

    /// The Hugging Face `config.json` of this configuration, which [`LlamaConfig::from_hf_json`]
    /// and `transformers` read back as the same model (what `peft merge` writes beside the
    /// weights of a model that came without one, e.g. from a GGUF file).
    ///
    /// # Errors
    /// A configuration `config.json` cannot express: explicit RoPE frequency factors (a GGUF's
    /// `rope_freqs.weight`), or switches its family does not have (an output-only bias, q/k
    /// norms outside Qwen3, Qwen2 without its q/k/v biases).
    pub fn to_hf_json(&self) -> Result<Value> {
        let refuse = |why: &str| Err(LlamaError::config("config.json", why.to_string()));
        if self.rope_freq_factors.is_some() {
            return refuse(
                "explicit RoPE frequency factors (a GGUF's rope_freqs.weight) have no \
                 config.json form",
            );
        }
        match self.family {
            Family::Qwen2 if !self.attention_bias || self.o_proj_bias => {
                return refuse("a Qwen2 config.json always means q/k/v biases and no output bias")
            }
            Family::Llama | Family::Mistral | Family::Qwen3
                if self.attention_bias != self.o_proj_bias =>
            {
                return refuse("attention_bias covers the output projection too in this family")
            }
            _ => {}
        }
        if self.qk_norm != (self.family == Family::Qwen3) {
            return refuse("q/k norms come with Qwen3 and only Qwen3");
        }
        let eos: Value = match self.eos_token_ids.as_slice() {
            [one] => (*one).into(),
            many => many.into(),
        };
        let mut json = serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        });
        let fields = json
            .as_object_mut()
            .unwrap_or_else(|| unreachable!("an object"));
        if self.family != Family::Qwen2 {
            fields.insert("attention_bias".into(), self.attention_bias.into());
        }
        if self.family == Family::Llama {
            fields.insert("mlp_bias".into(), self.mlp_bias.into());
        }
        if let Some(scaling) = &self.rope_scaling {
            fields.insert(
                "rope_scaling".into(),
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": scaling.factor,
                    "low_freq_factor": scaling.low_freq_factor,
                    "high_freq_factor": scaling.high_freq_factor,
                    "original_max_position_embeddings": scaling.original_max_position_embeddings,
                }),
            );
        }
        if let Some(window) = self.sliding_window {
            fields.insert("sliding_window".into(), window.into());
            if matches!(self.family, Family::Qwen2 | Family::Qwen3) {
                fields.insert("use_sliding_window".into(), true.into());
                let types: Vec<&str> = (0..self.num_hidden_layers)
                    .map(|l| {
                        if self.is_sliding(l) {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                fields.insert("layer_types".into(), types.into());
            }
        }
        Ok(json)
    }

    /// Whether `layer` attends through the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_window_layers.contains(&layer)
    }

    /// Reads a Hugging Face `config.json`.
    ///
    /// # Errors
    /// See [`LlamaConfig::from_hf_json`]; also I/O errors.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_hf_json(&read_json(path)?, &path.display().to_string())
    }

    /// Builds a configuration from Meta's `params.json`.
    ///
    /// `params.json` does not always state the vocabulary or feed-forward width; pass the values
    /// read from the checkpoint's `tok_embeddings.weight` and `layers.0.feed_forward.w1.weight`
    /// shapes, which take precedence over the formula Meta's code uses.
    ///
    /// # Errors
    /// Malformed JSON or inconsistent values.
    pub fn from_meta_json(
        text: &str,
        origin: &str,
        vocab_from_weights: Option<usize>,
        ffn_from_weights: Option<usize>,
    ) -> Result<Self> {
        let params: MetaParams = serde_json::from_str(text).map_err(|e| LlamaError::Json {
            path: origin.into(),
            message: e.to_string(),
        })?;
        let vocab_size = match (vocab_from_weights, params.vocab_size) {
            (Some(v), _) => v,
            (None, Some(v)) if v > 0 => v as usize,
            _ => return Err(LlamaError::config(origin, "vocab_size is not known")),
        };
        let intermediate_size = match ffn_from_weights {
            Some(f) => f,
            None => {
                // Meta's FeedForward: 2/3 of 4·dim, times the multiplier, rounded up to multiple_of.
                let multiple_of = params.multiple_of.unwrap_or(256).max(1);
                let too_large = || LlamaError::config(origin, "dim is too large");
                let mut hidden = params.dim.checked_mul(8).ok_or_else(too_large)? / 3;
                if let Some(m) = params.ffn_dim_multiplier {
                    hidden = (m * hidden as f64) as usize;
                }
                hidden
                    .div_ceil(multiple_of)
                    .checked_mul(multiple_of)
                    .ok_or_else(too_large)?
            }
        };
        if params.n_heads == 0 || !params.dim.is_multiple_of(params.n_heads) {
            return Err(LlamaError::config(
                origin,
                "dim must be a multiple of n_heads",
            ));
        }
        let rope_scaling = (params.use_scaled_rope == Some(true)).then_some(Llama3RopeScaling {
            factor: params.rope_scaling_factor.unwrap_or(8.0),
            low_freq_factor: params.rope_low_freq_factor.unwrap_or(1.0),
            high_freq_factor: params.rope_high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: params
                .rope_original_max_position_embeddings
                .unwrap_or(8192),
        });
        let config = Self {
            vocab_size,
            hidden_size: params.dim,
            intermediate_size,
            num_hidden_layers: params.n_layers,
            num_attention_heads: params.n_heads,
            num_key_value_heads: params.n_kv_heads.unwrap_or(params.n_heads),
            head_dim: params.dim / params.n_heads,
            rms_norm_eps: params.norm_eps.unwrap_or(1e-6),
            rope_theta: params.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: false,
            max_position_embeddings: 2048,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            family: Family::Llama,
            attention_bias: false,
            o_proj_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
            sliding_window_layers: Vec::new(),
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks that the sizes are consistent.
    ///
    /// # Errors
    /// Zero sizes, or a query head count that is not a multiple of the key/value head count.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(LlamaError::config(
                    origin,
                    format!("{name} must be positive"),
                ));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(LlamaError::config(
                origin,
                format!(
                    "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if let Some(&layer) = self
            .sliding_window_layers
            .iter()
            .find(|&&layer| layer >= self.num_hidden_layers)
        {
            return Err(LlamaError::config(
                origin,
                format!(
                    "sliding-window layer {layer} does not exist in {} layers",
                    self.num_hidden_layers
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(LlamaError::config(origin, "head_dim must be even for RoPE"));
        }
        if let Some(factors) = &self.rope_freq_factors {
            if factors.len() != self.head_dim / 2 {
                return Err(LlamaError::config(
                    origin,
                    format!(
                        "{} RoPE frequency factors for a head width of {} (needs {})",
                        factors.len(),
                        self.head_dim,
                        self.head_dim / 2
                    ),
                ));
            }
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(LlamaError::config(
                    origin,
                    format!("RoPE frequency factor {bad} is not a positive finite number"),
                ));
            }
            if self.rope_scaling.is_some() {
                return Err(LlamaError::config(
                    origin,
                    "both RoPE scaling parameters and explicit frequency factors are given",
                ));
            }
        }
        // Sizes whose products overflow would wrap (or panic) in every shape computed from them.
        let d = self.hidden_size;
        let products = [
            self.num_attention_heads.checked_mul(self.head_dim),
            self.num_key_value_heads.checked_mul(self.head_dim),
            self.vocab_size.checked_mul(d),
            self.intermediate_size.checked_mul(d),
        ];
        if products
            .iter()
            .any(|p| p.and_then(|p| p.checked_mul(4)).is_none())
            || self.checked_num_parameters().is_none()
        {
            return Err(LlamaError::config(
                origin,
                "the sizes are too large: the parameter count overflows",
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(LlamaError::config(
                origin,
                format!(
                    "rms_norm_eps must be finite and not negative, found {}",
                    self.rms_norm_eps
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(LlamaError::config(
                origin,
                format!("rope_theta must be positive, found {}", self.rope_theta),
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            let factors = [
                scaling.factor,
                scaling.low_freq_factor,
                scaling.high_freq_factor,
            ];
            if factors.iter().any(|f| !(f.is_finite() && *f > 0.0))
                || scaling.low_freq_factor == scaling.high_freq_factor
                || scaling.original_max_position_embeddings == 0
            {
                return Err(LlamaError::config(
                    origin,
                    format!(
                        "llama3 rope scaling needs positive factors, distinct low and high \
                         frequency factors and a positive original context, found {scaling:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Names accepted by [`LlamaConfig::preset`].
    pub const PRESETS: [&'static str; 12] = [
        "llama-7b",
        "llama-13b",
        "llama-30b",
        "llama-65b",
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "llama-3-8b",
        "llama-3-70b",
        "llama-3.1-8b",
        "llama-3.2-1b",
        "llama-3.2-3b",
    ];

    /// The published architecture of a LLaMA model, by name (see [`LlamaConfig::PRESETS`]).
    ///
    /// # Errors
    /// An unknown name.
    pub fn preset(name: &str) -> Result<Self> {
        let llama1 = |d: usize, n: usize, h: usize, f: usize| {
            LlamaConfig::new(32000, d, f, n, h, h, d / h).with_rms_norm_eps(1e-6)
        };
        let llama3 = |d: usize, n: usize, h: usize, f: usize| {
            LlamaConfig::new(128256, d, f, n, h, 8, d / h)
                .with_rms_norm_eps(1e-5)
                .with_rope_theta(500000.0)
                .with_max_position_embeddings(8192)
                .with_bos_token_id(Some(128000))
                .with_eos_token_ids(vec![128001, 128009])
        };
        let scaled = |factor: f64| {
            Some(Llama3RopeScaling {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            })
        };
        let config = match name {
            "llama-7b" => llama1(4096, 32, 32, 11008),
            "llama-13b" => llama1(5120, 40, 40, 13824),
            "llama-30b" => llama1(6656, 60, 52, 17920),
            "llama-65b" => llama1(8192, 80, 64, 22016),
            "llama-2-7b" => llama1(4096, 32, 32, 11008)
                .with_rms_norm_eps(1e-5)
                .with_max_position_embeddings(4096),
            "llama-2-13b" => llama1(5120, 40, 40, 13824)
                .with_rms_norm_eps(1e-5)
                .with_max_position_embeddings(4096),
            "llama-2-70b" => LlamaConfig::new(32000, 8192, 28672, 80, 64, 8, 128)
                .with_rms_norm_eps(1e-5)
                .with_max_position_embeddings(4096),
            "llama-3-8b" => llama3(4096, 32, 32, 14336),
            "llama-3-70b" => llama3(8192, 80, 64, 28672),
            "llama-3.1-8b" => llama3(4096, 32, 32, 14336)
                .with_rope_scaling(scaled(8.0))
                .with_max_position_embeddings(131072),
            "llama-3.2-1b" => llama3(2048, 16, 32, 8192)
                .with_tie_word_embeddings(true)
                .with_rope_scaling(scaled(32.0))
                .with_max_position_embeddings(131072),
            "llama-3.2-3b" => llama3(3072, 28, 24, 8192)
                .with_tie_word_embeddings(true)
                .with_rope_scaling(scaled(32.0))
                .with_max_position_embeddings(131072),
            other => {
                return Err(LlamaError::config(
                    other,
                    format!(
                        "unknown preset; known presets: {}",
                        Self::PRESETS.join(", ")
                    ),
                ))
            }
        };
        Ok(config)
    }

    /// Width of all query heads together (`H · head_dim`).
    pub fn query_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together (`H_kv · head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Number of parameters of the whole model, computed without allocating it.
    ///
    /// # Panics
    /// When the count overflows `usize`, which [`LlamaConfig::validate`] refuses.
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters()
            .expect("parameter count overflows usize")
    }

    fn checked_num_parameters(&self) -> Option<usize> {
        let d = self.hidden_size;
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let attention = d
            .checked_mul(q)?
            .checked_add(d.checked_mul(kv)?)?
            .checked_mul(2)?;
        let qkv_bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let o_bias = if self.o_proj_bias { d } else { 0 };
        let mlp_bias = if self.mlp_bias {
            self.intermediate_size.checked_mul(2)?.checked_add(d)?
        } else {
            0
        };
        let qk_norms = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let attention = attention
            .checked_add(qkv_bias)?
            .checked_add(o_bias)?
            .checked_add(qk_norms)?;
        let mlp = d
            .checked_mul(self.intermediate_size)?
            .checked_mul(3)?
            .checked_add(mlp_bias)?;
        let norms = d.checked_mul(2)?;
        let embed = self.vocab_size.checked_mul(d)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let layers = self
            .num_hidden_layers
            .checked_mul(attention.checked_add(mlp)?.checked_add(norms)?)?;
        embed.checked_add(layers)?.checked_add(d)?.checked_add(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_7b_preset_has_6_7_billion_parameters() {
        let config = LlamaConfig::preset("llama-7b").unwrap();
        assert_eq!(config.num_parameters(), 6_738_415_616);
    }

    #[test]
    fn llama_3_8b_preset_has_8_billion_parameters() {
        let config = LlamaConfig::preset("llama-3-8b").unwrap();
        assert_eq!(config.num_parameters(), 8_030_261_248);
    }

    #[test]
    fn rope_theta_is_read_from_rope_parameters() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,
              "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16}}"#;
        let config = LlamaConfig::from_hf_json(text, "test").unwrap();
        assert_eq!(config.rope_theta, 500000.0);
        assert_eq!(config.rope_scaling.unwrap().factor, 8.0);
        assert_eq!(config.num_key_value_heads, 2);
        assert_eq!(config.head_dim, 4);
    }

    #[test]
    fn non_llama_model_type_is_rejected_with_its_name() {
        let text = r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2}"#;
        let err = LlamaConfig::from_hf_json(text, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpt2") && err.contains("cfg.json"), "{err}");
    }

    #[test]
    fn unsupported_model_type_error_lists_the_supported_ones() {
        let text = r#"{"model_type":"gemma","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2}"#;
        let err = LlamaConfig::from_hf_json(text, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`gemma`") && err.contains("llama, mistral, qwen2, qwen3"),
            "{err}"
        );
        // Without a model_type, the architectures entry decides.
        let text = r#"{"architectures":["Qwen3ForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#;
        let config = LlamaConfig::from_hf_json(text, "cfg.json").unwrap();
        assert!(config.family == Family::Qwen3 && config.qk_norm);
    }

    #[test]
    fn sliding_layers_follow_transformers_rules() {
        let config = |extra: &str| {
            let text = format!(
                r#"{{"vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":4,"num_attention_heads":2,"sliding_window":3,{extra}}}"#
            );
            LlamaConfig::from_hf_json(&text, "cfg.json")
        };
        let sliding = |c: &LlamaConfig| (0..4).filter(|&l| c.is_sliding(l)).collect::<Vec<_>>();
        // Qwen2 without use_sliding_window ignores the window (Qwen2.5 files carry one).
        let off = config(r#""model_type":"qwen2","max_window_layers":1"#).unwrap();
        assert_eq!((off.sliding_window, sliding(&off)), (None, vec![]));
        let on = config(r#""model_type":"qwen2","use_sliding_window":true,"max_window_layers":1"#)
            .unwrap();
        assert_eq!(sliding(&on), [1, 2, 3]);
        let listed = config(
            r#""model_type":"qwen3","use_sliding_window":true,
            "layer_types":["sliding_attention","full_attention","sliding_attention","full_attention"]"#,
        )
        .unwrap();
        assert_eq!(sliding(&listed), [0, 2]);
        // Mistral puts every layer behind its window whatever layer_types says.
        let mistral = config(
            r#""model_type":"mistral","layer_types":["full_attention","full_attention",
            "full_attention","full_attention"]"#,
        )
        .unwrap();
        assert_eq!(sliding(&mistral), [0, 1, 2, 3]);
        let llama = config(r#""model_type":"llama""#).unwrap();
        assert_eq!(llama.sliding_window, None);
        let wrong = config(r#""model_type":"qwen2","use_sliding_window":true,"layer_types":["x"]"#)
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("layer_types lists 1 layers"), "{wrong}");
    }

    /// Every family's configuration survives `to_hf_json` → `from_hf_json`, and what
    /// `config.json` cannot say is refused.
    #[test]
    fn configurations_round_trip_through_config_json() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        let mut seen = 0;
        for family in ["mistral", "qwen2", "qwen3", "llama-bias"] {
            let path = fixtures
                .join("families")
                .join(family)
                .join("model/config.json");
            let config = LlamaConfig::from_hf_file(&path).unwrap();
            let json = config.to_hf_json().unwrap().to_string();
            assert_eq!(
                LlamaConfig::from_hf_json(&json, family).unwrap(),
                config,
                "{family}"
            );
            seen += 1;
        }
        assert_eq!(seen, 4);
        let llama3 = LlamaConfig::new(32, 64, 64, 2, 4, 2, 16)
            .with_rope_scaling(Some(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }))
            .with_eos_token_ids(vec![2, 7])
            .with_bos_token_id(None)
            .with_tie_word_embeddings(true);
        let json = llama3.to_hf_json().unwrap().to_string();
        assert_eq!(LlamaConfig::from_hf_json(&json, "llama3").unwrap(), llama3);
        let factors = llama3
            .clone()
            .with_rope_scaling(None)
            .with_rope_freq_factors(Some(vec![1.0; 8]));
        assert!(factors
            .to_hf_json()
            .unwrap_err()
            .to_string()
            .contains("rope_freqs"));
        let output_bias_only = llama3.with_o_proj_bias(true);
        assert!(output_bias_only.to_hf_json().is_err());
    }

    #[test]
    fn biases_and_qk_norms_are_counted_as_parameters() {
        let plain = LlamaConfig::new(10, 8, 16, 1, 2, 1, 4);
        let qwen2 = plain.clone().with_attention_bias(true);
        assert_eq!(qwen2.num_parameters() - plain.num_parameters(), 8 + 2 * 4);
        let qwen3 = plain.clone().with_qk_norm(true);
        assert_eq!(qwen3.num_parameters() - plain.num_parameters(), 2 * 4);
        let biased = plain.clone().with_o_proj_bias(true).with_mlp_bias(true);
        assert_eq!(
            biased.num_parameters() - plain.num_parameters(),
            8 + 2 * 16 + 8
        );
    }

    #[test]
    fn indivisible_head_counts_are_rejected() {
        let text = r#"{"vocab_size":10,"hidden_size":12,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#;
        let err = LlamaConfig::from_hf_json(text, "cfg")
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn meta_params_give_llama_7b_ffn_width() {
        let text = r#"{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
            "norm_eps": 1e-06, "vocab_size": -1}"#;
        let config = LlamaConfig::from_meta_json(text, "params.json", Some(32000), None).unwrap();
        assert_eq!(config, LlamaConfig::preset("llama-7b").unwrap());
    }
}

//! Options shared by the commands that load a model and, optionally, an adapter.

use std::path::PathBuf;

use peft_core::{load_adapter, AnyAdapter};
use peft_llama::PrefixFromTokens;
use peft_llama::{Llama, LlamaLoader, LlamaTokenizer, Quantization, WeightDtype};

use crate::backend::{device, Inference};
use crate::AnyResult;

/// The vendored default model (stories260k), found relative to this crate's sources so that
/// `cargo run` works on a fresh clone without any download.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k")
}

/// `--model`, `--dtype` and `--quantize`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (Hugging Face or Meta layout) or a GGUF file (llama.cpp, Ollama);
    /// defaults to the built-in stories260k.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dtype of the frozen weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: WeightDtype,
    #[arg(long, default_value = "none", help = QUANTIZE_HELP)]
    pub quantize: Quantization,
}

/// `--quantize`'s help, shared by every command that loads a model.
pub const QUANTIZE_HELP: &str = "How the decoder's projections are held: none (dense, in \
    --dtype), nf4 (4-bit NormalFloat with double quantization, QLoRA's format) or q8_0 \
    (llama.cpp's 8-bit blocks), quantized on load; gguf keeps a GGUF file's quantized blocks as \
    they are. Embeddings, norms and the output head stay dense";

impl ModelArgs {
    /// The model directory or GGUF file.
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_dir)
    }

    /// Loads the model for inference.
    pub fn load(&self) -> AnyResult<Llama<Inference>> {
        Ok(self.loader().load(&device())?)
    }

    /// The loader the flags describe.
    pub fn loader(&self) -> LlamaLoader {
        LlamaLoader::new(self.dir())
            .with_dtype(self.dtype)
            .with_quantization(self.quantize)
    }
}

/// `--adapter` and `--adapter-len`.
#[derive(clap::Args, Debug, Clone)]
pub struct AdapterArgs {
    /// Adapter: a PEFT directory, a peft-rs directory, an official LLaMA-Adapter `.pth`, or a
    /// `peft train` output directory (its `adapter/` is used).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompts per layer of an official LLaMA-Adapter checkpoint (it stores no config).
    #[arg(long, default_value_t = 10)]
    pub adapter_len: usize,
}

/// The adapter a `--adapter` path names: the path itself, or for a training run's output
/// directory (no adapter files of its own, an `adapter/` that has them) that `adapter/`.
pub fn resolve_adapter_path(path: &std::path::Path) -> PathBuf {
    let holds_adapter = |dir: &std::path::Path| {
        [
            peft_core::peft_format::CONFIG_FILE,
            peft_core::native_format::CONFIG_FILE,
        ]
        .iter()
        .any(|file| dir.join(file).is_file())
    };
    let inner = path.join("adapter");
    if path.is_dir() && !holds_adapter(path) && holds_adapter(&inner) {
        inner
    } else {
        path.to_path_buf()
    }
}

impl AdapterArgs {
    /// The adapter path, a training run's output directory resolved to its `adapter/`.
    pub fn path(&self) -> Option<PathBuf> {
        self.adapter.as_deref().map(resolve_adapter_path)
    }

    /// Loads the adapter, if one was given, for `model`.
    pub fn load(&self, model: &Llama<Inference>) -> AnyResult<Option<AnyAdapter<Inference>>> {
        match self.path() {
            Some(path) => Ok(Some(load_adapter(
                &path,
                model,
                &peft_core::LoadOptions::default().with_adapter_len(self.adapter_len),
                &device(),
            )?)),
            None => Ok(None),
        }
    }
}

/// `--method`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// LLaMA-Adapter's adaption prompts.
    #[value(alias = "adaption_prompt", alias = "llama-adapter")]
    AdaptionPrompt,
    /// LoRA.
    Lora,
    /// Prefix tuning.
    #[value(alias = "prefix-tuning")]
    Prefix,
}

/// `--gate-shape`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateShapeArg {
    /// One gate per head (the official LLaMA-Adapter).
    PerHead,
    /// One gate per layer (Hugging Face PEFT).
    Scalar,
}

/// `--gate-activation`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateActivationArg {
    /// tanh (the official training code).
    Tanh,
    /// None (PEFT).
    Identity,
}

/// `--prefix-init`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixInit {
    /// N(0, 1), as PEFT.
    Random,
    /// The base model's keys and values of real tokens (Li & Liang).
    Text,
}

/// The method and settings of a new adapter (`peft train`).
#[derive(clap::Args, Debug, Clone)]
pub struct AdapterChoice {
    /// The method.
    #[arg(long, value_enum, default_value_t = Method::AdaptionPrompt)]
    pub method: Method,
    /// Adaption prompts per layer (K).
    #[arg(long, default_value_t = 10)]
    pub adapter_len: usize,
    /// Adapted layers from the top (L); default 30, or all but the bottom two on smaller models.
    #[arg(long)]
    pub adapter_layers: Option<usize>,
    /// Gates per layer: per-head (official LLaMA-Adapter) or scalar (Hugging Face PEFT).
    #[arg(long, value_enum, default_value_t = GateShapeArg::PerHead)]
    pub gate_shape: GateShapeArg,
    /// Gate activation: tanh (official training code) or identity (PEFT).
    #[arg(long, value_enum, default_value_t = GateActivationArg::Tanh)]
    pub gate_activation: GateActivationArg,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// LoRA scaling numerator. The default, 16 (2·r, the common recipe), differs on purpose from
    /// the library's `LoraConfig` default, 8, which is Hugging Face PEFT's.
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// LoRA target modules, comma-separated (q_proj, ..., down_proj, or all-linear).
    #[arg(long, default_value = "q_proj,v_proj")]
    pub target_modules: String,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Rank-stabilised LoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub use_rslora: bool,
    /// Prefix tuning's virtual tokens.
    #[arg(long, default_value_t = 10)]
    pub num_virtual_tokens: usize,
    /// Reparameterise prefixes through an MLP while training.
    #[arg(long)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP.
    #[arg(long, default_value_t = 512)]
    pub encoder_hidden_size: usize,
    /// How prefixes start: random (N(0, 1), as PEFT) or text (the base model's keys and values
    /// of the first --num-virtual-tokens tokens of --prefix-init-text, as Li & Liang), which
    /// starts training from the base model reading that text first.
    #[arg(long, value_enum, default_value_t = PrefixInit::Random)]
    pub prefix_init: PrefixInit,
    /// The text for --prefix-init text (its tokens, BOS included, are cut to the prefix length).
    #[arg(long, default_value = ALPACA_PREAMBLE)]
    pub prefix_init_text: String,
}

/// The first sentences of both Alpaca templates.
const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. \
    Write a response that appropriately completes the request.";

impl AdapterChoice {
    /// A freshly initialised adapter for `base`; unlike [`AdapterChoice::init`] it can
    /// initialise prefixes from text (`--prefix-init text`).
    pub fn init_for<B: burn::tensor::backend::Backend>(
        &self,
        base: &Llama<B>,
        tokenizer: &LlamaTokenizer,
    ) -> AnyResult<AnyAdapter<B>> {
        let prefix = self.method == Method::Prefix;
        match (prefix, self.prefix_init) {
            (_, PrefixInit::Random) => self.init(base, &base.device()),
            (true, PrefixInit::Text) => {
                let ids = tokenizer.encode(&self.prefix_init_text, true)?;
                let count = self.num_virtual_tokens;
                if ids.len() < count {
                    return Err(format!(
                        "--prefix-init-text has {} tokens, --num-virtual-tokens needs {count}",
                        ids.len()
                    )
                    .into());
                }
                Ok(peft_core::PrefixTuningConfig::new()
                    .with_num_virtual_tokens(count)
                    .with_prefix_projection(self.prefix_projection)
                    .with_encoder_hidden_size(self.encoder_hidden_size)
                    .init_from_tokens(base, &ids[..count])?
                    .into())
            }
            (false, PrefixInit::Text) => {
                Err("--prefix-init text applies to --method prefix only".into())
            }
        }
    }

    /// The adaption prompt the flags describe for a model of `num_hidden_layers` layers: the
    /// one rule for the text and the multimodal adapter.
    pub fn adaption_prompt_config(
        &self,
        num_hidden_layers: usize,
    ) -> AnyResult<peft_core::AdaptionPromptConfig> {
        use peft_core::{AdaptionPromptConfig, GateActivation, GateShape};
        let gate_shape = match self.gate_shape {
            GateShapeArg::PerHead => GateShape::PerHead,
            GateShapeArg::Scalar => GateShape::Scalar,
        };
        let gate_activation = match self.gate_activation {
            GateActivationArg::Tanh => GateActivation::Tanh,
            GateActivationArg::Identity => GateActivation::Identity,
        };
        let layers = self
            .adapter_layers
            .unwrap_or_else(|| 30.min(num_hidden_layers.saturating_sub(2)).max(1));
        Ok(AdaptionPromptConfig::new()
            .with_adapter_len(self.adapter_len)
            .with_adapter_layers(layers)
            .with_gate_shape(gate_shape)
            .with_gate_activation(gate_activation))
    }

    /// A freshly initialised adapter for `model`.
    pub fn init<B: burn::tensor::backend::Backend>(
        &self,
        model: &dyn peft_core::AdaptableModel<B>,
        device: &B::Device,
    ) -> AnyResult<AnyAdapter<B>> {
        use peft_core::{LoraConfig, PrefixTuningConfig, TargetModules};
        let num_hidden_layers = model.geometry().num_hidden_layers;
        Ok(match self.method {
            Method::AdaptionPrompt => self
                .adaption_prompt_config(num_hidden_layers)?
                .init::<B>(model, device)?
                .into(),
            Method::Lora => {
                let names: Vec<&str> = self.target_modules.split(',').map(str::trim).collect();
                LoraConfig::new()
                    .with_r(self.r)
                    .with_lora_alpha(self.lora_alpha)
                    .with_target_modules(TargetModules::parse(&names)?)
                    .with_lora_dropout(self.lora_dropout)
                    .with_use_rslora(self.use_rslora)
                    .init::<B>(model, device)?
                    .into()
            }
            Method::Prefix => PrefixTuningConfig::new()
                .with_num_virtual_tokens(self.num_virtual_tokens)
                .with_prefix_projection(self.prefix_projection)
                .with_encoder_hidden_size(self.encoder_hidden_size)
                .init::<B>(model, device)?
                .into(),
        })
    }
}

//! Command-line parsing and the commands.

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Tensor};
use clap::{Parser, Subcommand};
use peft_llama::{
    generate, GenerationConfig, Llama, LlamaLoader, LlamaTokenizer, NoHooks, TokenBatch, WeightDtype,
};
use safetensors::{Dtype, SafeTensors};

use crate::backend::{device, Inference};

type AnyResult<T> = Result<T, Box<dyn Error>>;

/// The vendored default model (stories260k), found relative to this crate's sources so that
/// `cargo run` works on a fresh clone without any download.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k")
}

/// Parameter-efficient fine-tuning of LLaMA models.
#[derive(Parser, Debug)]
#[command(name = "peft", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Continue a prompt.
    Generate(GenerateArgs),
    /// Write the logits of given token ids (for checking numerics against other frameworks).
    Logits(LogitsArgs),
    /// Describe a model directory.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// Model directory (Hugging Face or Meta layout); defaults to the built-in stories260k.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Dtype of the frozen weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: WeightDtype,
}

impl ModelArgs {
    fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_dir)
    }

    fn load(&self) -> AnyResult<Llama<Inference>> {
        Ok(LlamaLoader::new(self.dir()).with_dtype(self.dtype).load(&device())?)
    }
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text; repeat the flag to generate for several prompts in one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold (1 disables).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON object per prompt and line: prompt, prompt_ids, generated_ids, text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors file with `input_ids` [batch, seq] (int32 or int64) and optional
    /// `attention_mask` (1 = real token, right padding).
    #[arg(long)]
    input: PathBuf,
    /// Where to write float32 `logits` [batch, seq, vocab].
    #[arg(long)]
    output: PathBuf,
}

#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// Model directory.
    path: Option<PathBuf>,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> AnyResult<()> {
    match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Logits(args) => run_logits(args),
        Command::Inspect(args) => run_inspect(args),
    }
}

fn run_generate(args: GenerateArgs) -> AnyResult<()> {
    let dir = args.model.dir();
    let model = args.model.load()?;
    let tokenizer = LlamaTokenizer::from_dir(&dir)?;
    let prompts = args
        .prompt
        .iter()
        .map(|p| tokenizer.encode(p, true))
        .collect::<Result<Vec<_>, _>>()?;
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        eos_token_ids: model.config.eos_token_ids.clone(),
        use_cache: true,
    };
    let results = generate(&model, &NoHooks, &prompts, &config)?;
    for (prompt, result) in args.prompt.iter().zip(results) {
        let completion = tokenizer.decode(&result.generated_ids)?;
        if args.json {
            let line = serde_json::json!({
                "prompt": prompt,
                "prompt_ids": result.prompt_ids,
                "generated_ids": result.generated_ids,
                "text": completion,
            });
            println!("{line}");
        } else {
            let full: Vec<u32> = result.prompt_ids.iter().chain(&result.generated_ids).copied().collect();
            println!("{}", tokenizer.decode(&full)?);
        }
    }
    Ok(())
}

fn read_int_tensor(file: &SafeTensors, name: &str, path: &Path) -> AnyResult<Option<(Vec<i64>, Vec<usize>)>> {
    let view = match file.tensor(name) {
        Ok(view) => view,
        Err(_) => return Ok(None),
    };
    let bytes = view.data();
    let values: Vec<i64> = match view.dtype() {
        Dtype::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect(),
        other => {
            return Err(format!("{}: `{name}` has dtype {other:?}, expected int32 or int64", path.display()).into())
        }
    };
    Ok(Some((values, view.shape().to_vec())))
}

fn run_logits(args: LogitsArgs) -> AnyResult<()> {
    let model = args.model.load()?;
    let bytes = std::fs::read(&args.input).map_err(|e| format!("{}: {e}", args.input.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", args.input.display()))?;
    let (ids, shape) = read_int_tensor(&file, "input_ids", &args.input)?
        .ok_or_else(|| format!("{}: no `input_ids` tensor", args.input.display()))?;
    if shape.len() != 2 {
        return Err(format!("{}: `input_ids` must be [batch, seq], found {shape:?}", args.input.display()).into());
    }
    let (batch, seq) = (shape[0], shape[1]);
    let mask = match read_int_tensor(&file, "attention_mask", &args.input)? {
        Some((values, mask_shape)) if mask_shape == shape => Some(values.iter().map(|&v| v != 0).collect()),
        Some((_, mask_shape)) => {
            return Err(format!("`attention_mask` has shape {mask_shape:?}, `input_ids` {shape:?}").into())
        }
        None => None,
    };
    let ids = ids
        .iter()
        .map(|&id| u32::try_from(id).map_err(|_| format!("negative or huge token id {id}")))
        .collect::<Result<Vec<_>, _>>()?;
    let tokens = TokenBatch { ids, batch, seq, mask };
    let logits = model.forward(&tokens, &NoHooks, None)?;
    write_logits(&args.output, logits)
}

fn write_logits<B: Backend>(path: &Path, logits: Tensor<B, 3>) -> AnyResult<()> {
    let shape = logits.dims().to_vec();
    let values = logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, shape, &bytes)?;
    let mut tensors = HashMap::new();
    tensors.insert("logits".to_string(), view);
    let serialized = safetensors::serialize(&tensors, None)?;
    let temporary = path.with_extension("safetensors.partial");
    std::fs::write(&temporary, serialized).map_err(|e| format!("{}: {e}", temporary.display()))?;
    std::fs::rename(&temporary, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn run_inspect(args: InspectArgs) -> AnyResult<()> {
    let dir = args.path.unwrap_or_else(default_model_dir);
    let loader = LlamaLoader::new(&dir);
    let layout = loader.layout()?;
    let model: Llama<Inference> = loader.load(&device())?;
    let c = &model.config;
    println!("model        {}", dir.display());
    println!("layout       {layout:?}");
    println!("architecture LLaMA: {} layers, hidden {}, {} heads ({} key/value heads, head_dim {}), FFN {}, vocab {}",
        c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size);
    println!("rope         theta {}, scaling {:?}", c.rope_theta, c.rope_scaling);
    println!("embeddings   {}", if c.tie_word_embeddings { "tied" } else { "separate output head" });
    println!("parameters   {}", c.num_parameters());
    println!("dtype        {:?}", model.dtype());
    println!("loaded       every tensor matched the configuration");
    Ok(())
}

//! `peft generate`: continue prompts, optionally with an adapter.

use peft_core::Adapter as _;
use peft_llama::{generate, GenerationConfig, LlamaTokenizer, NoHooks};

use crate::model_args::{AdapterArgs, ModelArgs};
use crate::template::{PromptBuilder, Template};
use crate::AnyResult;

/// Continue a prompt.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Prompt text; repeat the flag to generate for several prompts in one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Optional input of the instruction (after it in the Alpaca template; after a blank line
    /// in the user's turn of the chat template).
    #[arg(long)]
    input: Option<String>,
    /// Wrap each prompt in a template: none, alpaca, or the model's chat template (`chat`).
    #[arg(long, value_enum, default_value_t = Template::None)]
    template: Template,
    /// The system turn of the chat template (without it, the template's own default).
    #[arg(long)]
    system: Option<String>,
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
    /// An image (PNG or JPEG) for a multimodal LLaMA-Adapter (`--adapter` saved by
    /// `peft train --vision-model`); needs `--vision-model`.
    #[arg(long, requires = "vision_model")]
    image: Option<std::path::PathBuf>,
    /// The CLIP vision tower the multimodal adapter was trained with.
    #[arg(long, requires = "image")]
    vision_model: Option<std::path::PathBuf>,
}

/// Runs `peft generate`.
pub fn run(args: GenerateArgs) -> AnyResult<()> {
    let dir = args.model.dir();
    let model = args.model.load()?;
    let adapter = match &args.image {
        Some(_) => None,
        None => args.adapter.load(&model)?,
    };
    let tokenizer = LlamaTokenizer::load(&dir)?;
    let builder = PromptBuilder::new(args.template, args.system.clone(), &dir, &tokenizer)?;
    let input = args.input.as_deref().unwrap_or("");
    let (texts, prompts): (Vec<String>, Vec<Vec<u32>>) = args
        .prompt
        .iter()
        .map(|p| builder.build(p, input, &tokenizer))
        .collect::<AnyResult<Vec<_>>>()?
        .into_iter()
        .unzip();
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        eos_token_ids: model.config.eos_token_ids.clone(),
        use_cache: true,
    };
    let started = std::time::Instant::now();
    let results = match (&args.image, &args.vision_model) {
        (Some(image), Some(vision)) => {
            let adapter_dir = args
                .adapter
                .path()
                .ok_or("--image needs --adapter (a multimodal adapter directory)")?;
            crate::visual::generate_with_image(
                &model,
                &adapter_dir,
                vision,
                image,
                &prompts,
                &config,
            )?
        }
        _ => {
            let hooks = match &adapter {
                Some(adapter) => adapter.hooks(&model),
                None => Box::new(NoHooks),
            };
            generate(&model, hooks.as_ref(), &prompts, &config)?
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let generated: usize = results.iter().map(|r| r.generated_ids.len()).sum();
    // On stderr: stdout carries only the generations (or their JSON lines).
    let prompts = match results.len() {
        1 => "1 prompt".to_string(),
        n => format!("{n} prompts"),
    };
    eprintln!(
        "{generated} tokens generated for {prompts} in {seconds:.2} s ({:.1} tokens/s, prompt \
         reading included)",
        generated as f64 / seconds.max(1e-9)
    );
    for (prompt, result) in texts.iter().zip(results) {
        let completion = tokenizer.decode(&result.generated_ids)?;
        if args.json {
            let line = serde_json::json!({
                "prompt": prompt,
                "prompt_ids": result.prompt_ids,
                "generated_ids": result.generated_ids,
                "text": completion,
            });
            println!("{line}");
        } else if args.template == Template::None {
            let full: Vec<u32> = result
                .prompt_ids
                .iter()
                .chain(&result.generated_ids)
                .copied()
                .collect();
            println!("{}", tokenizer.decode(&full)?);
        } else {
            println!("{completion}");
        }
    }
    Ok(())
}

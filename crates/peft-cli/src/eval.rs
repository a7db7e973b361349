//! `peft eval`: mean token cross-entropy on the response tokens, and perplexity.

use std::path::PathBuf;

use peft_llama::LlamaTokenizer;
use peft_train::{evaluate, BatchingConfig};

use crate::model_args::{AdapterArgs, ModelArgs};
use crate::template::{instruction_format, Template};
use crate::train::load_examples;
use crate::AnyResult;

/// Score a model (with or without an adapter) on instruction data.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Alpaca `.json`/`.jsonl` or pre-tokenized `.jsonl`; every record is scored.
    #[arg(long)]
    data: PathBuf,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// How records become examples: alpaca, or the model's chat template (`chat`), as in
    /// `peft train`.
    #[arg(long, value_enum, default_value_t = Template::Alpaca)]
    template: Template,
    /// The system turn with `--template chat`.
    #[arg(long)]
    system: Option<String>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object: loss, perplexity, response tokens, tokens read, seconds, rate.
    #[arg(long)]
    json: bool,
}

/// Runs `peft eval`.
pub fn run(args: EvalArgs) -> AnyResult<()> {
    let model = args.model.load()?;
    let adapter = args.adapter.load(&model)?;
    let tokenizer = LlamaTokenizer::load(args.model.dir())?;
    let format = instruction_format(
        args.template,
        args.system.as_deref(),
        &args.model.dir(),
        &tokenizer,
    )?;
    let (examples, _) = load_examples(
        &args.data,
        &tokenizer,
        &format,
        model.config.vocab_size,
        args.max_seq_len,
        0,
        0,
        None,
    )?;
    let batching = BatchingConfig::new(args.batch_size).with_max_seq_len(args.max_seq_len);
    let started = std::time::Instant::now();
    let (loss, tokens) = evaluate(&model, adapter.as_ref(), &examples, &batching)?;
    let seconds = started.elapsed().as_secs_f64();
    // Every token the forward passes read (prompts included, padding not): the rate PyTorch
    // scripts report for a held-out pass.
    let input_tokens: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let rate = input_tokens as f64 / seconds.max(1e-9);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens,
                "input_tokens": input_tokens, "seconds": seconds, "tokens_per_second": rate})
        );
    } else {
        println!(
            "loss {loss:.4}  perplexity {:.3}  over {tokens} response tokens \
             ({input_tokens} tokens read in {seconds:.2} s, {rate:.0} tokens/s)",
            loss.exp()
        );
    }
    Ok(())
}

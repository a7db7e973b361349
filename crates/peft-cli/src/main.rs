//! `peft`: parameter-efficient fine-tuning of LLaMA models from the command line.

mod backend;
mod eval;
mod generate;
mod inspect;
mod logits;
mod merge;
mod model_args;
mod template;
mod train;
mod visual;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Errors of any command, printed as `error: ...`.
pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Parameter-efficient fine-tuning of LLaMA models (LLaMA-Adapter, LoRA, prefix tuning).
#[derive(Parser, Debug)]
#[command(name = "peft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
// Parsed once per process: the size of the argument structs does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Continue a prompt, optionally with an adapter.
    Generate(generate::GenerateArgs),
    /// Write the logits of given token ids (for checking numerics against other frameworks).
    Logits(logits::LogitsArgs),
    /// Describe a model directory or an adapter.
    Inspect(inspect::InspectArgs),
    /// Merge a LoRA adapter into the model and write a Hugging Face model directory.
    Merge(merge::MergeArgs),
    /// Fine-tune an adapter (LLaMA-Adapter's Alpaca recipe by default).
    Train(train::TrainArgs),
    /// Mean token cross-entropy and perplexity on the response tokens of instruction data.
    Eval(eval::EvalArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

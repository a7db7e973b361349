//! Prompt templates: `--template` and `--system` of `peft train`, `eval` and `generate`.

use std::path::Path;

use peft_llama::{ChatTemplate, LlamaTokenizer};
use peft_train::InstructionFormat;

use crate::AnyResult;

/// `--template`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// The text as given (`peft generate` only).
    None,
    /// The Stanford Alpaca instruction template (the paper's recipe).
    Alpaca,
    /// The model's own chat template (`tokenizer_config.json`, `chat_template.jinja` or the
    /// GGUF's); training puts the loss on the assistant's turn only.
    Chat,
}

/// The Stanford Alpaca prompt for an instruction and optional input, as used in training.
pub fn alpaca(instruction: &str, input: &str) -> String {
    peft_train::alpaca_prompt(instruction, input)
}

/// The chat template the model at `model` ships.
///
/// # Errors
/// The model ships none, or its files cannot be read.
pub fn chat_template(model: &Path, tokenizer: &LlamaTokenizer) -> AnyResult<ChatTemplate> {
    ChatTemplate::from_model(model, tokenizer)?.ok_or_else(|| {
        format!(
            "{}: --template chat, but the model ships no chat template (no chat_template in \
             tokenizer_config.json, no chat_template.jinja, no tokenizer.chat_template in a GGUF); \
             use --template alpaca",
            model.display()
        )
        .into()
    })
}

/// How training and evaluation turn Alpaca records into examples.
///
/// # Errors
/// `--template none`, `--system` without `--template chat`, or no chat template.
pub fn instruction_format(
    template: Template,
    system: Option<&str>,
    model: &Path,
    tokenizer: &LlamaTokenizer,
) -> AnyResult<InstructionFormat> {
    match (template, system) {
        (Template::Chat, system) => Ok(InstructionFormat::Chat {
            template: chat_template(model, tokenizer)?,
            system: system.map(str::to_string),
        }),
        (_, Some(_)) => Err("--system needs --template chat".into()),
        (Template::Alpaca, None) => Ok(InstructionFormat::Alpaca),
        (Template::None, None) => Err(
            "--template none applies to `peft generate`; training and evaluation on instruction \
             data use alpaca or chat"
                .into(),
        ),
    }
}

/// The prompt ids of `prompt` for generation under `template`: as given, or as training
/// formats an instruction ([`instruction_format`]): in the Alpaca template, or as the user's turn
/// of a conversation (after `system`, if given) with the chat template's generation prompt, as
/// `apply_chat_template(..., add_generation_prompt=True)`.
pub struct PromptBuilder {
    /// `None` for `--template none`.
    format: Option<InstructionFormat>,
}

impl PromptBuilder {
    /// The builder for `template` on the model at `model`.
    ///
    /// # Errors
    /// `--system` without `--template chat`, or no chat template.
    pub fn new(
        template: Template,
        system: Option<String>,
        model: &Path,
        tokenizer: &LlamaTokenizer,
    ) -> AnyResult<Self> {
        let format = match (template, &system) {
            (Template::None, None) => None,
            (Template::None, Some(_)) => return Err("--system needs --template chat".into()),
            _ => Some(instruction_format(
                template,
                system.as_deref(),
                model,
                tokenizer,
            )?),
        };
        Ok(Self { format })
    }

    /// The text the model is prompted with and its ids.
    ///
    /// # Errors
    /// The template or the tokenizer fails.
    pub fn build(
        &self,
        prompt: &str,
        input: &str,
        tokenizer: &LlamaTokenizer,
    ) -> AnyResult<(String, Vec<u32>)> {
        match &self.format {
            None => Ok((prompt.to_string(), tokenizer.encode(prompt, true)?)),
            Some(InstructionFormat::Alpaca) => {
                let text = alpaca(prompt, input);
                let ids = tokenizer.encode(&text, true)?;
                Ok((text, ids))
            }
            Some(InstructionFormat::Chat { template, system }) => {
                let record = peft_train::AlpacaRecord::new(prompt, input, "");
                let messages = peft_train::chat_prompt_messages(&record, system.as_deref());
                let text = template.render(&messages, true)?;
                let ids = tokenizer.encode(&text, false)?;
                Ok((text, ids))
            }
        }
    }
}

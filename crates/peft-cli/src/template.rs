//! Prompt templates for `peft generate --template`.

/// The Stanford Alpaca prompt for an instruction and optional input, as used in training.
pub fn alpaca(instruction: &str, input: &str) -> String {
    peft_train::alpaca_prompt(instruction, input)
}

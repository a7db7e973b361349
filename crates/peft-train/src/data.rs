//! Training data: Alpaca records and prompts, tokenized examples, pre-tokenized files, the
//! validation split and batching.
//!
//! The pipeline: [`load_alpaca`] → [`split_validation`] → [`tokenize_alpaca_records`] (or
//! [`load_pretokenized`]) → [`Batcher::batches`] per epoch → [`Batch`] for the model and
//! [`causal_lm_loss`](crate::causal_lm_loss).

mod alpaca;
mod batching;
mod example;
mod json_records;
mod pretokenized;
mod shuffle;
mod split;
#[cfg(test)]
pub(crate) mod test_files;

pub use alpaca::{
    alpaca_prompt, chat_prompt_messages, instruction_message, load_alpaca, tokenize_alpaca,
    tokenize_alpaca_records, tokenize_chat, tokenize_instruction, tokenize_instruction_records,
    AlpacaRecord, InstructionFormat, PROMPT_WITHOUT_INPUT, PROMPT_WITH_INPUT,
};
pub use batching::{Batch, BatchFeatures, BatchStrategy, Batcher, BatchingConfig};
pub use example::{Example, TokenizedDataset, DEFAULT_MAX_SEQ_LEN, IGNORE_INDEX};
pub use pretokenized::load_pretokenized;
pub use split::split_validation;

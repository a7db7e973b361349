//! A tokenized training example and a tokenized dataset.

use crate::error::RecordLocation;

/// The label of a position that the loss ignores (the prompt, padding), as in PyTorch's
/// `CrossEntropyLoss(ignore_index=-100)` and Hugging Face `labels`.
pub const IGNORE_INDEX: i64 = -100;

/// The sequence length the LLaMA-Adapter paper trains with (`--max_seq_len 512`).
pub const DEFAULT_MAX_SEQ_LEN: usize = 512;

/// One tokenized sequence with its labels.
///
/// `labels` is aligned with `input_ids` (same length, `labels[t]` belongs to token `t`), exactly
/// as Hugging Face's `labels` argument: the causal-LM loss compares the logits at position `t`
/// with `labels[t + 1]`. A label is a token id or [`IGNORE_INDEX`].
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids, BOS first for Alpaca examples.
    pub input_ids: Vec<u32>,
    /// Per-token labels: the token id where the token is a target, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
    /// Per-example conditioning the adapter receives through
    /// [`Adapter::hooks_with_features`](peft_core::Adapter::hooks_with_features): the image
    /// features of a multimodal example, `None` for a text-only one.
    pub features: Option<Vec<f32>>,
}

impl Example {
    /// An example of tokens and labels, without conditioning.
    pub fn new(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        Self {
            input_ids,
            labels,
            features: None,
        }
    }

    /// The example conditioned on `features` (one row of [`crate::Batch::features`]).
    pub fn with_features(mut self, features: Vec<f32>) -> Self {
        self.features = Some(features);
        self
    }

    /// A prompt-and-response example: `input_ids` (the prompt's tokens first, then the
    /// response's) with `eos` appended, labels masked with [`IGNORE_INDEX`] over the first
    /// `prompt_len` tokens, cut to `max_seq_len`.
    pub fn response_only(
        mut input_ids: Vec<u32>,
        prompt_len: usize,
        eos: Option<u32>,
        max_seq_len: usize,
    ) -> Self {
        input_ids.extend(eos);
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(position, &id)| {
                if position < prompt_len {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        let mut example = Self::new(input_ids, labels);
        example.truncate(max_seq_len);
        example
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions the shifted causal-LM loss counts: labels other than
    /// [`IGNORE_INDEX`] after the first position (the first token is never predicted).
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&label| label != IGNORE_INDEX)
            .count()
    }

    /// Keeps at most `max_seq_len` tokens (and labels) from the start.
    pub fn truncate(&mut self, max_seq_len: usize) {
        self.input_ids.truncate(max_seq_len);
        self.labels.truncate(max_seq_len);
    }
}

/// The examples of a dataset, and the records left out because nothing in them is a target.
///
/// A record has no target when its prompt alone fills `max_seq_len` (the response is truncated
/// away) or, for pre-tokenized data, when every label is [`IGNORE_INDEX`]. The official
/// LLaMA-Adapter code keeps such examples, where they cost compute and add nothing to the
/// loss (or make it NaN when a whole batch has none); here they are left out and listed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizedDataset {
    /// The examples, in record order.
    pub examples: Vec<Example>,
    /// Where each left-out record was in the source.
    pub without_targets: Vec<RecordLocation>,
}

impl TokenizedDataset {
    /// Adds `example`, or records `location` when it has no target.
    pub(crate) fn push(&mut self, location: RecordLocation, example: Example) {
        if example.target_tokens() == 0 {
            self.without_targets.push(location);
        } else {
            self.examples.push(example);
        }
    }
}

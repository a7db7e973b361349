//! Batching: the epoch's order of examples, and padding them into a [`Batch`].

use burn::config::Config;
use peft_llama::TokenBatch;

use super::example::{Example, DEFAULT_MAX_SEQ_LEN, IGNORE_INDEX};
use super::shuffle::{Purpose, SeededRng};
use crate::error::{Result, TrainError};

/// How examples are grouped and padded.
#[derive(Config, Debug, PartialEq, Eq, Copy)]
pub enum BatchStrategy {
    /// Shuffled order, every batch padded to `max_seq_len`: the LLaMA-Adapter paper's setup
    /// (its dataset pads each example to `max_words`).
    FixedLength,
    /// Examples of similar length batched together and padded to the longest in the batch.
    ///
    /// The epoch's seeded shuffle is cut into windows of `batch_size · group_batches`
    /// examples; each window is sorted by length (longest first, ties in shuffled order) and
    /// cut into batches; then the order of all batches is shuffled. Every epoch sees different
    /// batches, and padding stays small.
    LengthGrouped,
}

/// [`Batcher`] configuration.
#[derive(Config, Debug)]
pub struct BatchingConfig {
    /// Examples per batch (per micro-batch when accumulating gradients).
    pub batch_size: usize,
    /// Longest allowed example, and the padded length of [`BatchStrategy::FixedLength`].
    #[config(default = "DEFAULT_MAX_SEQ_LEN")]
    pub max_seq_len: usize,
    /// Grouping and padding.
    #[config(default = "BatchStrategy::LengthGrouped")]
    pub strategy: BatchStrategy,
    /// Id written into padding positions (masked out, labels `-100`, so any valid id works).
    #[config(default = 0)]
    pub pad_id: u32,
    /// Seed of the data order; with the epoch number it fixes the order completely.
    #[config(default = 0)]
    pub seed: u64,
    /// Drop the last batch of an epoch when it is smaller than `batch_size` (the official
    /// code's `drop_last=True`).
    #[config(default = false)]
    pub drop_last: bool,
    /// Batches per sorting window of [`BatchStrategy::LengthGrouped`]: larger means less
    /// padding and less randomness in which examples share a batch.
    #[config(default = 64)]
    pub group_batches: usize,
}

/// A padded batch for causal-LM training.
///
/// `labels` is aligned with `tokens.ids` (both `[batch, seq]`, row-major), as Hugging Face's
/// `labels` argument: the logits at position `t` predict the token at `t + 1`, so
/// [`causal_lm_loss`](crate::causal_lm_loss) compares `logits[:, t]` with `labels[:, t + 1]`.
/// Prompt and padding positions hold [`IGNORE_INDEX`]. Padding is on the right, marked `false`
/// in `tokens.mask` (`None` when the batch has no padding).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids `[batch, seq]` with the mask of real tokens.
    pub tokens: TokenBatch,
    /// Labels `[batch, seq]`, row-major.
    pub labels: Vec<i64>,
    /// Tokens that are not padding.
    pub real_tokens: usize,
    /// Positions the shifted loss counts: labels other than [`IGNORE_INDEX`] at `t >= 1` in each
    /// row. The weight of this batch in token-weighted gradient accumulation.
    pub target_tokens: usize,
    /// The examples' conditioning, when any has some (see [`Example::features`]).
    pub features: Option<BatchFeatures>,
}

impl Batch {
    /// `adapter`'s hooks on `model` for this batch: with the batch's features when it has some
    /// ([`peft_core::Adapter::hooks_with_features`]), else the plain ones.
    ///
    /// # Errors
    /// An adapter that takes no features given a batch that has some, or features of the
    /// wrong width.
    pub fn hooks<'a, B: burn::tensor::backend::Backend, A: peft_core::Adapter<B>>(
        &self,
        adapter: &'a A,
        model: &dyn peft_core::AdaptableModel<B>,
        device: &B::Device,
    ) -> Result<Box<dyn peft_core::LayerHooks<B> + 'a>> {
        Ok(match &self.features {
            Some(features) => adapter.hooks_with_features(model, features.to_device(device))?,
            None => adapter.hooks(model),
        })
    }
}

/// The per-example conditioning of a [`Batch`], on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchFeatures {
    /// `[batch, width]`, row-major; zeros in rows without features.
    pub values: Vec<f32>,
    /// Width of one row.
    pub width: usize,
    /// Which rows have features.
    pub present: Vec<bool>,
}

impl BatchFeatures {
    /// The conditioning as the adapter takes it, on `device`.
    pub fn to_device<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
    ) -> peft_core::Features<B> {
        let values = burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(self.values.clone(), [self.present.len(), self.width]),
            device,
        );
        peft_core::Features {
            values,
            present: self.present.clone(),
        }
    }
}

/// Orders and pads examples into batches; see [`BatchingConfig`].
#[derive(Debug, Clone)]
pub struct Batcher {
    config: BatchingConfig,
}

impl BatchingConfig {
    /// Checks the settings and builds the batcher.
    ///
    /// # Errors
    /// `batch_size`, `max_seq_len` or `group_batches` is 0.
    pub fn init(&self) -> Result<Batcher> {
        for (setting, value) in [
            ("batch_size", self.batch_size),
            ("max_seq_len", self.max_seq_len),
            ("group_batches", self.group_batches),
        ] {
            if value == 0 {
                return Err(TrainError::config(setting, "must be at least 1"));
            }
        }
        Ok(Batcher {
            config: self.clone(),
        })
    }
}

impl Batcher {
    /// The settings.
    pub fn config(&self) -> &BatchingConfig {
        &self.config
    }

    /// Number of batches an epoch of `examples` examples yields.
    pub fn num_batches(&self, examples: usize) -> usize {
        let size = self.config.batch_size;
        if self.config.drop_last {
            examples / size
        } else {
            examples.div_ceil(size)
        }
    }

    /// The example indices of each batch of epoch `epoch`, for examples of the given lengths.
    ///
    /// Deterministic in (`seed`, `epoch`, `lengths`); a different epoch gives a different
    /// order. Every index appears once, except those of a dropped last batch.
    pub fn plan(&self, lengths: &[usize], epoch: u64) -> Vec<Vec<usize>> {
        let size = self.config.batch_size;
        let mut rng = SeededRng::new(self.config.seed, Purpose::Epoch(epoch));
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        rng.shuffle(&mut order);
        let mut batches: Vec<Vec<usize>> = match self.config.strategy {
            BatchStrategy::FixedLength => order.chunks(size).map(<[usize]>::to_vec).collect(),
            BatchStrategy::LengthGrouped => {
                let window = size.saturating_mul(self.config.group_batches);
                let mut batches = Vec::with_capacity(order.len().div_ceil(size));
                for group in order.chunks_mut(window) {
                    // Stable, so equal lengths keep their shuffled order.
                    group.sort_by_key(|&index| std::cmp::Reverse(lengths[index]));
                    batches.extend(group.chunks(size).map(<[usize]>::to_vec));
                }
                batches
            }
        };
        // Only the last window can end in a short batch; drop it before shuffling batches.
        if self.config.drop_last && batches.last().is_some_and(|b| b.len() < size) {
            batches.pop();
        }
        if self.config.strategy == BatchStrategy::LengthGrouped {
            rng.shuffle(&mut batches);
        }
        batches
    }

    /// Pads `examples` on the right into one batch: to `max_seq_len` for
    /// [`BatchStrategy::FixedLength`], else to the longest example.
    ///
    /// # Errors
    /// No examples, an empty example, labels of another length than the ids, or an example
    /// longer than `max_seq_len`.
    pub fn collate(&self, examples: &[&Example]) -> Result<Batch> {
        let max_seq_len = self.config.max_seq_len;
        if examples.is_empty() {
            return Err(TrainError::input("collate", "no examples"));
        }
        for (row, example) in examples.iter().enumerate() {
            if example.is_empty() {
                return Err(TrainError::input(
                    "collate",
                    format!("example {row} has no tokens"),
                ));
            }
            if example.labels.len() != example.len() {
                return Err(TrainError::input(
                    "collate",
                    format!(
                        "example {row} has {} labels for {} tokens",
                        example.labels.len(),
                        example.len()
                    ),
                ));
            }
            if example.len() > max_seq_len {
                return Err(TrainError::input(
                    "collate",
                    format!(
                        "example {row} has {} tokens, more than max_seq_len {max_seq_len}",
                        example.len()
                    ),
                ));
            }
        }
        let seq = match self.config.strategy {
            BatchStrategy::FixedLength => max_seq_len,
            BatchStrategy::LengthGrouped => examples.iter().map(|e| e.len()).max().unwrap_or(0),
        };
        let batch = examples.len();
        let mut ids = Vec::with_capacity(batch * seq);
        let mut labels = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq);
        let (mut real_tokens, mut target_tokens) = (0, 0);
        for example in examples {
            let padding = seq - example.len();
            ids.extend_from_slice(&example.input_ids);
            ids.extend(std::iter::repeat_n(self.config.pad_id, padding));
            labels.extend_from_slice(&example.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, padding));
            mask.extend(std::iter::repeat_n(true, example.len()));
            mask.extend(std::iter::repeat_n(false, padding));
            real_tokens += example.len();
            target_tokens += example.target_tokens();
        }
        let mask = (real_tokens < batch * seq).then_some(mask);
        let features = Self::collate_features(examples)?;
        Ok(Batch {
            tokens: TokenBatch {
                ids,
                batch,
                seq,
                mask,
            },
            labels,
            real_tokens,
            target_tokens,
            features,
        })
    }

    fn collate_features(examples: &[&Example]) -> Result<Option<BatchFeatures>> {
        let Some(width) = examples
            .iter()
            .find_map(|e| e.features.as_ref().map(Vec::len))
        else {
            return Ok(None);
        };
        let mut values = vec![0.0; examples.len() * width];
        let mut present = Vec::with_capacity(examples.len());
        for (row, example) in examples.iter().enumerate() {
            if let Some(features) = &example.features {
                if features.len() != width {
                    return Err(TrainError::input(
                        "collate",
                        format!(
                            "example {row} has {} features, an earlier one {width}",
                            features.len()
                        ),
                    ));
                }
                values[row * width..(row + 1) * width].copy_from_slice(features);
            }
            present.push(example.features.is_some());
        }
        Ok(Some(BatchFeatures {
            values,
            width,
            present,
        }))
    }

    /// The batches of epoch `epoch` over `examples`, in [`plan`](Self::plan) order.
    ///
    /// # Errors
    /// Each item fails as [`collate`](Self::collate) does.
    pub fn batches<'a>(
        &'a self,
        examples: &'a [Example],
        epoch: u64,
    ) -> impl Iterator<Item = Result<Batch>> + 'a {
        let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
        self.plan(&lengths, epoch).into_iter().map(move |indices| {
            let rows: Vec<&Example> = indices.iter().map(|&index| &examples[index]).collect();
            self.collate(&rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(ids: &[u32], prompt: usize) -> Example {
        let labels = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                if t < prompt {
                    IGNORE_INDEX
                } else {
                    i64::from(id)
                }
            })
            .collect();
        Example::new(ids.to_vec(), labels)
    }

    fn lengths_dataset(lengths: &[usize]) -> Vec<Example> {
        lengths.iter().map(|&n| example(&vec![3; n], 1)).collect()
    }

    #[test]
    fn collate_pads_right_with_masked_ignored_positions() {
        let batcher = BatchingConfig::new(2).with_pad_id(7).init().unwrap();
        let a = example(&[1, 10, 11, 12], 2);
        let b = example(&[1, 20], 1);
        let batch = batcher.collate(&[&a, &b]).unwrap();
        assert_eq!((batch.tokens.batch, batch.tokens.seq), (2, 4));
        assert_eq!(batch.tokens.ids, vec![1, 10, 11, 12, 1, 20, 7, 7]);
        assert_eq!(batch.labels, vec![-100, -100, 11, 12, -100, 20, -100, -100]);
        assert_eq!(
            batch.tokens.mask,
            Some(vec![true, true, true, true, true, true, false, false])
        );
        assert_eq!((batch.real_tokens, batch.target_tokens), (6, 3));

        let full = batcher.collate(&[&a, &a]).unwrap();
        assert_eq!(full.tokens.mask, None, "no padding, no mask");
    }

    #[test]
    fn fixed_length_pads_every_batch_to_max_seq_len() {
        let batcher = BatchingConfig::new(2)
            .with_max_seq_len(6)
            .with_strategy(BatchStrategy::FixedLength)
            .init()
            .unwrap();
        let data = lengths_dataset(&[2, 3, 5]);
        let batches: Vec<Batch> = batcher.batches(&data, 0).collect::<Result<_>>().unwrap();
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.tokens.seq == 6));
        let too_long = example(&[1; 7], 1);
        assert!(batcher.collate(&[&too_long]).is_err());
    }

    #[test]
    fn plan_is_seeded_per_epoch_and_covers_every_example_once() {
        let lengths: Vec<usize> = (0..103).map(|i| 1 + (i * 37) % 50).collect();
        for strategy in [BatchStrategy::FixedLength, BatchStrategy::LengthGrouped] {
            let batcher = BatchingConfig::new(8)
                .with_strategy(strategy)
                .with_group_batches(4)
                .with_seed(11)
                .init()
                .unwrap();
            let epoch0 = batcher.plan(&lengths, 0);
            assert_eq!(
                epoch0,
                batcher.plan(&lengths, 0),
                "{strategy:?}: same seed, same order"
            );
            assert_ne!(
                epoch0,
                batcher.plan(&lengths, 1),
                "{strategy:?}: epochs differ"
            );
            let mut seen: Vec<usize> = epoch0.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..103).collect::<Vec<_>>(), "{strategy:?}");
            assert_eq!(epoch0.len(), batcher.num_batches(103));
        }
    }

    #[test]
    fn length_grouping_wastes_less_padding_than_random_batches() {
        let lengths: Vec<usize> = (0..400).map(|i| 5 + (i * 7919) % 300).collect();
        let data = lengths_dataset(&lengths);
        let padded = |strategy| {
            let batcher = BatchingConfig::new(8)
                .with_max_seq_len(400)
                .with_strategy(strategy)
                .init()
                .unwrap();
            batcher
                .batches(&data, 0)
                .map(|b| b.map(|b| b.tokens.ids.len()))
                .sum::<Result<usize>>()
                .unwrap()
        };
        let real: usize = lengths.iter().sum();
        let grouped = padded(BatchStrategy::LengthGrouped);
        // Random batches of a uniform length spread pad to ~89% of their max; windows of 512
        // sorted examples leave only a small gap.
        assert!(
            (grouped - real) * 20 < real,
            "grouped padding {} of {real}",
            grouped - real
        );
        assert!(padded(BatchStrategy::FixedLength) > grouped);
    }

    #[test]
    fn drop_last_removes_only_the_short_batch() {
        let lengths = vec![4; 10];
        let batcher = BatchingConfig::new(4).with_drop_last(true).init().unwrap();
        let plan = batcher.plan(&lengths, 2);
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|b| b.len() == 4));
        assert_eq!(batcher.num_batches(10), 2);
    }

    #[test]
    fn zero_batch_size_is_a_config_error() {
        assert!(matches!(
            BatchingConfig::new(0).init(),
            Err(TrainError::Config {
                setting: "batch_size",
                ..
            })
        ));
    }
}

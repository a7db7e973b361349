//! Masked causal-LM cross-entropy.
//!
//! The logits at position `t` predict the token at `t + 1`, so `logits[:, t]` is scored against
//! `labels[:, t + 1]` (Hugging Face `labels` convention; the official LLaMA-Adapter code does
//! `output[:, :-1]` against `labels[:, 1:]`). Positions labelled
//! [`IGNORE_INDEX`] are skipped and the mean is over the counted positions of the whole
//! batch, as `CrossEntropyLoss(reduction="mean", ignore_index=...)`.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use peft_llama::{LayerHooks, Llama, TokenBatch};

use crate::data::IGNORE_INDEX;
use crate::error::{Result, TrainError};

/// The loss of a batch and how many positions it averages over.
#[derive(Debug, Clone)]
pub struct CausalLmLoss<B: Backend> {
    /// Mean negative log-likelihood over the counted positions, `[1]`, in f32 (f64 if the
    /// logits are f64); part of the autodiff graph of the logits.
    pub loss: Tensor<B, 1>,
    /// Counted positions: labels other than [`IGNORE_INDEX`] at `t >= 1`. With 0 the loss is
    /// a graph-connected 0 (no gradient), not NaN.
    pub targets: usize,
}

/// Masked causal-LM cross-entropy of `logits` `[batch, seq, vocab]` against `labels`
/// (`batch · seq`, row-major, aligned with the input ids).
///
/// Only the rows of counted positions are gathered from the logits, so the log-softmax costs
/// `targets × vocab`, not `batch × seq × vocab`; it is computed in f32 (or f64 for f64 logits)
/// with the max subtracted.
///
/// # Errors
/// `labels` of the wrong length, or a label that is neither [`IGNORE_INDEX`] nor a token id
/// below `vocab`.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: &[i64]) -> Result<CausalLmLoss<B>> {
    let [batch, seq, vocab] = logits.dims();
    let scored = Scored::of(labels, batch, seq, vocab, "logits")?;
    if scored.rows.is_empty() {
        return Ok(CausalLmLoss {
            loss: logits.sum().mul_scalar(0.0),
            targets: 0,
        });
    }
    let rows = scored.row_tensor(&logits.device());
    let picked = logits.reshape([batch * seq, vocab]).select(0, rows);
    Ok(scored.loss(picked))
}

/// [`causal_lm_loss`] of `base` on `tokens` with `hooks`, projecting to the vocabulary only the
/// positions that are scored: the final hidden states of those rows go through the output head,
/// the rest never do. The loss and its gradient are those of `causal_lm_loss(base.forward(..))`;
/// the head's cost falls from `batch · seq` rows to the scored ones (prompt tokens, padding and
/// each row's last position are skipped), which matters when the vocabulary is large
/// (SmolLM2's 49,152 words make the head a fifth of the model).
///
/// # Errors
/// `labels` of the wrong length, a label that is neither [`IGNORE_INDEX`] nor a token id, or
/// the model's own errors.
pub fn causal_lm_loss_of<B: Backend>(
    base: &Llama<B>,
    tokens: &TokenBatch,
    hooks: &dyn LayerHooks<B>,
    labels: &[i64],
) -> Result<CausalLmLoss<B>> {
    let (batch, seq, vocab) = (tokens.batch, tokens.seq, base.config.vocab_size);
    let scored = Scored::of(labels, batch, seq, vocab, "tokens")?;
    let hidden = base.forward_hidden(tokens, hooks, None)?;
    if scored.rows.is_empty() {
        return Ok(CausalLmLoss {
            loss: hidden.sum().mul_scalar(0.0),
            targets: 0,
        });
    }
    let width = hidden.dims()[2];
    let count = scored.rows.len();
    let rows = scored.row_tensor(&hidden.device());
    let picked = hidden.reshape([batch * seq, width]).select(0, rows);
    let logits = base.head(picked.reshape([1, count, width]));
    Ok(scored.loss(logits.reshape([count, vocab])))
}

/// The scored positions of a batch: the flat row of each position whose next label counts,
/// and that label.
struct Scored {
    rows: Vec<i64>,
    targets: Vec<i64>,
}

impl Scored {
    /// Checks `labels` against a `[batch, seq]` batch over `vocab` words.
    fn of(labels: &[i64], batch: usize, seq: usize, vocab: usize, what: &str) -> Result<Self> {
        if labels.len() != batch * seq {
            return Err(TrainError::input(
                "causal_lm_loss",
                format!(
                    "{} labels for {what} of shape [{batch}, {seq}] (vocabulary {vocab})",
                    labels.len()
                ),
            ));
        }
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for row in 0..batch {
            for t in 0..seq.saturating_sub(1) {
                let label = labels[row * seq + t + 1];
                if label == IGNORE_INDEX {
                    continue;
                }
                if !(0..vocab as i64).contains(&label) {
                    return Err(TrainError::input(
                        "causal_lm_loss",
                        format!(
                            "label {label} at row {row}, position {} is neither {IGNORE_INDEX} nor in the vocabulary (0..{vocab})",
                            t + 1
                        ),
                    ));
                }
                rows.push((row * seq + t) as i64);
                targets.push(label);
            }
        }
        Ok(Self { rows, targets })
    }

    fn row_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        Tensor::from_data(
            TensorData::new(self.rows.clone(), [self.rows.len()]),
            device,
        )
    }

    /// The mean negative log-likelihood of the targets under `picked` `[count, vocab]`, in f32
    /// (or f64 for f64 logits) with the max subtracted.
    fn loss<B: Backend>(&self, mut picked: Tensor<B, 2>) -> CausalLmLoss<B> {
        let count = self.targets.len();
        let targets = Tensor::<B, 2, Int>::from_data(
            TensorData::new(self.targets.clone(), [count, 1]),
            &picked.device(),
        );
        if !matches!(picked.dtype(), DType::F32 | DType::F64) {
            picked = picked.cast(DType::F32);
        }
        // Subtracting a constant per row leaves the log-softmax and its gradient unchanged, so
        // the max need not be differentiated.
        let shifted = picked.clone() - picked.max_dim(1).detach();
        let log_normaliser = shifted.clone().exp().sum_dim(1).log();
        let nll = log_normaliser - shifted.gather(1, targets);
        CausalLmLoss {
            loss: nll.sum().div_scalar(count as f64),
            targets: count,
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};

    use super::*;

    type B = NdArray<f32>;
    type AD = Autodiff<B>;

    fn logits<Bk: Backend>(values: Vec<f32>, shape: [usize; 3]) -> Tensor<Bk, 3> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    #[test]
    fn loss_matches_a_hand_computation() {
        // Row 0 predicts label[1] = 0 from uniform logits: −ln(1/3) = ln 3.
        // Row 1 predicts label[2] = 2 from [0, ln 2, 0]: p = 1/(1 + 2 + 1), −ln p = ln 4.
        // Position 2's logits predict nothing; label[0] is never a target.
        let ln2 = std::f32::consts::LN_2;
        let x = logits::<B>(
            vec![0.0, 0.0, 0.0, 0.0, ln2, 0.0, 9.0, -9.0, 3.0],
            [1, 3, 3],
        );
        let out = causal_lm_loss(x, &[2, 0, 2]).unwrap();
        assert_eq!(out.targets, 2);
        let expected = (3f32.ln() + 4f32.ln()) / 2.0;
        let loss = out.loss.into_scalar();
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    #[test]
    fn mean_is_over_all_targets_of_the_batch_and_ignores_minus_100() {
        // Row 0 has one target (ln 3), row 1 two (ln 3 each, uniform logits), one ignored.
        let x = logits::<B>(vec![0.0; 2 * 4 * 3], [2, 4, 3]);
        let labels = [-100, 1, -100, -100, -100, 0, 2, -100];
        let out = causal_lm_loss(x, &labels).unwrap();
        assert_eq!(out.targets, 3);
        assert!((out.loss.into_scalar() - 3f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn gradient_is_softmax_minus_one_hot_over_the_count() {
        let ln2 = std::f32::consts::LN_2;
        let x = logits::<AD>(
            vec![0.0, 0.0, 0.0, 0.0, ln2, 0.0, 9.0, -9.0, 3.0],
            [1, 3, 3],
        )
        .require_grad();
        let out = causal_lm_loss(x.clone(), &[2, 0, 2]).unwrap();
        let grads = out.loss.backward();
        let grad = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let third = 1.0 / 3.0;
        let expected = [
            (third - 1.0) / 2.0,
            third / 2.0,
            third / 2.0, // target 0
            0.25 / 2.0,
            0.5 / 2.0,
            (0.25 - 1.0) / 2.0, // target 2
            0.0,
            0.0,
            0.0, // last position: no target
        ];
        for (g, e) in grad.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{grad:?}");
        }
    }

    #[test]
    fn no_targets_give_zero_loss_and_count_zero() {
        let x = logits::<B>(vec![1.0; 6], [1, 2, 3]);
        let out = causal_lm_loss(x, &[5, -100]).unwrap();
        assert_eq!(out.targets, 0);
        assert_eq!(out.loss.into_scalar(), 0.0);
    }

    #[test]
    fn bad_labels_are_errors() {
        let x = || logits::<B>(vec![0.0; 6], [1, 2, 3]);
        assert!(causal_lm_loss(x(), &[0])
            .unwrap_err()
            .to_string()
            .contains("1 labels"));
        let message = causal_lm_loss(x(), &[0, 3]).unwrap_err().to_string();
        assert!(
            message.contains("label 3 at row 0, position 1"),
            "{message}"
        );
    }

    /// Projecting only the scored rows gives the loss, and the adapter's gradients, of the full
    /// logits (tied and untied heads, padding, prompt positions, an all-ignored row).
    #[test]
    fn the_loss_of_the_scored_rows_is_the_loss_of_the_full_logits() {
        use burn::module::Param;
        use burn::tensor::Distribution;
        use peft_core::{Adapter, LoraConfig, TargetModules};
        use peft_llama::LlamaConfig;

        let device = Default::default();
        for tied in [false, true] {
            AD::seed(&device, 5);
            let base = LlamaConfig::new(40, 32, 48, 2, 4, 2, 8)
                .with_tie_word_embeddings(tied)
                .init::<AD>(&device, DType::F32);
            let mut lora = LoraConfig::new()
                .with_target_modules(TargetModules::parse(&["all-linear"]).unwrap())
                .init::<AD>(&base, &device)
                .unwrap();
            // B starts at zero: give it values so that A gets a gradient too.
            for module in &mut lora.modules {
                let b = Tensor::random(
                    module.lora_b.dims(),
                    Distribution::Normal(0.0, 0.1),
                    &device,
                );
                module.lora_b = Param::from_tensor(b);
            }
            let tokens =
                TokenBatch::right_padded(&[vec![1, 5, 9, 33, 7, 2], vec![4, 8, 15]], 0).unwrap();
            let labels = [-100, -100, 9, 33, 7, 2, -100, 8, 15, -100, -100, -100];
            let hooks = lora.hooks(&base);
            let logits = base.forward(&tokens, hooks.as_ref(), None).unwrap();
            let full = causal_lm_loss(logits, &labels).unwrap();
            let scored = causal_lm_loss_of(&base, &tokens, hooks.as_ref(), &labels).unwrap();
            assert_eq!((full.targets, scored.targets), (6, 6));
            let (a, b) = (
                full.loss.clone().into_scalar(),
                scored.loss.clone().into_scalar(),
            );
            assert!((a - b).abs() <= 1e-6 * a.abs(), "tied {tied}: {a} vs {b}");
            let (g_full, g_scored) = (full.loss.backward(), scored.loss.backward());
            let mut compared = 0;
            for module in &lora.modules {
                for param in [&module.lora_a, &module.lora_b] {
                    let x = param.val().grad(&g_full).unwrap().into_data();
                    let y = param.val().grad(&g_scored).unwrap().into_data();
                    let (x, y) = (x.into_vec::<f32>().unwrap(), y.into_vec::<f32>().unwrap());
                    assert!(x.iter().any(|v| *v != 0.0));
                    for (p, q) in x.iter().zip(&y) {
                        assert!(
                            (p - q).abs() <= 1e-7 + 1e-5 * p.abs(),
                            "tied {tied}: {p} vs {q}"
                        );
                    }
                    compared += 1;
                }
            }
            assert_eq!(compared, 2 * lora.modules.len());
        }
        // A batch without scored positions is a graph-connected zero.
        AD::seed(&device, 5);
        let base = LlamaConfig::new(40, 32, 48, 1, 4, 2, 8).init::<AD>(&device, DType::F32);
        let tokens = TokenBatch::from_rows(&[vec![1, 2, 3]]).unwrap();
        let none = causal_lm_loss_of(&base, &tokens, &peft_llama::NoHooks, &[-100; 3]).unwrap();
        assert_eq!(none.targets, 0);
        assert_eq!(none.loss.into_scalar(), 0.0);
    }
}

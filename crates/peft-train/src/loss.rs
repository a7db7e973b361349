//! Masked causal-LM cross-entropy.
//!
//! The logits at position `t` predict the token at `t + 1`, so `logits[:, t]` is scored against
//! `labels[:, t + 1]` (Hugging Face `labels` convention; the official LLaMA-Adapter code does
//! `output[:, :-1]` against `labels[:, 1:]`). Positions labelled
//! [`IGNORE_INDEX`] are skipped and the mean is over the counted positions of the whole
//! batch, as `CrossEntropyLoss(reduction="mean", ignore_index=...)`.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

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
    if labels.len() != batch * seq {
        return Err(TrainError::input(
            "causal_lm_loss",
            format!(
                "{} labels for logits of shape [{batch}, {seq}, {vocab}]",
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
    let count = rows.len();
    if count == 0 {
        return Ok(CausalLmLoss {
            loss: logits.sum().mul_scalar(0.0),
            targets: 0,
        });
    }
    let device = logits.device();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [count]), &device);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [count, 1]), &device);
    let mut picked = logits.reshape([batch * seq, vocab]).select(0, rows);
    if !matches!(picked.dtype(), DType::F32 | DType::F64) {
        picked = picked.cast(DType::F32);
    }
    // Subtracting a constant per row leaves the log-softmax and its gradient unchanged, so the
    // max need not be differentiated.
    let shifted = picked.clone() - picked.max_dim(1).detach();
    let log_normaliser = shifted.clone().exp().sum_dim(1).log();
    let nll = log_normaliser - shifted.gather(1, targets);
    let loss = nll.sum().div_scalar(count as f64);
    Ok(CausalLmLoss {
        loss,
        targets: count,
    })
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
}

//! Reading the reference fixtures made by `scripts/make_fixtures.py`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// The repository's `fixtures/` directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The vendored default model.
pub fn stories260k() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k")
}

/// A tensor from a safetensors file, as f32 or i64 values with its shape.
pub struct Fixture {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl Fixture {
    pub fn open(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes, path }
    }

    pub fn keys(&self) -> Vec<String> {
        let file = SafeTensors::deserialize(&self.bytes).unwrap();
        let mut keys: Vec<String> = file.names().into_iter().map(str::to_string).collect();
        keys.sort();
        keys
    }

    pub fn f32(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        let file = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = file
            .tensor(key)
            .unwrap_or_else(|_| panic!("{}: no `{key}`", self.path.display()));
        assert_eq!(view.dtype(), Dtype::F32, "{key}");
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (values, view.shape().to_vec())
    }

    pub fn i64(&self, key: &str) -> (Vec<i64>, Vec<usize>) {
        let file = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = file
            .tensor(key)
            .unwrap_or_else(|_| panic!("{}: no `{key}`", self.path.display()));
        assert_eq!(view.dtype(), Dtype::I64, "{key}");
        let values = view
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (values, view.shape().to_vec())
    }
}

/// The right-padded input batch of a tiny fixture model.
pub fn inputs(model: &str) -> peft_llama::TokenBatch {
    let file = Fixture::open(fixtures().join(model).join("inputs.safetensors"));
    let (ids, shape) = file.i64("input_ids");
    let (mask, _) = file.i64("attention_mask");
    peft_llama::TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        batch: shape[0],
        seq: shape[1],
        mask: Some(mask.iter().map(|&m| m != 0).collect()),
    }
}

/// Asserts `|a - e| <= atol + rtol·|e|` elementwise, reporting the worst element.
pub fn assert_close(actual: &[f32], expected: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f32);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let excess = (a - e).abs() - (atol + rtol * e.abs());
        if excess > worst.1 || a.is_nan() {
            worst = (i, if a.is_nan() { f32::INFINITY } else { excess });
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} is {} but the reference is {} (rtol {rtol}, atol {atol})",
        worst.0,
        actual[worst.0],
        expected[worst.0]
    );
}

/// Keeps the logits of real (unpadded) positions only: `[batch, seq, vocab]` → flat.
pub fn real_positions(logits: &[f32], tokens: &peft_llama::TokenBatch, vocab: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for row in 0..tokens.batch {
        for column in 0..tokens.seq {
            if tokens.is_real(row, column) {
                let start = (row * tokens.seq + column) * vocab;
                out.extend_from_slice(&logits[start..start + vocab]);
            }
        }
    }
    out
}

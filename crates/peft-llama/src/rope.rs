//! Rotary position embeddings (RoPE) in Hugging Face's rotate-half layout, with Llama-3 scaling.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::{Llama3RopeScaling, LlamaConfig};

/// The inverse frequencies of a model's RoPE, computed once from its configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryEmbedding {
    /// `head_dim / 2` inverse frequencies, rounded to f32 as Hugging Face stores them.
    inv_freq: Vec<f32>,
}

fn llama3_scale(inv_freq: f64, scaling: &Llama3RopeScaling) -> f64 {
    let old_context = scaling.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / scaling.low_freq_factor;
    let high_freq_wavelen = old_context / scaling.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / scaling.factor
    } else {
        let smooth = (old_context / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor);
        (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    }
}

impl RotaryEmbedding {
    /// Computes the frequencies for `config` (theta and optional Llama-3 scaling, as parameters
    /// or as explicit per-frequency divisors).
    pub fn new(config: &LlamaConfig) -> Self {
        let dim = config.head_dim;
        let inv_freq = (0..dim / 2)
            .map(|i| {
                // Hugging Face computes the base frequencies in f32; rounding here keeps the
                // angles bit-compatible with its checkpoints' behaviour at long positions.
                let exponent = ((2 * i) as f32) / dim as f32;
                let base = 1.0f32 / (config.rope_theta as f32).powf(exponent);

                match (&config.rope_scaling, &config.rope_freq_factors) {
                    (_, Some(factors)) => base / factors[i],
                    (Some(scaling), None) => llama3_scale(base as f64, scaling) as f32,
                    (None, None) => base,
                }
            })
            .collect();
        Self { inv_freq }
    }

    /// The inverse frequencies, `head_dim / 2` of them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Cosine and sine tables for the given positions (`batch · seq` of them, row-major),
    /// each `[batch, 1, seq, head_dim]`, ready to broadcast over heads.
    pub fn tables<B: Backend>(
        &self,
        positions: &[usize],
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(positions.len() * dim);
        let mut sin = Vec::with_capacity(positions.len() * dim);
        for &position in positions {
            let start = cos.len();
            for &freq in &self.inv_freq {
                // Angles in f64: exact for any context length (Hugging Face rounds them to f32,
                // which at position 4096 is off by up to 2e-4 rad).
                let angle = freq as f64 * position as f64;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let shape = [batch, 1, seq, dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// Applies rotary embeddings to `x` `[batch, heads, seq, head_dim]` with tables from
/// [`RotaryEmbedding::tables`] (see [`peft_ops::blocks::rotary`]).
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    peft_ops::blocks::rotary(x, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let scaling = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // wavelength 2π/1 ≈ 6.3 < 2048: unchanged.
        assert_eq!(llama3_scale(1.0, &scaling), 1.0);
        // wavelength ≈ 62832 > 8192: divided by the factor.
        let low = 1e-4;
        assert!((llama3_scale(low, &scaling) - low / 8.0).abs() < 1e-15);
    }

    /// llama.cpp's factors (`1 / ((1 - smooth) / factor + smooth)` between the bounds) divide
    /// the frequencies into what the scaling parameters give, and bad factors are refused.
    #[test]
    fn explicit_frequency_factors_equal_the_llama3_parameters_they_encode() {
        let scaling = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let config = LlamaConfig::new(32, 64, 64, 1, 2, 2, 32);
        let plain = RotaryEmbedding::new(&config);
        let scaled = RotaryEmbedding::new(&config.clone().with_rope_scaling(Some(scaling)));
        let factors: Vec<f32> = plain
            .inv_freq()
            .iter()
            .map(|&f| (f as f64 / llama3_scale(f as f64, &scaling)) as f32)
            .collect();
        assert!(factors.iter().any(|&f| f > 1.0 && f < 8.0), "{factors:?}");
        let explicit = config.clone().with_rope_freq_factors(Some(factors.clone()));
        explicit.validate("test").unwrap();
        for (a, b) in RotaryEmbedding::new(&explicit)
            .inv_freq()
            .iter()
            .zip(scaled.inv_freq())
        {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
        }
        let short = config
            .clone()
            .with_rope_freq_factors(Some(factors[1..].to_vec()));
        assert!(short
            .validate("test")
            .unwrap_err()
            .to_string()
            .contains("needs 16"));
        let mut zero = factors.clone();
        zero[3] = 0.0;
        let zero = config.clone().with_rope_freq_factors(Some(zero));
        assert!(zero
            .validate("test")
            .unwrap_err()
            .to_string()
            .contains("factor 0"));
        let both = explicit.with_rope_scaling(Some(scaling));
        assert!(both.validate("test").is_err());
    }
}

//! The vision tower's configuration, read from Hugging Face `config.json`.
//!
//! [`HfClipVisionConfig`] mirrors `CLIPVisionConfig` as serialised by `transformers` (the fields
//! the vision tower uses; the rest are ignored); [`ClipVisionConfig`] is the checked runtime form.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, VisionError};

/// The MLP activation of the encoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiddenAct {
    /// `x · σ(1.702 x)`, the original CLIP's.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// The exact (erf) GELU.
    #[serde(rename = "gelu")]
    Gelu,
}

fn default_num_channels() -> usize {
    3
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_hidden_act() -> HiddenAct {
    HiddenAct::QuickGelu
}

/// `CLIPVisionConfig` as it appears in `config.json` (also the `vision_config` of a `CLIPConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfClipVisionConfig {
    /// Width of the encoder.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Input channels (3).
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    /// Side of a square patch in pixels.
    pub patch_size: usize,
    /// MLP activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: HiddenAct,
    /// Layer-norm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// The checked configuration of a [`crate::ClipVisionModel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the encoder.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Side of the square input image in pixels.
    pub image_size: usize,
    /// Side of a square patch in pixels.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: HiddenAct,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Reads `config.json` of a `CLIPVisionModel`, or the `vision_config` of a full `CLIPModel`'s.
    ///
    /// # Errors
    /// An unreadable file, malformed JSON, a missing field, or inconsistent sizes.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| VisionError::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `origin` names it in errors.
    ///
    /// # Errors
    /// See [`ClipVisionConfig::from_file`].
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let bad = |message: String| VisionError::Config {
            origin: origin.into(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let vision = match value.get("vision_config") {
            Some(nested) => nested.clone(),
            None => value,
        };
        let hf: HfClipVisionConfig = serde_json::from_value(vision)
            .map_err(|e| bad(format!("not a CLIP vision configuration: {e}")))?;
        Self::try_from_hf(hf, origin)
    }

    /// Checks a Hugging Face configuration.
    ///
    /// # Errors
    /// Zero sizes, a width not divisible by the heads, or an image not divisible into patches.
    pub fn try_from_hf(hf: HfClipVisionConfig, origin: &str) -> Result<Self> {
        let bad = |message: String| VisionError::Config {
            origin: origin.into(),
            message,
        };
        let sizes = [
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", hf.intermediate_size),
            ("num_hidden_layers", hf.num_hidden_layers),
            ("num_attention_heads", hf.num_attention_heads),
            ("num_channels", hf.num_channels),
            ("image_size", hf.image_size),
            ("patch_size", hf.patch_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(bad(format!("{name} must be positive")));
        }
        if !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                hf.hidden_size, hf.num_attention_heads
            )));
        }
        if !hf.image_size.is_multiple_of(hf.patch_size) {
            return Err(bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                hf.image_size, hf.patch_size
            )));
        }
        if hf.layer_norm_eps.is_nan() || hf.layer_norm_eps <= 0.0 {
            return Err(bad(format!(
                "layer_norm_eps must be positive, found {}",
                hf.layer_norm_eps
            )));
        }
        Ok(Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_channels: hf.num_channels,
            image_size: hf.image_size,
            patch_size: hf.patch_size,
            hidden_act: hf.hidden_act,
            layer_norm_eps: hf.layer_norm_eps,
        })
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Sequence length of the encoder: the class token plus one token per patch.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Values in one flattened patch (`channels · patch²`).
    pub fn patch_values(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VISION: &str = r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 16}"#;

    #[test]
    fn full_clip_config_yields_its_vision_config() {
        let full = format!(r#"{{"text_config": {{"hidden_size": 8}}, "vision_config": {VISION}}}"#);
        let direct = ClipVisionConfig::from_json(VISION, "vision").unwrap();
        assert_eq!(ClipVisionConfig::from_json(&full, "full").unwrap(), direct);
        assert_eq!(direct.hidden_act, HiddenAct::QuickGelu);
        assert_eq!(direct.num_positions(), 17);
    }

    #[test]
    fn inconsistent_sizes_are_refused_naming_the_field() {
        let bad = VISION.replace("\"patch_size\": 8", "\"patch_size\": 5");
        let message = ClipVisionConfig::from_json(&bad, "c.json")
            .unwrap_err()
            .to_string();
        assert!(message.contains("patch_size 5"), "{message}");
        let unknown_act = VISION.replace("}", r#", "hidden_act": "relu"}"#);
        assert!(ClipVisionConfig::from_json(&unknown_act, "c.json").is_err());
    }
}

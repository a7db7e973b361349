//! Loading a [`ClipVisionModel`] from a Hugging Face checkpoint directory.
//!
//! Accepted layouts: a `CLIPVisionModel` as `transformers` 5 saves it (`embeddings.*`,
//! `encoder.layers.{i}.*`, `pre_layrnorm.*`, `post_layernorm.*`), the same under
//! `vision_model.` (older `transformers`), and a full `CLIPModel` (`vision_model.*` plus the text
//! tower and projections, which are left alone on purpose since a vision tower has no use for
//! them). Every other tensor is reported as unexpected, every absent one as missing.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use peft_io::{transpose, TensorMap};

use crate::clip::{ClipAttention, ClipEncoderLayer, ClipMlp, ClipVisionModel};
use crate::config::ClipVisionConfig;
use crate::error::{Result, VisionError};

/// Prefixes of a full `CLIPModel`'s tensors that a vision tower does not use.
const TEXT_SIDE: [&str; 4] = [
    "text_model.",
    "text_projection.",
    "visual_projection.",
    "logit_scale",
];

/// Loads a frozen CLIP vision tower: `ClipVisionLoader::new(dir).load::<B>(&device)?`.
#[derive(Debug, Clone)]
pub struct ClipVisionLoader {
    dir: PathBuf,
}

impl ClipVisionLoader {
    /// A loader for the checkpoint directory `dir` (`config.json` and `*.safetensors`).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
        }
    }

    /// Reads the configuration only.
    ///
    /// # Errors
    /// See [`ClipVisionConfig::from_file`].
    pub fn config(&self) -> Result<ClipVisionConfig> {
        ClipVisionConfig::from_file(self.dir.join("config.json"))
    }

    /// Loads configuration and weights.
    ///
    /// # Errors
    /// A bad configuration, no or unreadable safetensors files, and every missing, unexpected,
    /// mis-shaped or non-finite tensor.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<ClipVisionModel<B>> {
        let config = self.config()?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|e| VisionError::io(&self.dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(VisionError::io(
                &self.dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no .safetensors file in the checkpoint directory",
                ),
            ));
        }
        let mut tensors = TensorMap::new(self.dir.display().to_string());
        for file in &files {
            tensors.add_safetensors(file)?;
        }
        let prefix = if tensors.contains("vision_model.embeddings.class_embedding") {
            "vision_model."
        } else {
            ""
        };
        let unused: Vec<String> = tensors
            .keys()
            .filter(|k| TEXT_SIDE.iter().any(|p| k.starts_with(p)))
            .cloned()
            .collect();
        for key in unused {
            tensors.discard(&key);
        }
        let model = Builder {
            tensors: &mut tensors,
            prefix,
            config: &config,
            device,
        }
        .build()?;
        tensors.finish()?;
        Ok(ClipVisionModel {
            name_or_path: Some(self.dir.display().to_string()),
            ..model
        })
    }
}

struct Builder<'a, B: Backend> {
    tensors: &'a mut TensorMap,
    prefix: &'a str,
    config: &'a ClipVisionConfig,
    device: &'a B::Device,
}

impl<B: Backend> Builder<'_, B> {
    fn param<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<B, D>> {
        let tensor = Tensor::from_data(TensorData::new(values, shape), self.device);
        Param::from_tensor(tensor).set_require_grad(false)
    }

    fn take<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Vec<f32>> {
        let key = format!("{}{name}", self.prefix);
        Ok(self.tensors.take_f32(&key, &shape)?)
    }

    fn linear(&mut self, name: &str, inp: usize, out: usize) -> Result<Linear<B>> {
        let weight = self.take(&format!("{name}.weight"), [out, inp])?;
        let bias = self.take(&format!("{name}.bias"), [out])?;
        Ok(Linear {
            weight: self.param(transpose(&weight, out, inp), [inp, out]),
            bias: Some(self.param(bias, [out])),
        })
    }

    fn layer_norm(&mut self, name: &str) -> Result<LayerNorm<B>> {
        let width = self.config.hidden_size;
        let mut norm = LayerNormConfig::new(width)
            .with_epsilon(self.config.layer_norm_eps)
            .init(self.device);
        let gamma = self.take(&format!("{name}.weight"), [width])?;
        let beta = self.take(&format!("{name}.bias"), [width])?;
        norm.gamma = self.param(gamma, [width]);
        norm.beta = Some(self.param(beta, [width]));
        Ok(norm)
    }

    fn build(mut self) -> Result<ClipVisionModel<B>> {
        let c = self.config.clone();
        let (hidden, inner) = (c.hidden_size, c.intermediate_size);
        let kernel = self.take(
            "embeddings.patch_embedding.weight",
            [hidden, c.num_channels, c.patch_size, c.patch_size],
        )?;
        let patch_embedding = self.param(
            transpose(&kernel, hidden, c.patch_values()),
            [c.patch_values(), hidden],
        );
        let class = self.take("embeddings.class_embedding", [hidden])?;
        let positions = self.take(
            "embeddings.position_embedding.weight",
            [c.num_positions(), hidden],
        )?;
        let pre_layrnorm = self.layer_norm("pre_layrnorm")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layers.{i}");
            layers.push(ClipEncoderLayer {
                layer_norm1: self.layer_norm(&format!("{p}.layer_norm1"))?,
                self_attn: ClipAttention {
                    q_proj: self.linear(&format!("{p}.self_attn.q_proj"), hidden, hidden)?,
                    k_proj: self.linear(&format!("{p}.self_attn.k_proj"), hidden, hidden)?,
                    v_proj: self.linear(&format!("{p}.self_attn.v_proj"), hidden, hidden)?,
                    out_proj: self.linear(&format!("{p}.self_attn.out_proj"), hidden, hidden)?,
                    num_heads: c.num_attention_heads,
                },
                layer_norm2: self.layer_norm(&format!("{p}.layer_norm2"))?,
                mlp: ClipMlp {
                    fc1: self.linear(&format!("{p}.mlp.fc1"), hidden, inner)?,
                    fc2: self.linear(&format!("{p}.mlp.fc2"), inner, hidden)?,
                    act: c.hidden_act,
                },
            });
        }
        let post_layernorm = self.layer_norm("post_layernorm")?;
        Ok(ClipVisionModel {
            patch_embedding,
            class_embedding: self.param(class, [hidden]),
            position_embedding: self.param(positions, [c.num_positions(), hidden]),
            pre_layrnorm,
            layers,
            post_layernorm,
            config: c,
            name_or_path: None,
        })
    }
}

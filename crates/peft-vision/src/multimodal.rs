//! Multimodal LLaMA-Adapter (paper §4.3, eq. 9–10): the class tokens of several layers of a
//! frozen CLIP vision tower, concatenated (`I = [I₁; …; I_M]`), go through a trainable projection
//! to the LLaMA width (`I_p = Projection(I)`), and the result is added to every adaption prompt
//! of every adapted layer (`P_l^v = P_l + I_p`), per example. Prompts, gates and the projection
//! train; zero-initialised gates still make the untrained model equal to the base model.
//!
//! The projection is an MLP, `Linear(M·D_v, D) → GELU → Linear(D, D)` (the paper only says "a
//! learnable projection network").
//!
//! Without an image ([`Adapter::hooks`]) the prompts are used unshifted, so the adapter also
//! answers text-only inputs exactly as a text-only LLaMA-Adapter with the same prompts would.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{backend::Backend, Tensor};
use peft_core::{
    host_values, AdaptableModel, Adapter, AdaptionPrompt, AdaptionPromptConfig, Features,
    LayerHooks, ModelGeometry, NamedTensor, PeftMethod,
};

use crate::clip::{check_feature_layers, ClipVisionModel};
use crate::error::{Result, VisionError};

/// Configuration of [`MultimodalAdaptionPrompt`].
#[derive(Config, Debug, PartialEq)]
pub struct MultimodalAdaptionPromptConfig {
    /// The adaption prompts and gates.
    pub adaption_prompt: AdaptionPromptConfig,
    /// Hidden-state indices of the vision tower whose class tokens are concatenated
    /// (0 = embeddings, `i` = after encoder layer `i`).
    pub feature_layers: Vec<usize>,
    /// Width `D_v` of the vision tower.
    pub visual_hidden_size: usize,
}

impl MultimodalAdaptionPromptConfig {
    /// A configuration for `vision`'s tower with the given feature layers.
    pub fn for_vision(
        adaption_prompt: AdaptionPromptConfig,
        vision: &crate::ClipVisionConfig,
        feature_layers: Vec<usize>,
    ) -> Self {
        Self::new(adaption_prompt, feature_layers, vision.hidden_size)
    }

    /// Width of the concatenated features, `M · D_v`.
    pub fn feature_width(&self) -> usize {
        self.feature_layers.len() * self.visual_hidden_size
    }

    /// Checks the configuration against a LLaMA.
    ///
    /// # Errors
    /// An invalid adaption-prompt configuration, no feature layers or a zero width.
    pub fn validate(&self, model: &ModelGeometry) -> Result<()> {
        self.adaption_prompt.validate(model)?;
        if self.feature_layers.is_empty() || self.visual_hidden_size == 0 {
            return Err(VisionError::Config {
                origin: "multimodal adaption prompt".into(),
                message: "feature_layers must be non-empty and visual_hidden_size positive".into(),
            });
        }
        Ok(())
    }

    /// Checks the feature layers against a vision tower.
    ///
    /// # Errors
    /// A width other than the tower's, or a layer it does not have.
    pub fn check_vision(&self, vision: &crate::ClipVisionConfig) -> Result<()> {
        if vision.hidden_size != self.visual_hidden_size {
            return Err(VisionError::Config {
                origin: "multimodal adaption prompt".into(),
                message: format!(
                    "made for a vision tower of width {}, this one has {}",
                    self.visual_hidden_size, vision.hidden_size
                ),
            });
        }
        check_feature_layers(&self.feature_layers, vision.num_hidden_layers).map(|_| ())
    }

    /// Trainable parameters: the adaption prompts' plus the projection's
    /// (`(M·D_v + 1)·D + (D + 1)·D`).
    pub fn num_trainable_parameters(&self, model: &ModelGeometry) -> usize {
        let width = model.hidden_size;
        self.adaption_prompt.num_trainable_parameters(model)
            + (self.feature_width() + 1) * width
            + (width + 1) * width
    }

    /// Creates the adapter: prompts and zero gates as [`AdaptionPromptConfig::init`], the
    /// projection with Burn's default `Linear` initialisation.
    ///
    /// # Errors
    /// See [`MultimodalAdaptionPromptConfig::validate`].
    pub fn init<B: Backend>(
        &self,
        model: &(impl AdaptableModel<B> + ?Sized),
        device: &B::Device,
    ) -> Result<MultimodalAdaptionPrompt<B>> {
        self.validate(&model.geometry())?;
        let width = model.geometry().hidden_size;
        Ok(MultimodalAdaptionPrompt {
            adaption_prompt: self.adaption_prompt.init(model, device)?,
            projection: VisualProjection {
                first: LinearConfig::new(self.feature_width(), width).init(device),
                second: LinearConfig::new(width, width).init(device),
            },
            config: self.clone(),
        })
    }
}

/// The projection from multi-scale visual features to the LLaMA width.
#[derive(Module, Debug)]
pub struct VisualProjection<B: Backend> {
    /// `[M·D_v, D]`.
    pub first: Linear<B>,
    /// `[D, D]`.
    pub second: Linear<B>,
}

impl<B: Backend> VisualProjection<B> {
    /// `[batch, M·D_v]` → `[batch, D]`.
    pub fn forward(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        self.second.forward(gelu(self.first.forward(features)))
    }
}

/// Adaption prompts conditioned on an image.
#[derive(Module, Debug)]
pub struct MultimodalAdaptionPrompt<B: Backend> {
    /// Prompts and gates.
    pub adaption_prompt: AdaptionPrompt<B>,
    /// The visual projection.
    pub projection: VisualProjection<B>,
    /// Settings.
    #[module(skip)]
    pub config: MultimodalAdaptionPromptConfig,
}

impl<B: Backend> MultimodalAdaptionPrompt<B> {
    /// The multi-scale features of `pixels` `[batch, 3, image, image]` from the frozen `vision`
    /// tower, `[batch, M·D_v]`, detached: the tower never receives gradients.
    ///
    /// # Errors
    /// A tower that does not match the configuration, or pixels of the wrong size.
    pub fn visual_features(
        &self,
        vision: &ClipVisionModel<B>,
        pixels: Tensor<B, 4>,
    ) -> Result<Tensor<B, 2>> {
        self.config.check_vision(&vision.config)?;
        Ok(vision
            .class_token_features(pixels, &self.config.feature_layers)?
            .detach())
    }

    /// Hooks for a batch of token rows with one image each: `features` `[batch, M·D_v]` as
    /// [`MultimodalAdaptionPrompt::visual_features`] returns, `batch` the token batch's size.
    ///
    /// # Errors
    /// [`VisionError::Shape`] if `features` is not `[batch, M·D_v]`.
    pub fn hooks_with_image<'a>(
        &'a self,
        base: &dyn AdaptableModel<B>,
        features: Tensor<B, 2>,
        batch: usize,
    ) -> Result<Box<dyn LayerHooks<B> + 'a>> {
        self.hooks_with_images(base, features, &vec![true; batch])
    }

    /// Hooks for a batch in which some rows have no image (`present[row]` false): those rows'
    /// prompts are not shifted, as in the text-only path; their `features` rows are ignored.
    ///
    /// # Errors
    /// [`VisionError::Shape`] if `features` is not `[present.len(), M·D_v]`.
    pub fn hooks_with_images<'a>(
        &'a self,
        base: &dyn AdaptableModel<B>,
        features: Tensor<B, 2>,
        present: &[bool],
    ) -> Result<Box<dyn LayerHooks<B> + 'a>> {
        let expected = [present.len(), self.config.feature_width()];
        if features.dims() != expected {
            return Err(VisionError::Shape {
                what: "visual features".into(),
                expected: expected.to_vec(),
                found: features.dims().to_vec(),
            });
        }
        // Rows without an image get no offset.
        let conditioning = Features {
            values: features,
            present: present.to_vec(),
        };
        let offset = conditioning.masked(self.projection.forward(conditioning.values.clone()));
        Ok(self.adaption_prompt.hooks_with_prompt_offset(base, offset))
    }
}

impl<B: Backend> Adapter<B> for MultimodalAdaptionPrompt<B> {
    fn method(&self) -> PeftMethod {
        PeftMethod::AdaptionPrompt
    }

    fn check_compatible(&self, model: &dyn AdaptableModel<B>) -> peft_core::Result<()> {
        self.adaption_prompt.check_compatible(model)?;
        let config = model.geometry();
        let [input, output] = self.projection.first.weight.dims();
        let [_, last] = self.projection.second.weight.dims();
        if input != self.config.feature_width() || output != config.hidden_size || last != output {
            return Err(peft_core::PeftError::Incompatible(format!(
                "visual projection {input} → {output} → {last}, expected {} → {} → {}",
                self.config.feature_width(),
                config.hidden_size,
                config.hidden_size
            )));
        }
        Ok(())
    }

    /// Text only: the prompts without an image offset.
    fn hooks<'a>(&'a self, model: &dyn AdaptableModel<B>) -> Box<dyn LayerHooks<B> + 'a> {
        self.adaption_prompt.hooks(model)
    }

    /// `features` are the visual features `[batch, M·D_v]` of one image per row, as
    /// [`MultimodalAdaptionPrompt::visual_features`] returns them.
    fn hooks_with_features<'a>(
        &'a self,
        model: &dyn AdaptableModel<B>,
        features: Features<B>,
    ) -> peft_core::Result<Box<dyn LayerHooks<B> + 'a>> {
        self.hooks_with_images(model, features.values, &features.present)
            .map_err(|e| peft_core::PeftError::Incompatible(e.to_string()))
    }

    /// The adaption prompts under PEFT's names, then the projection under
    /// `visual_projection.{first,second}.{weight,bias}` (`weight` `[in, out]`). PEFT itself has
    /// no multimodal adaption prompt; this crate's file format stores these.
    fn named_tensors(&self) -> Vec<NamedTensor> {
        let mut out = self.adaption_prompt.named_tensors();
        for (name, linear) in [
            ("first", &self.projection.first),
            ("second", &self.projection.second),
        ] {
            out.push(NamedTensor {
                key: format!("visual_projection.{name}.weight"),
                shape: linear.weight.dims().to_vec(),
                values: host_values(linear.weight.val()),
            });
            if let Some(bias) = &linear.bias {
                out.push(NamedTensor {
                    key: format!("visual_projection.{name}.bias"),
                    shape: bias.dims().to_vec(),
                    values: host_values(bias.val()),
                });
            }
        }
        out
    }
}

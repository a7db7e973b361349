//! Vision for parameter-efficient LLaMA fine-tuning: a CLIP vision tower in Burn, CLIP's image
//! preprocessing, and the multimodal LLaMA-Adapter, whose adaption prompts are shifted by a
//! projected image feature (Zhang et al. 2023, eq. 9–10).
//!
//! The pipeline: an image file → [`ClipImageProcessor`] (pixel values) → the frozen
//! [`ClipVisionModel`] (class tokens of chosen layers, concatenated) →
//! [`MultimodalAdaptionPrompt`] (projection, added to every prompt) → the LLaMA's hooks.
//!
//! ```no_run
//! use peft_core::AdaptionPromptConfig;
//! use peft_llama::{LlamaLoader, TokenBatch};
//! use peft_vision::{ClipImageProcessor, ClipVisionLoader, MultimodalAdaptionPromptConfig};
//! # type B = burn::backend::NdArray;
//! let device = Default::default();
//! let base = LlamaLoader::new("models/stories260k").load::<B>(&device)?;
//! let vision = ClipVisionLoader::new("fixtures/clip/model").load::<B>(&device)?;
//! let pixels = ClipImageProcessor::new(vision.config.image_size)
//!     .batch::<B, _>(&["fixtures/clip/test_image.png"], &device)?;
//! let adapter = MultimodalAdaptionPromptConfig::for_vision(
//!     AdaptionPromptConfig::new().with_adapter_len(4).with_adapter_layers(2),
//!     &vision.config,
//!     vec![1, 2, 3],
//! )
//! .init::<B>(&base, &device)?;
//! let features = adapter.visual_features(&vision, pixels)?;
//! let tokens = TokenBatch::from_rows(&[vec![1, 403, 407]])?;
//! let hooks = adapter.hooks_with_image(&base, features, 1)?;
//! // Gates start at zero: these logits equal the base model's.
//! let logits = base.forward(&tokens, hooks.as_ref(), None)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod adaptable;
pub mod clip;
pub mod config;
pub mod error;
pub mod multimodal;
pub mod multimodal_format;
pub mod preprocess;
pub mod visual_qa;
pub mod visual_train;
pub mod weights;

pub use adaptable::PeftClip;
pub use clip::{ClipVisionModel, ClipVisionOutput};
pub use config::{ClipVisionConfig, HfClipVisionConfig, HiddenAct};
pub use error::{Result, VisionError};
pub use multimodal::{MultimodalAdaptionPrompt, MultimodalAdaptionPromptConfig, VisualProjection};
pub use multimodal_format::{is_multimodal_adapter, load_multimodal, save_multimodal};
pub use preprocess::{ClipImageProcessor, RgbImage, CLIP_MEAN, CLIP_STD};
pub use visual_qa::{load_visual_qa, PromptTemplate, VisualQaLayout, VisualQaRecord};
pub use visual_train::{choice_accuracy, image_features, visual_examples, without_features};
pub use weights::ClipVisionLoader;

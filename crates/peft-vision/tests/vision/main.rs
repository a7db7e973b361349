//! `peft-vision`'s tests, one binary: the CLIP tower and preprocessing against `transformers`,
//! adapters on the CLIP tower against `peft`, the multimodal adapter, and hostile images.

mod adapters;
mod hostile_images;
mod multimodal;
mod parity;

//! Writes a LoRA made in Rust for the CLIP fixture tower (random non-zero values, on the
//! attention projections and both MLP layers), with the outputs this crate computes with it, so
//! that `scripts/check_rust_clip_adapter.py` can load it with Hugging Face PEFT onto
//! `transformers`' `CLIPVisionModel` and compare.
//!
//! ```sh
//! cargo run -p peft-vision --example write_clip_adapter -- OUT_DIR
//! ```
//!
//! Writes `OUT_DIR/adapter_config.json`, `OUT_DIR/adapter_model.safetensors` and
//! `OUT_DIR/outputs.safetensors` (`pixel_values`, `last_hidden_state`, `pooler_output`).

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use peft_core::{host_values, save_adapter, AnyAdapter, LoraConfig, Randomise, TargetModules};
use peft_vision::{ClipVisionLoader, PeftClip};

type B = NdArray<f32>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: write_clip_adapter OUT_DIR")?,
    );
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/clip");
    let device = Default::default();
    let base = ClipVisionLoader::new(fixtures.join("model")).load::<B>(&device)?;
    let lora = LoraConfig::new()
        .with_r(2)
        .with_lora_alpha(4.0)
        .with_target_modules(TargetModules::names(&[
            "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",
        ]))
        .init::<B>(&base, &device)?
        .map(&mut Randomise(0.3));
    let adapter = AnyAdapter::from(lora);
    save_adapter(&adapter, &base, &out, None)?;

    let bytes = std::fs::read(fixtures.join("features.safetensors"))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let view = file.tensor("pixel_values")?;
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let shape: [usize; 4] = view.shape().try_into()?;
    let pixels = Tensor::<B, 4>::from_data(TensorData::new(values.clone(), shape), &device);
    let model = peft_core::PeftModel::with_adapter(base, adapter)?;
    let output = model.forward(pixels)?;
    let tensors = [
        ("pixel_values", shape.to_vec(), values),
        (
            "last_hidden_state",
            output.last_hidden_state.dims().to_vec(),
            host_values(output.last_hidden_state),
        ),
        (
            "pooler_output",
            output.pooler_output.dims().to_vec(),
            host_values(output.pooler_output),
        ),
    ];
    let named: Vec<peft_core::NamedTensor> = tensors
        .into_iter()
        .map(|(key, shape, values)| peft_core::NamedTensor {
            key: key.into(),
            shape,
            values,
        })
        .collect();
    let path = out.join("outputs.safetensors");
    std::fs::write(
        &path,
        peft_core::peft_format::safetensors_bytes(&named, &path)?,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}

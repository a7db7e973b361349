//! The README's "Use as a library" program: LoRA on the built-in model through `peft-core`'s
//! model interface, a forward pass, and a PEFT directory Python's `peft` loads.
//!
//! ```sh
//! cargo run --release -p peft-llama --example quickstart
//! ```

use burn::backend::NdArray;
use peft_core::prelude::*;
use peft_llama::{LlamaLoader, PeftLlama, TokenBatch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    type B = NdArray<f32>;
    let device = Default::default();
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let base = LlamaLoader::new(models.join("stories260k")).load::<B>(&device)?;
    // LoRA on every layer's query and value projections (PEFT's default for LLaMA);
    // `TargetModules::parse(&["all-linear"])` or a regular expression work too.
    let lora = LoraConfig::new()
        .with_target_modules(TargetModules::names(&["q_proj", "v_proj"]))
        .init::<B>(&base, &device)?;
    let model = PeftModel::with_adapter(base, AnyAdapter::from(lora))?;
    let tokens = TokenBatch::from_rows(&[vec![1, 403, 407]])?;
    let logits = model.forward(&tokens, None)?; // [1, 3, vocab]; B = 0, so the base model's
    println!("logits {:?}", logits.dims());
    // A PEFT directory that Python's `PeftModel.from_pretrained` loads:
    let dir = std::env::temp_dir().join("peft-rs-quickstart");
    let adapter = model.adapter("default").ok_or("no adapter")?;
    let format = save_adapter(adapter, model.base(), &dir, None)?;
    println!("saved as {format:?} in {}", dir.display());
    Ok(())
}

//! The tests of `peft-llama`, one binary: the model against the reference fixtures (logits,
//! gradients, loading), hostile checkpoints, and every `peft-core` method on LLaMA (PEFT
//! interop both ways, official `.pth`, adapter properties, hostile adapter files).

mod common;

mod adapters_adapter_files;
mod adapters_hostile_inputs;
mod adapters_parity;
mod adapters_properties;
mod chat_templates;
mod families;
mod gguf;
mod hostile_inputs;
mod parity;
mod quantized;

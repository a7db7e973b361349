//! `peft-train`'s integration tests, one binary: hostile data files, training over a quantized
//! base, and data-parallel training (with the `parallel` feature).

mod data_parallel;
mod hostile_inputs;
mod quantized_base;

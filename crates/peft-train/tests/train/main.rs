//! `peft-train`'s integration tests, one binary: hostile data files, and data-parallel training
//! (with the `parallel` feature).

mod data_parallel;
mod hostile_inputs;

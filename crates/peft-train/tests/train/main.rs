//! `peft-train`'s integration tests, one binary: hostile data files, training over a quantized
//! base, and data-parallel training (with the `parallel` feature).

mod data_parallel;
mod hostile_inputs;
mod quantized_base;

use std::sync::{Mutex, MutexGuard};

/// Held by every test that seeds the backend's random generator and draws from it (model and
/// adapter initialisation, dropout), and by the data-parallel runs (`burn-collective` has one
/// server per backend and process): the generator is one per process, so two such tests running at
/// once on the harness's threads would draw each other's numbers and train different adapters.
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

//! The `peft` command's tests, one binary: training from the command line, data parallelism
//! over devices, and crash safety (kill -9 at any instant).

mod common;
mod crash_safety;
mod data_parallel;
mod train;

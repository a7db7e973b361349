//! The tests of `peft-ops`, one binary: the product against an f64 host reference, and the
//! autodiff nodes against the chains of operations they replace.

mod blocks;
mod matmul;

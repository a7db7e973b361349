//! Fast paths for the operations of transformer models in Burn, usable by any model crate.
//!
//! - [`tensor`]: the product every projection and attention uses ([`tensor::matmul`],
//!   [`tensor::linear_rows`]), on cuBLAS with the `cuda` feature, and dtype helpers;
//! - [`blocks`]: RMSNorm, SwiGLU, the rotary embedding, the attention softmax and attention as
//!   single autodiff nodes (hand-written CUDA kernels inside on the CUDA backend), with the
//!   chains of tensor operations they replace in [`blocks::composed`] as the reference;
//! - [`dispatch`]: the run-time check of which backend a generic `B` is;
//! - [`quant`]: frozen linear layers whose weight stays quantized (NF4, Q8_0, GGUF blocks),
//!   differentiable with respect to their input, and [`quant::FrozenLinear`];
//! - [`options`]: the switches of the CUDA fast paths (typed; `PEFT_*` variables as defaults).
//!
//! Every function is generic over `B: Backend` and gives the same values on every backend; the
//! fast paths are taken only where they exist.
//!
//! ```
//! use burn::tensor::Tensor;
//! # type B = burn::backend::NdArray<f32>;
//! let device = Default::default();
//! let a = Tensor::<B, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
//! let b = Tensor::<B, 2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
//! let product = peft_ops::tensor::matmul(a, b);
//! assert_eq!(product.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
//! ```
#![warn(missing_docs)]

pub mod blocks;
#[cfg(feature = "ndarray")]
mod cpu;
#[cfg(feature = "cuda")]
pub mod cublas;
pub mod dispatch;
mod graph;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod options;
pub mod quant;
pub mod tensor;

pub use tensor::{cast_to, linear_rows, matmul, repeat_kv, upcast};

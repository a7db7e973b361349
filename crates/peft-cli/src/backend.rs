//! The Burn backend the binary is built for: CPU (`ndarray`) by default, CUDA with `--features cuda`.

#[cfg(not(feature = "cuda"))]
/// The inference backend.
pub type Inference = burn::backend::NdArray<f32>;
#[cfg(feature = "cuda")]
/// The inference backend.
pub type Inference = burn::backend::Cuda<f32>;

/// The training backend.
#[allow(dead_code)]
pub type Training = burn::backend::Autodiff<Inference>;

/// The device to run on.
pub fn device() -> burn::tensor::Device<Inference> {
    Default::default()
}

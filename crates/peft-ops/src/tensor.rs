//! Tensor helpers every model and adapter shares: products that take the fast path where there
//! is one, dtype casts for reductions, grouped-query head repetition.

use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Tensor};

/// `linear` applied to `x` `[batch, seq, in]` as one 2-D product `[batch · seq, in] × [in, out]`.
///
/// Burn's `Linear::forward` on a 3-D input broadcasts the weight over the batch dimension; on
/// CUDA that batched product ran at 36 TFLOP/s where the same work as one 2-D product ran at
/// 87 (bf16, LLaMA-7B shapes, H100; `examples/op_profile.rs`). The result is the same.
pub fn linear_rows<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, seq, width] = x.dims();
    let rows = x.reshape([batch * seq, width]);
    let mut output = matmul(rows, linear.weight.val());
    if let Some(bias) = &linear.bias {
        output = output + bias.val().unsqueeze_dim(0);
    }
    let [_, out] = output.dims();
    output.reshape([batch, seq, out])
}

/// `a.matmul(b)`; on the CUDA backend, products with the same leading dimensions go to cuBLAS
/// (see `cublas.rs`, built with the `cuda` feature), and on the CPU backend f32 products read
/// transposed operands in place instead of copying them (see `cpu.rs`).
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "cuda")]
    let (a, b) = match crate::cublas::matmul(a, b) {
        Ok(product) => return product,
        Err(operands) => operands,
    };
    #[cfg(feature = "ndarray")]
    let (a, b) = match crate::cpu::matmul(a, b) {
        Ok(product) => return product,
        Err(operands) => operands,
    };
    a.matmul(b)
}

/// Casts half-precision tensors (f16, bf16) to f32 for reductions; f32 and f64 stay as they are.
pub fn upcast<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.cast(DType::F32),
        _ => x,
    }
}

/// Casts `x` to `dtype` unless it already has it.
pub fn cast_to<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// The attention bias of masked keys. `-inf` gives exact zeros after the softmax and keeps
/// `exp` on its fast path (a huge finite value takes libm's slow underflow path); the model
/// guarantees every query row keeps at least one visible key.
pub fn mask_value() -> f32 {
    f32::NEG_INFINITY
}

/// Repeats key/value heads `[batch, kv_heads, seq, dim]` to `[batch, kv_heads · n_rep, seq, dim]`,
/// each key/value head serving `n_rep` consecutive query heads (Hugging Face's `repeat_kv`).
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [batch, kv_heads, seq, dim] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, n_rep, seq, dim])
        .reshape([batch, kv_heads * n_rep, seq, dim])
}

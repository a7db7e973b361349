//! Small helpers for writing autodiff nodes: moving between tensors and primitives, and
//! recording a node. A leaf module: every module with nodes of its own (`blocks`, `quant`, the
//! CPU and cuBLAS products) uses it and it uses none of them.

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// A float tensor of `Autodiff<X>` as a primitive.
pub(crate) fn prim<X: Backend, const D: usize>(
    t: Tensor<Autodiff<X>, D>,
) -> FloatTensor<Autodiff<X>> {
    t.into_primitive().tensor()
}

/// A primitive of `X` as a tensor.
pub(crate) fn tensor<X: Backend, const D: usize>(p: FloatTensor<X>) -> Tensor<X, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The primitive of a float tensor.
pub(crate) fn raw<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `out` as the output of the node `op` whose inputs are `parents`; `state()` is what its
/// backward pass reads, built only when one of them needs a gradient.
pub(crate) fn record<X: Backend, N: Backward<X, K>, const K: usize>(
    op: N,
    parents: [&FloatTensor<Autodiff<X>>; K],
    state: impl FnOnce() -> N::State,
    out: FloatTensor<X>,
) -> FloatTensor<Autodiff<X>> {
    match op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

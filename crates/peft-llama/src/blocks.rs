//! RMSNorm, the SwiGLU activation and the attention softmax as single autodiff nodes.
//!
//! Written as chains of tensor operations, these blocks make autodiff keep every intermediate
//! its operations need: RMSNorm keeps an f32 copy of its input (twice the bytes of a bf16
//! model's hidden states), SwiGLU keeps the sigmoid and the activation besides both inputs, and
//! the softmax keeps its f32 exponentials, `[batch, heads, seq, seq]` per layer. As one node
//! each keeps only what its closed-form backward reads:
//!
//! - RMSNorm keeps its input (the residual stream, alive anyway) and `1/rms` per row;
//! - SwiGLU keeps `gate` and `up` (which the down projection and the frozen projections'
//!   products no longer keep, see `cublas.rs`);
//! - the softmax keeps its output in the model's dtype, the same tensor the `probabilities · v`
//!   product keeps.
//!
//! On LLaMA-7B with batch 4 × 512 tokens in bf16 the peak memory of an adaption-prompt step on
//! the CUDA backend fell from 35,991 to 24,259 MiB, about 390 MB per trained layer
//! (`docs/benchmarks.md`).
//! The forward values come from the same operations as the chains (results unchanged); the
//! gradients are the closed forms below, computed in f32 and rounded once, as PyTorch's
//! kernels do.
//!
//! The model stays generic over `B: Backend`: each function checks at run time (a `TypeId`
//! comparison) whether `B` is `Autodiff<X>` for a backend `X` this crate is built with (NdArray,
//! and CUDA with and without fusion) and builds the node then. Any other backend runs
//! [`composed`], with the same values and gradients and more memory.

use std::any::{Any, TypeId};
use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::model::{cast_to, upcast};

/// The chains of tensor operations the nodes replace (backends without autodiff, and autodiff
/// over a backend this crate does not name).
pub mod composed {
    use burn::tensor::activation::{silu, softmax};
    use burn::tensor::backend::Backend;
    use burn::tensor::Tensor;

    use crate::model::{cast_to, upcast};

    /// `weight ⊙ cast(x / rms(x))`, `rms` over the last dimension in f32 (Hugging Face's
    /// `LlamaRMSNorm`).
    pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let x32 = upcast(x);
        let variance = x32.clone().powi_scalar(2).mean_dim(2);
        let normed = x32 * (variance + eps).sqrt().recip();
        weight.unsqueeze::<3>() * cast_to(normed, dtype)
    }

    /// `silu(gate) ⊙ up`, `[batch, seq, intermediate]`.
    pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
        silu(gate) * up
    }

    /// The softmax of attention scores `[batch, heads, queries, keys]` over the keys, computed
    /// in f32 and returned in the scores' dtype.
    pub fn attention_softmax<B: Backend>(scores: Tensor<B, 4>) -> Tensor<B, 4> {
        let dtype = scores.dtype();
        cast_to(softmax(upcast(scores), 3), dtype)
    }
}

/// Returns `$node` (an expression of the inner backend `$x`) from the enclosing function when
/// `$b` is `Autodiff<$x>` for a backend this crate is built with.
macro_rules! on_known_autodiff {
    ($b:ty, $x:ident, $node:expr) => {{
        #[cfg(feature = "ndarray")]
        {
            type $x = burn::backend::NdArray<f32>;
            if is::<$b, Autodiff<$x>>() {
                return $node;
            }
        }
        #[cfg(feature = "cuda")]
        {
            type $x = burn::backend::Cuda<f32>;
            if is::<$b, Autodiff<$x>>() {
                return $node;
            }
        }
        #[cfg(feature = "cuda")]
        {
            type $x = crate::cublas::CudaBare;
            if is::<$b, Autodiff<$x>>() {
                return $node;
            }
        }
    }};
}

/// Whether `A` and `T` are the same type.
fn is<A: 'static, T: 'static>() -> bool {
    TypeId::of::<A>() == TypeId::of::<T>()
}

/// `a` as a `T` when that is its type, else `a` back.
pub(crate) fn downcast<A: 'static, T: 'static>(a: A) -> Result<T, A> {
    let boxed: Box<dyn Any> = Box::new(a);
    match boxed.downcast::<T>() {
        Ok(t) => Ok(*t),
        Err(boxed) => Err(*boxed
            .downcast::<A>()
            .unwrap_or_else(|_| unreachable!("a box holds the type it was made from"))),
    }
}

/// `a` as the `T` it is known to be (a backend checked with [`is`], or on a partner operand).
pub(crate) fn cast<A: 'static, T: 'static>(a: A) -> T {
    downcast::<A, T>(a).unwrap_or_else(|_| unreachable!("the backend was checked"))
}

/// A float tensor of `Autodiff<X>` as a primitive.
fn prim<X: Backend, const D: usize>(t: Tensor<Autodiff<X>, D>) -> FloatTensor<Autodiff<X>> {
    t.into_primitive().tensor()
}

/// A primitive of `X` as a tensor.
fn tensor<X: Backend, const D: usize>(p: FloatTensor<X>) -> Tensor<X, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// RMSNorm over the last dimension of `x` `[batch, seq, hidden]` scaled by `weight`
/// `[hidden]`: the values of [`composed::rms_norm`].
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    on_known_autodiff!(
        B,
        X,
        cast(RmsNormNode::<X>::apply(cast(x), cast(weight), eps))
    );
    composed::rms_norm(x, weight, eps)
}

/// `silu(gate) ⊙ up` for `[batch, seq, intermediate]`: the values of [`composed::swiglu`].
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    on_known_autodiff!(B, X, cast(SwigluNode::<X>::apply(cast(gate), cast(up))));
    composed::swiglu(gate, up)
}

/// The softmax of attention scores `[batch, heads, queries, keys]` over the keys, in f32,
/// returned in the scores' dtype: the values of [`composed::attention_softmax`].
pub fn attention_softmax<B: Backend>(scores: Tensor<B, 4>) -> Tensor<B, 4> {
    on_known_autodiff!(B, X, cast(SoftmaxNode::<X>::apply(cast(scores))));
    composed::attention_softmax(scores)
}

/// The RMSNorm node.
#[derive(Debug)]
struct RmsNormNode<X>(PhantomData<X>);

impl<X: Backend> RmsNormNode<X> {
    fn apply(
        x: Tensor<Autodiff<X>, 3>,
        weight: Tensor<Autodiff<X>, 1>,
        eps: f64,
    ) -> Tensor<Autodiff<X>, 3> {
        let (x, weight) = (prim(x), prim(weight));
        let x_tracked = x.is_tracked();
        let (xi, wi) = (
            tensor::<X, 3>(x.primitive.clone()),
            tensor::<X, 1>(weight.primitive.clone()),
        );
        let dtype = xi.dtype();
        let x32 = upcast(xi.clone());
        let variance = x32.clone().powi_scalar(2).mean_dim(2);
        let inv_rms = (variance + eps).sqrt().recip();
        let out = wi.clone().unsqueeze::<3>() * cast_to(x32 * inv_rms.clone(), dtype);
        let out = out.into_primitive().tensor();
        let node = match Self(PhantomData)
            .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = RmsNormState {
                    x: xi.into_primitive().tensor(),
                    inv_rms: inv_rms.into_primitive().tensor(),
                    weight: x_tracked.then(|| wi.into_primitive().tensor()),
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

/// What the RMSNorm backward reads.
#[derive(Debug, Clone)]
struct RmsNormState<X: Backend> {
    /// The input, in the model's dtype.
    x: FloatTensor<X>,
    /// `1/rms` per row, `[batch, seq, 1]` in f32.
    inv_rms: FloatTensor<X>,
    /// The scale (kept when `x` needs a gradient).
    weight: Option<FloatTensor<X>>,
}

impl<X: Backend> Backward<X, 2> for RmsNormNode<X> {
    type State = RmsNormState<X>;

    /// With `x̂ = x / rms` and `g = dy ⊙ w` (in f32): `dx = (g − x̂ · mean(g ⊙ x̂)) / rms`,
    /// `dw = Σ_rows dy ⊙ x̂`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = tensor::<X, 3>(grads.consume::<X>(&ops.node));
        let state = ops.state;
        let x = tensor::<X, 3>(state.x);
        let dtype = x.dtype();
        let inv_rms = tensor::<X, 3>(state.inv_rms);
        let normed = upcast(x) * inv_rms.clone();
        if let Some(node) = node_w {
            let [batch, seq, hidden] = normed.dims();
            let dw = (dy.clone() * cast_to(normed.clone(), dtype))
                .reshape([batch * seq, hidden])
                .sum_dim(0)
                .reshape([hidden]);
            grads.register::<X>(node.id, dw.into_primitive().tensor());
        }
        if let Some(node) = node_x {
            let weight = tensor::<X, 1>(
                state
                    .weight
                    .unwrap_or_else(|| unreachable!("kept when x is tracked")),
            );
            let g = upcast(dy * weight.unsqueeze::<3>());
            let dot = (g.clone() * normed.clone()).mean_dim(2);
            let dx = (g - normed * dot) * inv_rms;
            grads.register::<X>(node.id, cast_to(dx, dtype).into_primitive().tensor());
        }
    }
}

/// The SwiGLU node.
#[derive(Debug)]
struct SwigluNode<X>(PhantomData<X>);

impl<X: Backend> SwigluNode<X> {
    fn apply(gate: Tensor<Autodiff<X>, 3>, up: Tensor<Autodiff<X>, 3>) -> Tensor<Autodiff<X>, 3> {
        let (gate, up) = (prim(gate), prim(up));
        let (gi, ui) = (
            tensor::<X, 3>(gate.primitive.clone()),
            tensor::<X, 3>(up.primitive.clone()),
        );
        let out = composed::swiglu(gi.clone(), ui.clone())
            .into_primitive()
            .tensor();
        let node = match Self(PhantomData)
            .prepare::<NoCheckpointing>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (gi.into_primitive().tensor(), ui.into_primitive().tensor());
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl<X: Backend> Backward<X, 2> for SwigluNode<X> {
    /// `gate` and `up`, in the model's dtype.
    type State = (FloatTensor<X>, FloatTensor<X>);

    /// With `s = σ(gate)`: `d up = dy ⊙ gate ⊙ s`, `d gate = (dy ⊙ up) ⊙ s ⊙ (1 + gate ⊙ (1 − s))`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = tensor::<X, 3>(grads.consume::<X>(&ops.node));
        let (gate, up) = ops.state;
        let (gate, up) = (tensor::<X, 3>(gate), tensor::<X, 3>(up));
        let dtype = gate.dtype();
        if let Some(node) = node_up {
            // The activation as the forward computed it, in the model's dtype.
            let activation = gate.clone() * sigmoid(gate.clone());
            grads.register::<X>(node.id, (dy.clone() * activation).into_primitive().tensor());
        }
        if let Some(node) = node_gate {
            let gate32 = upcast(gate);
            let s = sigmoid(gate32.clone());
            let dact = upcast(dy * up);
            let dgate = dact * s.clone() * (gate32 * (s.neg() + 1.0) + 1.0);
            grads.register::<X>(node.id, cast_to(dgate, dtype).into_primitive().tensor());
        }
    }
}

/// The attention softmax node.
#[derive(Debug)]
struct SoftmaxNode<X>(PhantomData<X>);

impl<X: Backend> SoftmaxNode<X> {
    fn apply(scores: Tensor<Autodiff<X>, 4>) -> Tensor<Autodiff<X>, 4> {
        let scores = prim(scores);
        let out = composed::attention_softmax(tensor::<X, 4>(scores.primitive.clone()))
            .into_primitive()
            .tensor();
        let node = match Self(PhantomData)
            .prepare::<NoCheckpointing>([scores.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(out.clone(), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl<X: Backend> Backward<X, 1> for SoftmaxNode<X> {
    /// The probabilities, in the model's dtype.
    type State = FloatTensor<X>;

    /// `d scores = p ⊙ (dp − Σ_keys dp ⊙ p)`, in f32.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dp = tensor::<X, 4>(grads.consume::<X>(&ops.node));
        let Some(node) = node else { return };
        let p = tensor::<X, 4>(ops.state);
        let dtype = p.dtype();
        let (p, dp) = (upcast(p), upcast(dp));
        let dot = (dp.clone() * p.clone()).sum_dim(3);
        let dscores = p * (dp - dot);
        grads.register::<X>(node.id, cast_to(dscores, dtype).into_primitive().tensor());
    }
}

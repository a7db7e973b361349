//! RMSNorm, the SwiGLU activation, the rotary embedding, the attention softmax and attention
//! itself as single autodiff nodes, with hand-written CUDA kernels inside on the CUDA backend.
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
//! - the rotary embedding keeps its tables;
//! - the softmax keeps its output in the model's dtype;
//! - attention (`softmax(scale · q kᵀ + bias) v`) keeps `q`, `k` and `v` and recomputes the
//!   probabilities in its backward pass.
//!
//! On LLaMA-7B with batch 4 × 512 tokens in bf16 the peak memory of an adaption-prompt step on
//! the CUDA backend fell from 35,991 to 22,307 MiB (`docs/benchmarks.md`).
//!
//! On the CUDA backend (bare or fused) each node's forward and backward is one kernel of
//! `kernels.cu` (see `kernels.rs`), which also serves the same functions without autodiff
//! (inference). Elsewhere the forward values come from the same operations as the chains and
//! the gradients are the closed forms below, computed in f32 and rounded once, as PyTorch's
//! kernels do.
//!
//! The model stays generic over `B: Backend`: each function checks at run time (a `TypeId`
//! comparison) whether `B` is `Autodiff<X>` for a backend `X` this crate is built with (NdArray,
//! and CUDA with and without fusion) and builds the node then. Any other backend runs
//! [`composed`], with the same values and gradients and more memory.

use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Autodiff;
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::dispatch::{cast, is, Kernel};
use crate::graph::{prim, raw, record, tensor};
use crate::tensor::{cast_to, upcast};

/// The chains of tensor operations the nodes replace (backends without autodiff, and autodiff
/// over a backend this crate does not name).
pub mod composed {
    use burn::tensor::activation::{silu, softmax};
    use burn::tensor::backend::Backend;
    use burn::tensor::Tensor;

    use crate::tensor::{cast_to, upcast};

    /// `weight ⊙ cast(x / rms(x))`, `rms` over the last dimension in f32 (Hugging Face's
    /// `LlamaRMSNorm`).
    pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
        rms_norm_with_inv_rms(x, weight, eps).0
    }

    /// [`rms_norm`] and `1/rms` per row (f32, `[batch, seq, 1]`), which the RMSNorm node's
    /// backward pass reads.
    pub(super) fn rms_norm_with_inv_rms<B: Backend>(
        x: Tensor<B, 3>,
        weight: Tensor<B, 1>,
        eps: f64,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let dtype = x.dtype();
        let x32 = upcast(x);
        let variance = x32.clone().powi_scalar(2).mean_dim(2);
        let inv_rms = (variance + eps).sqrt().recip();
        let out = weight.unsqueeze::<3>() * cast_to(x32 * inv_rms.clone(), dtype);
        (out, inv_rms)
    }

    /// `silu(gate) ⊙ up`, `[batch, seq, intermediate]`.
    pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
        silu(gate) * up
    }

    /// `softmax(scale · scores + bias)` over the keys of attention scores
    /// `[batch, heads, queries, keys]`, computed in f32 and returned in the scores' dtype;
    /// `bias` `[batch or 1, 1, queries, keys]` holds 0 for visible keys and `-inf` for masked
    /// ones.
    pub fn attention_softmax<B: Backend>(
        scores: Tensor<B, 4>,
        scale: f64,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let dtype = scores.dtype();
        let scaled = upcast(scores) * scale;
        let logits = match bias {
            Some(bias) => {
                let bias = cast_to(bias, scaled.dtype());
                scaled + bias
            }
            None => scaled,
        };
        cast_to(softmax(logits, 3), dtype)
    }

    /// Attention `softmax(scale · q kᵀ + bias) v` for queries `[batch, heads, queries, dim]`
    /// and keys and values `[batch, heads, keys, dim]` (heads already repeated), through
    /// [`super::attention_softmax`] and the model's products.
    pub fn attention<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        scale: f64,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let scores = crate::tensor::matmul(q, k.swap_dims(2, 3));
        crate::tensor::matmul(super::attention_softmax(scores, scale, bias), v)
    }

    /// The rotary embedding of `x` `[batch, heads, seq, head_dim]` in the rotate-half layout:
    /// `x ⊙ cos + rotate_half(x) ⊙ sin`, tables `[batch or 1, 1, seq, head_dim]`.
    pub fn rotary<B: Backend>(
        x: Tensor<B, 4>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let half = x.dims()[3] / 2;
        let first = x.clone().narrow(3, 0, half);
        let second = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos.clone() + rotated * sin.clone()
    }
}

/// The outputs of `kernel` on `inputs` when `X` is Burn's CUDA backend and the kernel takes
/// them (`kernels.rs`), or the CPU backend and `cpu.rs` has it; `None` otherwise.
fn kernel<X: Backend>(kernel: Kernel, inputs: &[FloatTensor<X>]) -> Option<Vec<FloatTensor<X>>> {
    #[cfg(feature = "cuda")]
    if let Some(outputs) = crate::kernels::run::<X>(kernel, inputs) {
        return Some(outputs);
    }
    #[cfg(feature = "ndarray")]
    if let Some(outputs) = crate::cpu::run::<X>(kernel, inputs) {
        return Some(outputs);
    }
    let _ = (kernel, inputs);
    None
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
pub(crate) use on_known_autodiff;

/// The single output of a kernel.
fn single<T>(outputs: Vec<T>) -> T {
    let [out] = <[_; 1]>::try_from(outputs).unwrap_or_else(|_| unreachable!("one output"));
    out
}

/// RMSNorm over the last dimension of `x` `[batch, seq, hidden]` scaled by `weight`
/// `[hidden]`: the values of [`composed::rms_norm`].
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    on_known_autodiff!(
        B,
        X,
        cast(RmsNormNode::<X>::apply(cast(x), cast(weight), eps))
    );
    tensor(rms_norm_values::<B>(raw(x), raw(weight), eps).0)
}

/// `silu(gate) ⊙ up` for `[batch, seq, intermediate]`: the values of [`composed::swiglu`].
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    on_known_autodiff!(B, X, cast(SwigluNode::<X>::apply(cast(gate), cast(up))));
    tensor(swiglu_values::<B>(raw(gate), raw(up)))
}

/// `softmax(scale · scores + bias)` over the keys of attention scores
/// `[batch, heads, queries, keys]`, in f32, returned in the scores' dtype: the values of
/// [`composed::attention_softmax`]. `bias` (0 or `-inf`, `[batch or 1, 1, queries, keys]`) is
/// a constant: it gets no gradient.
pub fn attention_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    scale: f64,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    on_known_autodiff!(
        B,
        X,
        cast(SoftmaxNode::<X>::apply(
            cast(scores),
            scale,
            bias.map(cast::<_, Tensor<Autodiff<X>, 4>>)
        ))
    );
    tensor(softmax_values::<B>(raw(scores), scale, bias.map(raw)))
}

/// Attention `softmax(scale · q kᵀ + bias) v` (see [`composed::attention`]) as one autodiff
/// node that keeps `q`, `k` and `v` and recomputes the probabilities in its backward pass
/// (two small products and one softmax) instead of keeping them: `[batch, heads, queries,
/// keys]` per layer, 64 MiB per LLaMA-7B layer at batch 4 × 512 in bf16, where PyTorch's
/// fused attention keeps none either. `bias` is a constant.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    on_known_autodiff!(
        B,
        X,
        cast(AttentionNode::<X>::apply(
            [cast(q), cast(k), cast(v)],
            scale,
            bias.map(cast::<_, Tensor<Autodiff<X>, 4>>)
        ))
    );
    composed::attention(q, k, v, scale, bias)
}

/// The rotary embedding of `x` `[batch, heads, seq, head_dim]` with tables
/// `[batch or 1, 1, seq, head_dim]` (constants: they get no gradient): the values of
/// [`composed::rotary`].
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    on_known_autodiff!(
        B,
        X,
        cast(RotaryNode::<X>::apply(
            cast(x),
            cast(cos.clone()),
            cast(sin.clone())
        ))
    );
    tensor(rotary_values::<B>(
        raw(x),
        raw(cos.clone()),
        raw(sin.clone()),
    ))
}

/// RMSNorm's output and `1/rms` per row (f32, `[batch, seq, 1]`) on any backend: the kernel
/// where it runs, else [`composed::rms_norm`]'s operations.
fn rms_norm_values<X: Backend>(
    x: FloatTensor<X>,
    weight: FloatTensor<X>,
    eps: f64,
) -> (FloatTensor<X>, FloatTensor<X>) {
    let forward = Kernel::RmsNormForward { eps: eps as f32 };
    if let Some(outputs) = kernel::<X>(forward, &[x.clone(), weight.clone()]) {
        let [out, inv_rms] =
            <[_; 2]>::try_from(outputs).unwrap_or_else(|_| unreachable!("two outputs"));
        return (out, inv_rms);
    }
    let (out, inv_rms) =
        composed::rms_norm_with_inv_rms(tensor::<X, 3>(x), tensor::<X, 1>(weight), eps);
    (raw(out), raw(inv_rms))
}

/// SwiGLU's output on any backend: the kernel where it runs, else [`composed::swiglu`].
fn swiglu_values<X: Backend>(gate: FloatTensor<X>, up: FloatTensor<X>) -> FloatTensor<X> {
    match kernel::<X>(Kernel::SwigluForward, &[gate.clone(), up.clone()]) {
        Some(out) => single(out),
        None => raw(composed::swiglu(tensor::<X, 3>(gate), tensor::<X, 3>(up))),
    }
}

/// The attention probabilities on any backend: the kernel where it runs, else
/// [`composed::attention_softmax`].
fn softmax_values<X: Backend>(
    scores: FloatTensor<X>,
    scale: f64,
    bias: Option<FloatTensor<X>>,
) -> FloatTensor<X> {
    let mut inputs = vec![scores.clone()];
    inputs.extend(bias.clone());
    let forward = Kernel::SoftmaxForward {
        scale: scale as f32,
    };
    match kernel::<X>(forward, &inputs) {
        Some(out) => single(out),
        None => raw(composed::attention_softmax(
            tensor::<X, 4>(scores),
            scale,
            bias.map(tensor::<X, 4>),
        )),
    }
}

/// The rotary embedding on any backend: the kernel where it runs, else [`composed::rotary`].
fn rotary_values<X: Backend>(
    x: FloatTensor<X>,
    cos: FloatTensor<X>,
    sin: FloatTensor<X>,
) -> FloatTensor<X> {
    match kernel::<X>(Kernel::RopeForward, &[x.clone(), cos.clone(), sin.clone()]) {
        Some(out) => single(out),
        None => raw(composed::rotary(
            tensor::<X, 4>(x),
            &tensor::<X, 4>(cos),
            &tensor::<X, 4>(sin),
        )),
    }
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
        let (out, inv_rms) =
            rms_norm_values::<X>(x.primitive.clone(), weight.primitive.clone(), eps);
        let state = || RmsNormState {
            x: x.primitive.clone(),
            inv_rms,
            weight: x_tracked.then(|| weight.primitive.clone()),
        };
        let node = record(Self(PhantomData), [&x, &weight], state, out);
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
        let dy = grads.consume::<X>(&ops.node);
        let state = ops.state;
        if let Some(node) = node_w {
            let x = tensor::<X, 3>(state.x.clone());
            let dtype = x.dtype();
            let normed = upcast(x) * tensor::<X, 3>(state.inv_rms.clone());
            let [batch, seq, hidden] = normed.dims();
            let dw = (tensor::<X, 3>(dy.clone()) * cast_to(normed, dtype))
                .reshape([batch * seq, hidden])
                .sum_dim(0)
                .reshape([hidden]);
            grads.register::<X>(node.id, raw(dw));
        }
        if let Some(node) = node_x {
            let weight = state
                .weight
                .unwrap_or_else(|| unreachable!("kept when x is tracked"));
            let inputs = [state.x, weight, dy, state.inv_rms];
            let dx = match kernel::<X>(Kernel::RmsNormBackward, &inputs) {
                Some(out) => single(out),
                None => {
                    let [x, weight, dy, inv_rms] = inputs;
                    let x = tensor::<X, 3>(x);
                    let dtype = x.dtype();
                    let inv_rms = tensor::<X, 3>(inv_rms);
                    let normed = upcast(x) * inv_rms.clone();
                    let g = upcast(tensor::<X, 3>(dy) * tensor::<X, 1>(weight).unsqueeze::<3>());
                    let dot = (g.clone() * normed.clone()).mean_dim(2);
                    raw(cast_to((g - normed * dot) * inv_rms, dtype))
                }
            };
            grads.register::<X>(node.id, dx);
        }
    }
}

/// The SwiGLU node.
#[derive(Debug)]
struct SwigluNode<X>(PhantomData<X>);

impl<X: Backend> SwigluNode<X> {
    fn apply(gate: Tensor<Autodiff<X>, 3>, up: Tensor<Autodiff<X>, 3>) -> Tensor<Autodiff<X>, 3> {
        let (gate, up) = (prim(gate), prim(up));
        let (gi, ui) = (gate.primitive.clone(), up.primitive.clone());
        let out = swiglu_values::<X>(gi.clone(), ui.clone());
        let node = record(Self(PhantomData), [&gate, &up], || (gi, ui), out);
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl<X: Backend> Backward<X, 2> for SwigluNode<X> {
    /// `gate` and `up`, in the model's dtype.
    type State = (FloatTensor<X>, FloatTensor<X>);

    /// With `s = σ(gate)`: `d up = dy ⊙ gate ⊙ s`, `d gate = (dy ⊙ up) ⊙ s ⊙ (1 + gate ⊙ (1 − s))`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = grads.consume::<X>(&ops.node);
        let (gate, up) = ops.state;
        if let Some(outputs) = kernel::<X>(
            Kernel::SwigluBackward,
            &[gate.clone(), up.clone(), dy.clone()],
        ) {
            let [dgate, dup] =
                <[_; 2]>::try_from(outputs).unwrap_or_else(|_| unreachable!("two outputs"));
            if let Some(node) = node_up {
                grads.register::<X>(node.id, dup);
            }
            if let Some(node) = node_gate {
                grads.register::<X>(node.id, dgate);
            }
            return;
        }
        let dy = tensor::<X, 3>(dy);
        let (gate, up) = (tensor::<X, 3>(gate), tensor::<X, 3>(up));
        let dtype = gate.dtype();
        if let Some(node) = node_up {
            // The activation as the forward computed it, in the model's dtype.
            let activation = gate.clone() * sigmoid(gate.clone());
            grads.register::<X>(node.id, raw(dy.clone() * activation));
        }
        if let Some(node) = node_gate {
            let gate32 = upcast(gate);
            let s = sigmoid(gate32.clone());
            let dact = upcast(dy * up);
            let dgate = dact * s.clone() * (gate32 * (s.neg() + 1.0) + 1.0);
            grads.register::<X>(node.id, raw(cast_to(dgate, dtype)));
        }
    }
}

/// The attention softmax node (scale and bias included).
#[derive(Debug)]
struct SoftmaxNode<X>(PhantomData<X>);

impl<X: Backend> SoftmaxNode<X> {
    fn apply(
        scores: Tensor<Autodiff<X>, 4>,
        scale: f64,
        bias: Option<Tensor<Autodiff<X>, 4>>,
    ) -> Tensor<Autodiff<X>, 4> {
        let scores = prim(scores);
        let bias = bias.map(|b| prim(b).primitive);
        let out = softmax_values::<X>(scores.primitive.clone(), scale, bias);
        let kept = out.clone();
        let node = record(Self(PhantomData), [&scores], || (kept, scale), out);
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl<X: Backend> Backward<X, 1> for SoftmaxNode<X> {
    /// The probabilities, in the model's dtype, and the scale.
    type State = (FloatTensor<X>, f64);

    /// `d scores = scale · p ⊙ (dp − Σ_keys dp ⊙ p)`, in f32.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dp = grads.consume::<X>(&ops.node);
        let Some(node) = node else { return };
        let (p, scale) = ops.state;
        grads.register::<X>(node.id, softmax_grad::<X>(p, dp, scale));
    }
}

/// `scale · p ⊙ (dp − Σ_keys dp ⊙ p)` in f32, rounded to `p`'s dtype: the gradient of the
/// scores of [`attention_softmax`] from its probabilities `p` and their gradient `dp`.
fn softmax_grad<X: Backend>(p: FloatTensor<X>, dp: FloatTensor<X>, scale: f64) -> FloatTensor<X> {
    let backward = Kernel::SoftmaxBackward {
        scale: scale as f32,
    };
    match kernel::<X>(backward, &[p.clone(), dp.clone()]) {
        Some(out) => single(out),
        None => {
            let p = tensor::<X, 4>(p);
            let dtype = p.dtype();
            let (p, dp) = (upcast(p), upcast(tensor::<X, 4>(dp)));
            let dot = (dp.clone() * p.clone()).sum_dim(3);
            raw(cast_to(p * (dp - dot) * scale, dtype))
        }
    }
}

/// The attention node.
#[derive(Debug)]
struct AttentionNode<X>(PhantomData<X>);

/// What the attention backward reads: `q`, `k`, `v`, the bias and the scale.
type AttentionState<X> = ([FloatTensor<X>; 3], Option<FloatTensor<X>>, f64);

impl<X: Backend> AttentionNode<X> {
    /// The probabilities `softmax(scale · q kᵀ + bias)` on the inner backend.
    fn probabilities(
        q: &FloatTensor<X>,
        k: &FloatTensor<X>,
        scale: f64,
        bias: &Option<FloatTensor<X>>,
    ) -> Tensor<X, 4> {
        let scores = crate::tensor::matmul(
            tensor::<X, 4>(q.clone()),
            tensor::<X, 4>(k.clone()).swap_dims(2, 3),
        );
        tensor(softmax_values::<X>(raw(scores), scale, bias.clone()))
    }

    fn apply(
        qkv: [Tensor<Autodiff<X>, 4>; 3],
        scale: f64,
        bias: Option<Tensor<Autodiff<X>, 4>>,
    ) -> Tensor<Autodiff<X>, 4> {
        let [q, k, v] = qkv.map(prim);
        let bias = bias.map(|b| prim(b).primitive);
        let p = Self::probabilities(&q.primitive, &k.primitive, scale, &bias);
        let out = raw(crate::tensor::matmul(
            p,
            tensor::<X, 4>(v.primitive.clone()),
        ));
        let state = || {
            let qkv = [&q, &k, &v].map(|t| t.primitive.clone());
            (qkv, bias, scale)
        };
        let node = record(Self(PhantomData), [&q, &k, &v], state, out);
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl<X: Backend> Backward<X, 3> for AttentionNode<X> {
    type State = AttentionState<X>;

    /// With `p` recomputed: `dv = pᵀ do`, `dp = do vᵀ`, `ds` from [`softmax_grad`] (scale
    /// included), `dq = ds k`, `dk = dsᵀ q`.
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let d_out = tensor::<X, 4>(grads.consume::<X>(&ops.node));
        let ([q, k, v], bias, scale) = ops.state;
        let p = Self::probabilities(&q, &k, scale, &bias);
        let matmul = crate::tensor::matmul::<X, 4>;
        if let Some(node) = node_v {
            let dv = matmul(p.clone().swap_dims(2, 3), d_out.clone());
            grads.register::<X>(node.id, raw(dv));
        }
        if node_q.is_none() && node_k.is_none() {
            return;
        }
        let dp = matmul(d_out, tensor::<X, 4>(v).swap_dims(2, 3));
        let ds = tensor::<X, 4>(softmax_grad::<X>(raw(p), raw(dp), scale));
        if let Some(node) = node_q {
            grads.register::<X>(node.id, raw(matmul(ds.clone(), tensor::<X, 4>(k))));
        }
        if let Some(node) = node_k {
            grads.register::<X>(node.id, raw(matmul(ds.swap_dims(2, 3), tensor::<X, 4>(q))));
        }
    }
}

/// The rotary embedding node.
#[derive(Debug)]
struct RotaryNode<X>(PhantomData<X>);

impl<X: Backend> RotaryNode<X> {
    fn apply(
        x: Tensor<Autodiff<X>, 4>,
        cos: Tensor<Autodiff<X>, 4>,
        sin: Tensor<Autodiff<X>, 4>,
    ) -> Tensor<Autodiff<X>, 4> {
        let x = prim(x);
        let (cos, sin) = (prim(cos).primitive, prim(sin).primitive);
        let out = rotary_values::<X>(x.primitive.clone(), cos.clone(), sin.clone());
        let node = record(Self(PhantomData), [&x], || (cos, sin), out);
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl<X: Backend> Backward<X, 1> for RotaryNode<X> {
    /// The cosine and sine tables.
    type State = (FloatTensor<X>, FloatTensor<X>);

    /// `dx = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin)`, where `rotate_halfᵀ([a, b]) = [b, −a]`.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<X>(&ops.node);
        let Some(node) = node else { return };
        let (cos, sin) = ops.state;
        let dx = match kernel::<X>(
            Kernel::RopeBackward,
            &[dy.clone(), cos.clone(), sin.clone()],
        ) {
            Some(out) => single(out),
            None => {
                let dy = tensor::<X, 4>(dy);
                let half = dy.dims()[3] / 2;
                let by_sin = dy.clone() * tensor::<X, 4>(sin);
                let first = by_sin.clone().narrow(3, 0, half);
                let second = by_sin.narrow(3, half, half);
                let rotated = Tensor::cat(vec![second, first.neg()], 3);
                raw(dy * tensor::<X, 4>(cos) + rotated)
            }
        };
        grads.register::<X>(node.id, dx);
    }
}

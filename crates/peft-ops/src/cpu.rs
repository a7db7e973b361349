//! Matrix products on the CPU backend (`NdArray<f32>`) that read each operand where it lies.
//!
//! Burn's NdArray product first copies any operand that is not in row-major order into a new
//! array. A model's weights are such operands: a `Linear` holds its weight `[in, out]` as the
//! transposed view of the checkpoint's `[out, in]` rows, so every forward pass used to copy
//! every weight (a whole model's worth of memory traffic per pass, and a transient copy of the
//! largest matrix, the output head: 0.5 GB for LLaMA-7B), and the attention product `q · kᵀ`
//! copied its keys. Here the product hands the views' strides to the same GEMM
//! (`matrixmultiply`, which packs its operands from any strides), so the arithmetic, and hence
//! every value, is exactly what it was; only the copies are gone (products of five rows or more:
//! fewer go to [`gemv`], below).
//!
//! On `Autodiff<NdArray<f32>>` the product is one autodiff node whose backward pass computes
//! `da = dy · bᵀ` and `db = aᵀ · dy` the same way (transposes are views). The one-pass kernels of
//! the blocks (SwiGLU, RMSNorm, the attention softmax, the rotary embedding) are in [`kernels`];
//! products of one to four rows (decoding) skip the GEMM's packing in [`gemv`].
//! `PEFT_CPU_STRIDED=0` turns both off.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::ndarray::{NdArray, NdArrayTensor};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use ndarray::{linalg::general_mat_mul, ArrayD, ArrayView2, ArrayViewD, Axis, Ix2, IxDyn};

use crate::dispatch::{cast, is};
use crate::graph::{prim, raw, record, tensor};

mod gemv;
mod kernels;

pub(crate) use gemv::quantized;
pub(crate) use kernels::run;

type Cpu = NdArray<f32>;

/// `a · b` when `B` is the CPU backend (plain or under autodiff) and both are f32; the
/// operands back otherwise.
#[allow(clippy::type_complexity)]
pub(crate) fn matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || !enabled() {
        return Err((a, b));
    }
    if is::<B, Cpu>() {
        let (pa, pb) = (
            raw(cast::<_, Tensor<Cpu, D>>(a)),
            raw(cast::<_, Tensor<Cpu, D>>(b)),
        );
        return match product(&pa, &pb, false, false, false) {
            Some(out) => Ok(cast(tensor::<Cpu, D>(out))),
            None => Err((cast(tensor::<Cpu, D>(pa)), cast(tensor::<Cpu, D>(pb)))),
        };
    }
    // Broadcast leading dimensions would need their gradients summed: Burn's node does it.
    if is::<B, Autodiff<Cpu>>() && a.dims()[..D - 2] == b.dims()[..D - 2] {
        let a = cast::<_, Tensor<Autodiff<Cpu>, D>>(a);
        let b = cast::<_, Tensor<Autodiff<Cpu>, D>>(b);
        return Ok(cast(MatmulNode::apply(a, b)));
    }
    Err((a, b))
}

/// Whether this path is on: `PEFT_CPU_STRIDED=0` gives every product and kernel back to Burn
/// (for A/B timings; the products' values are the same either way, the kernels' within float
/// rounding).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("PEFT_CPU_STRIDED").map_or(true, |v| v != "0"))
}

/// The f32 view of a CPU tensor.
fn view(t: &FloatTensor<Cpu>) -> Option<ArrayViewD<'_, f32>> {
    match t {
        NdArrayTensor::F32(storage) => Some(storage.view()),
        _ => None,
    }
}

/// `op(a) · op(b)` over the last two dimensions, `op` transposing where asked; leading
/// dimensions equal, or 1 on one side (broadcast) unless `exact` asks them equal. `None` for
/// operands it does not take (not f32, ranks or sizes that do not match).
fn product(
    a: &FloatTensor<Cpu>,
    b: &FloatTensor<Cpu>,
    transpose_a: bool,
    transpose_b: bool,
    exact: bool,
) -> Option<FloatTensor<Cpu>> {
    let (mut a, mut b) = (view(a)?, view(b)?);
    let rank = a.ndim();
    if rank < 2 || b.ndim() != rank {
        return None;
    }
    if transpose_a {
        a.swap_axes(rank - 2, rank - 1);
    }
    if transpose_b {
        b.swap_axes(rank - 2, rank - 1);
    }
    let (m, k, n) = (
        a.shape()[rank - 2],
        a.shape()[rank - 1],
        b.shape()[rank - 1],
    );
    if b.shape()[rank - 2] != k {
        return None;
    }
    let lead = (0..rank - 2)
        .map(|i| match (a.shape()[i], b.shape()[i]) {
            (x, y) if x == y => Some(x),
            (1, y) if !exact => Some(y),
            (x, 1) if !exact => Some(x),
            _ => None,
        })
        .collect::<Option<Vec<usize>>>()?;
    let mut shape = lead.clone();
    shape.extend([m, n]);
    let mut out = ArrayD::<f32>::zeros(IxDyn(&shape));
    let batches: usize = lead.iter().product();
    let mut index = vec![0; lead.len()];
    for batch in 0..batches {
        let mut rest = batch;
        for (i, &size) in lead.iter().enumerate().rev() {
            index[i] = rest % size;
            rest /= size;
        }
        let mut o = out.view_mut();
        for &i in &index {
            o = o.index_axis_move(Axis(0), i);
        }
        let mut o = o.into_dimensionality::<Ix2>().ok()?;
        let (a, b) = (matrix(a.view(), &index)?, matrix(b.view(), &index)?);
        if gemv::gemv(&a, &b, &mut o) {
            continue;
        }
        if m < n {
            // `c = a · b` as `cᵀ = bᵀ · aᵀ` (views, same arithmetic): the GEMM packs its right
            // operand on one thread and its left one on every thread, so the larger operand (a
            // weight, when few rows pass through it) goes left.
            let mut ot = o.reversed_axes();
            general_mat_mul(1.0, &b.reversed_axes(), &a.reversed_axes(), 0.0, &mut ot);
        } else {
            general_mat_mul(1.0, &a, &b, 0.0, &mut o);
        }
    }
    Some(NdArrayTensor::from(out.into_shared()))
}

/// The matrix of `v` at leading `index` (a leading dimension of 1 broadcast).
fn matrix<'a>(mut v: ArrayViewD<'a, f32>, index: &[usize]) -> Option<ArrayView2<'a, f32>> {
    for &i in index {
        let i = if v.shape()[0] == 1 { 0 } else { i };
        v = v.index_axis_move(Axis(0), i);
    }
    v.into_dimensionality::<Ix2>().ok()
}

/// The product as an autodiff node.
#[derive(Debug)]
struct MatmulNode;

impl MatmulNode {
    /// `a · b` for f32 operands with equal leading dimensions.
    fn apply<const D: usize>(
        a: Tensor<Autodiff<Cpu>, D>,
        b: Tensor<Autodiff<Cpu>, D>,
    ) -> Tensor<Autodiff<Cpu>, D> {
        let (a, b) = (prim(a), prim(b));
        // Mismatched inner sizes panic as Burn's product does.
        let out = product(&a.primitive, &b.primitive, false, false, true)
            .expect("matrix product: operand shapes do not match");
        let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
        let state = || {
            (
                b_tracked.then(|| a.primitive.clone()),
                a_tracked.then(|| b.primitive.clone()),
            )
        };
        let node = record(Self, [&a, &b], state, out);
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl Backward<Cpu, 2> for MatmulNode {
    /// `a` (kept when `b` needs a gradient) and `b` (kept when `a` needs one): a projection
    /// with a frozen weight does not keep its input alive.
    type State = (Option<FloatTensor<Cpu>>, Option<FloatTensor<Cpu>>);

    /// `da = dy · bᵀ`, `db = aᵀ · dy`.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let dy = grads.consume::<Cpu>(&ops.node);
        let (a, b) = ops.state;
        let checked = "the forward product took these shapes";
        if let Some(node) = node_a {
            let b = b.unwrap_or_else(|| unreachable!("kept when a is tracked"));
            let da = product(&dy, &b, false, true, true).expect(checked);
            grads.register::<Cpu>(node.id, da);
        }
        if let Some(node) = node_b {
            let a = a.unwrap_or_else(|| unreachable!("kept when b is tracked"));
            let db = product(&a, &dy, true, false, true).expect(checked);
            grads.register::<Cpu>(node.id, db);
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    type A = Autodiff<Cpu>;

    fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    /// Bit for bit Burn's own product, on transposed and broadcast operands.
    #[test]
    fn strided_products_equal_burns_bit_for_bit() {
        let device = Default::default();
        let a = Tensor::<Cpu, 4>::random([2, 3, 5, 7], Distribution::Default, &device);
        let b = Tensor::<Cpu, 4>::random([2, 3, 6, 7], Distribution::Default, &device);
        let kt = b.clone().swap_dims(2, 3);
        let ours = matmul(a.clone(), kt.clone()).ok().unwrap();
        assert_eq!(values(ours), values(a.clone().matmul(kt)));
        let w = Tensor::<Cpu, 2>::random([9, 7], Distribution::Default, &device).transpose();
        let x = Tensor::<Cpu, 2>::random([5, 7], Distribution::Default, &device);
        let ours = matmul(x.clone(), w.clone()).ok().unwrap();
        assert_eq!(values(ours), values(x.matmul(w.clone())));
        // Four rows or fewer go to `gemv`: the same values within rounding.
        let x = Tensor::<Cpu, 2>::random([2, 7], Distribution::Default, &device);
        let ours = values(matmul(x.clone(), w.clone()).ok().unwrap());
        let burns = values(x.matmul(w));
        assert_eq!(ours.len(), burns.len());
        for (o, b) in ours.iter().zip(&burns) {
            assert!((o - b).abs() <= 1e-6 * b.abs().max(1.0), "{o} vs {b}");
        }
        let p = Tensor::<Cpu, 4>::random([1, 3, 6, 7], Distribution::Default, &device);
        let ours = matmul(a.clone(), p.clone().swap_dims(2, 3)).ok().unwrap();
        assert_eq!(values(ours), values(a.matmul(p.swap_dims(2, 3))));
    }

    /// The node's gradients are Burn's product's, for transposed operands too.
    #[test]
    fn gradients_equal_burns() {
        let device = Default::default();
        let a = Tensor::<A, 3>::random([2, 5, 7], Distribution::Default, &device).require_grad();
        let w = Tensor::<A, 3>::random([2, 6, 7], Distribution::Default, &device).require_grad();
        let run = |ours: bool| {
            let (a, w) = (a.clone(), w.clone());
            let wt = w.clone().swap_dims(1, 2);
            let out = if ours {
                matmul(a.clone(), wt).ok().unwrap()
            } else {
                a.clone().matmul(wt)
            };
            let loss = (out.clone() * out).sum();
            let grads = loss.backward();
            (
                values(a.grad(&grads).unwrap()),
                values(w.grad(&grads).unwrap()),
            )
        };
        let (ours, burns) = (run(true), run(false));
        assert_eq!(ours, burns);
        // Broadcast leading dimensions under autodiff go to Burn's node.
        let p = Tensor::<A, 3>::random([1, 6, 7], Distribution::Default, &device);
        assert!(matmul(a, p.swap_dims(1, 2)).is_err());
    }
}

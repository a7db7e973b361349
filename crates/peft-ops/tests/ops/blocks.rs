//! The autodiff nodes of `peft_ops::blocks` (RMSNorm, SwiGLU, the attention softmax, the
//! rotary embedding) against the chains of tensor operations they replace
//! (`blocks::composed`, whose gradients come from Burn's autodiff): the same forward values
//! (see `forward_tol`), and gradients that agree to rounding. f32 within 1e-5 of the largest
//! value; bf16 within 2e-2 (the chains round intermediates to bf16 that the nodes keep in f32).
//!
//! On the CPU build the nodes run on NdArray; built with `--features cuda` they run on the GPU
//! through `burn::backend::Cuda` (with Burn's kernel fusion when built with `--features fusion`)
//! and the hand-written kernels of `kernels.rs`.

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Tensor};
use peft_ops::blocks::{self, composed};
use peft_ops::tensor::cast_to;

#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda<f32>;
#[cfg(not(feature = "cuda"))]
type Inner = burn::backend::NdArray<f32>;
type Ad = Autodiff<Inner>;

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn assert_close(name: &str, got: Vec<f32>, want: Vec<f32>, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max);
    eprintln!("{name}: max |error| {worst:.3e} (largest value {scale:.3})");
    assert!(scale > 0.0, "{name}: all zero");
    assert!(
        worst <= rtol * scale,
        "{name}: max |error| {worst:e} > {rtol} x {scale}"
    );
}

fn random<const D: usize>(shape: [usize; D], dtype: DType, std: f64) -> Tensor<Ad, D> {
    cast_to(
        Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default()),
        dtype,
    )
    .require_grad()
}

/// NdArray computes in f32 only; the GPU build checks bf16 too.
fn dtypes() -> Vec<DType> {
    if cfg!(feature = "cuda") {
        vec![DType::F32, DType::BF16]
    } else {
        vec![DType::F32]
    }
}

fn rtol(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-5
    } else {
        2e-2
    }
}

/// `Σ r ⊙ y` in f32: a loss whose gradient with respect to `y` is `r`.
fn loss<const D: usize>(y: Tensor<Ad, D>, r: Tensor<Ad, D>) -> Tensor<Ad, 1> {
    (cast_to(y, DType::F32) * cast_to(r, DType::F32)).sum()
}

type Grads = <Ad as AutodiffBackend>::Gradients;

/// How far a node's values may be from the chain's, relative to the largest: on the CPU the
/// nodes run the chains' own operations (exact); the CUDA kernels sum in another order (f32)
/// and round their f32 result once where the chain rounds several times (one bf16 step).
fn forward_tol(dtype: DType) -> f32 {
    match (cfg!(feature = "cuda"), dtype) {
        (false, _) => 0.0,
        (true, DType::F32) => 1e-6,
        (true, _) => 1e-2,
    }
}

/// [`forward_tol`] for SwiGLU and RMSNorm, which have one-pass kernels on the CPU too
/// (`1 / (1 + e^-x)` where Burn's sigmoid is `e^-ln(1 + e^-x)`; a row's mean square summed in
/// another order): a few f32 roundings apart.
fn cpu_kernel_tol(dtype: DType) -> f32 {
    forward_tol(dtype).max(1e-6)
}

/// The node's output `node` equals the chain's `chain` (within [`forward_tol`]); returns the
/// backward passes of `Σ r ⊙ y` through the node and through the chain.
fn same_values<const D: usize>(
    name: &str,
    node: Tensor<Ad, D>,
    chain: Tensor<Ad, D>,
    r: Tensor<Ad, D>,
    dtype: DType,
) -> (Grads, Grads) {
    same_values_within(name, node, chain, r, forward_tol(dtype))
}

/// [`same_values`] within `tol`.
fn same_values_within<const D: usize>(
    name: &str,
    node: Tensor<Ad, D>,
    chain: Tensor<Ad, D>,
    r: Tensor<Ad, D>,
    tol: f32,
) -> (Grads, Grads) {
    assert_close(
        &format!("{name} y"),
        host(node.clone()),
        host(chain.clone()),
        tol,
    );
    (loss(node, r.clone()).backward(), loss(chain, r).backward())
}

/// `input`'s gradient through the node agrees with its gradient through the chain within
/// `rtol`; returns the node's.
fn same_grad<const D: usize>(
    name: &str,
    input: &Tensor<Ad, D>,
    (through_node, through_chain): &(Grads, Grads),
    rtol: f32,
) -> Vec<f32> {
    let node = host(
        input
            .grad(through_node)
            .expect("a gradient through the node"),
    );
    let chain = host(
        input
            .grad(through_chain)
            .expect("a gradient through the chain"),
    );
    assert_close(name, node.clone(), chain, rtol);
    node
}

#[test]
fn rms_norm_node_matches_the_chain() {
    for dtype in dtypes() {
        let x = random([2, 5, 48], dtype, 1.5);
        let w = cast_to(
            Tensor::<Ad, 1>::random([48], Distribution::Uniform(0.5, 1.5), &Default::default()),
            dtype,
        )
        .require_grad();
        let r = random([2, 5, 48], dtype, 1.0).detach();
        let node = blocks::rms_norm(x.clone(), w.clone(), 1e-5);
        let chain = composed::rms_norm(x.clone(), w.clone(), 1e-5);
        assert_eq!(node.dtype(), dtype);
        let name = format!("rms_norm {dtype:?}");
        let grads = same_values_within(&name, node, chain, r, cpu_kernel_tol(dtype));
        same_grad(&format!("{name} dx"), &x, &grads, rtol(dtype));
        same_grad(&format!("{name} dw"), &w, &grads, rtol(dtype));
    }
}

#[test]
fn rms_norm_node_with_a_frozen_scale() {
    let x = random([1, 3, 16], DType::F32, 1.0);
    let w = Tensor::<Ad, 1>::ones([16], &Default::default());
    let r = random([1, 3, 16], DType::F32, 1.0).detach();
    let grads = (
        loss(blocks::rms_norm(x.clone(), w.clone(), 1e-6), r.clone()).backward(),
        loss(composed::rms_norm(x.clone(), w.clone(), 1e-6), r).backward(),
    );
    assert!(w.grad(&grads.0).is_none(), "a frozen scale has no gradient");
    same_grad("rms_norm frozen scale dx", &x, &grads, 1e-5);
}

#[test]
fn swiglu_node_matches_the_chain() {
    for dtype in dtypes() {
        let gate = random([2, 4, 40], dtype, 3.0);
        let up = random([2, 4, 40], dtype, 1.0);
        let r = random([2, 4, 40], dtype, 1.0).detach();
        let node = blocks::swiglu(gate.clone(), up.clone());
        let chain = composed::swiglu(gate.clone(), up.clone());
        let name = format!("swiglu {dtype:?}");
        let grads = same_values_within(&name, node, chain, r, cpu_kernel_tol(dtype));
        same_grad(&format!("{name} d gate"), &gate, &grads, rtol(dtype));
        same_grad(&format!("{name} d up"), &up, &grads, rtol(dtype));
    }
}

/// A bias `[batch, 1, 6, 7]` as the model builds it: `-inf` above the second diagonal.
fn causal_bias(batch: usize) -> Tensor<Ad, 4> {
    let bias: Vec<f32> = (0..batch * 6 * 7)
        .map(|i| {
            let (query, key) = ((i / 7) % 6, i % 7);
            if key > query + 1 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_data(
        burn::tensor::TensorData::new(bias, [batch, 1, 6, 7]),
        &Default::default(),
    )
}

#[test]
fn attention_softmax_node_matches_the_chain() {
    for dtype in dtypes() {
        // A bias shared by the batch, one per row, and none.
        for bias in [Some(causal_bias(1)), Some(causal_bias(2)), None] {
            let scores = random([2, 3, 6, 7], dtype, 20.0);
            let r = random([2, 3, 6, 7], dtype, 1.0).detach();
            let scale = 0.125;
            let node = blocks::attention_softmax(scores.clone(), scale, bias.clone());
            let chain = composed::attention_softmax(scores.clone(), scale, bias.clone());
            let name = format!(
                "softmax {dtype:?} bias {:?}",
                bias.as_ref().map(|b| b.dims())
            );
            let grads = same_values(&name, node, chain, r, dtype);
            let dn = same_grad(&format!("{name} d scores"), &scores, &grads, rtol(dtype));
            // Rows of the softmax Jacobian sum to zero: each row of the gradient does too.
            for row in dn.chunks(7) {
                let sum: f32 = row.iter().sum();
                assert!(sum.abs() < 1e-2, "a gradient row sums to {sum}");
            }
        }
    }
}

/// Cosine and sine tables `[batch, 1, 5, 8]` of positions `batch · 5`, in `dtype`.
fn tables(batch: usize, dtype: DType) -> (Tensor<Ad, 4>, Tensor<Ad, 4>) {
    let angles = Tensor::<Ad, 4>::random(
        [batch, 1, 5, 8],
        Distribution::Uniform(-3.0, 3.0),
        &Default::default(),
    );
    (
        cast_to(angles.clone().cos(), dtype),
        cast_to(angles.sin(), dtype),
    )
}

#[test]
fn rotary_node_matches_the_chain() {
    for dtype in dtypes() {
        for table_batch in [1, 2] {
            let (cos, sin) = tables(table_batch, dtype);
            // The heads view of a projection, as the model passes it: strided.
            let x = random([2, 5, 3, 8], dtype, 1.0);
            let heads = || x.clone().swap_dims(1, 2);
            let r = random([2, 3, 5, 8], dtype, 1.0).detach();
            let node = blocks::rotary(heads(), &cos, &sin);
            let chain = composed::rotary(heads(), &cos, &sin);
            let name = format!("rotary {dtype:?} tables {table_batch}");
            let grads = same_values(&name, node, chain, r, dtype);
            same_grad(&format!("{name} dx"), &x, &grads, rtol(dtype));
        }
    }
}

/// Without autodiff (inference) the blocks give the chains' values too.
#[test]
fn blocks_without_autodiff_match_the_chains() {
    let inner = |t: Tensor<Ad, 4>| t.inner();
    for dtype in dtypes() {
        let tol = forward_tol(dtype);
        let x = inner(random([2, 3, 5, 8], dtype, 1.0));
        let (cos, sin) = tables(2, dtype);
        let (cos, sin) = (inner(cos), inner(sin));
        assert_close(
            "rotary (inference)",
            host(blocks::rotary(x.clone(), &cos, &sin)),
            host(composed::rotary(x.clone(), &cos, &sin)),
            tol,
        );
        // Large enough for the CPU kernels to cut it over threads, strided as the heads view.
        let heads = inner(random([1, 64, 4, 128], dtype, 1.0)).swap_dims(1, 2);
        let angles = inner(random([1, 1, 64, 128], dtype, 3.0));
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        assert_close(
            "rotary (inference, large)",
            host(blocks::rotary(heads.clone(), &cos, &sin)),
            host(composed::rotary(heads, &cos, &sin)),
            tol,
        );
        let bias = Some(inner(causal_bias(2)));
        let scores = inner(random([2, 3, 6, 7], dtype, 20.0));
        assert_close(
            "softmax (inference)",
            host(blocks::attention_softmax(scores.clone(), 0.3, bias.clone())),
            host(composed::attention_softmax(scores, 0.3, bias)),
            tol,
        );
        let h = x.reshape([2, 15, 8]);
        let w = inner(random([1, 1, 1, 8], dtype, 1.0)).reshape([8]);
        assert_close(
            "rms_norm (inference)",
            host(blocks::rms_norm(h.clone(), w.clone(), 1e-5)),
            host(composed::rms_norm(h.clone(), w, 1e-5)),
            cpu_kernel_tol(dtype),
        );
        let up = inner(random([2, 3, 5, 8], dtype, 1.0)).reshape([2, 15, 8]);
        assert_close(
            "swiglu (inference)",
            host(blocks::swiglu(h.clone(), up.clone())),
            host(composed::swiglu(h, up)),
            cpu_kernel_tol(dtype),
        );
    }
}

#[test]
fn attention_node_matches_the_chain() {
    for dtype in dtypes() {
        for bias in [Some(causal_bias(2)), None] {
            let q = random([2, 3, 6, 8], dtype, 1.0);
            let k = random([2, 3, 7, 8], dtype, 1.0);
            let v = random([2, 3, 7, 8], dtype, 1.0);
            let r = random([2, 3, 6, 8], dtype, 1.0).detach();
            let scale = 0.35;
            let node = blocks::attention(q.clone(), k.clone(), v.clone(), scale, bias.clone());
            let chain = composed::attention(q.clone(), k.clone(), v.clone(), scale, bias.clone());
            let name = format!("attention {dtype:?} bias {}", bias.is_some());
            let grads = same_values(&name, node, chain, r, dtype);
            for (input, what) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                same_grad(&format!("{name} {what}"), input, &grads, rtol(dtype));
            }
        }
    }
}

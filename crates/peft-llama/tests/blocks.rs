//! The autodiff nodes of `peft_llama::blocks` (RMSNorm, SwiGLU, the attention softmax) against
//! the chains of tensor operations they replace (`blocks::composed`, whose gradients come from
//! Burn's autodiff): the same forward values, and gradients that agree to rounding. f32 within
//! 1e-5 of the largest value; bf16 within 2e-2 (the chains round intermediates to bf16 that
//! the nodes keep in f32).
//!
//! On the CPU build the nodes run on NdArray; built with `--features cuda` they run on the GPU
//! through `burn::backend::Cuda` (with Burn's kernel fusion when built with `--features fusion`).

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Tensor};
use peft_llama::blocks::{self, composed};
use peft_llama::model::cast_to;

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

/// The node's output `node` equals the chain's `chain` exactly; returns the backward passes of
/// `Σ r ⊙ y` through the node and through the chain.
fn same_values<const D: usize>(
    name: &str,
    node: Tensor<Ad, D>,
    chain: Tensor<Ad, D>,
    r: Tensor<Ad, D>,
) -> (Grads, Grads) {
    assert_close(
        &format!("{name} y"),
        host(node.clone()),
        host(chain.clone()),
        0.0,
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
        let grads = same_values(&name, node, chain, r);
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
        let grads = same_values(&name, node, chain, r);
        same_grad(&format!("{name} d gate"), &gate, &grads, rtol(dtype));
        same_grad(&format!("{name} d up"), &up, &grads, rtol(dtype));
    }
}

#[test]
fn attention_softmax_node_matches_the_chain() {
    for dtype in dtypes() {
        // Masked positions as the model fills them: a large negative value.
        let mask = Tensor::<Ad, 2>::ones([6, 7], &Default::default())
            .triu(2)
            .bool()
            .unsqueeze::<4>();
        let scores = random([2, 3, 6, 7], dtype, 2.0);
        // Each path masks on its own: a backward pass consumes the graph it walks.
        let masked = || scores.clone().mask_fill(mask.clone(), -1e9);
        let r = random([2, 3, 6, 7], dtype, 1.0).detach();
        let node = blocks::attention_softmax(masked());
        let chain = composed::attention_softmax(masked());
        let name = format!("softmax {dtype:?}");
        let grads = same_values(&name, node, chain, r);
        let dn = same_grad(&format!("{name} d scores"), &scores, &grads, rtol(dtype));
        // Rows of the softmax Jacobian sum to zero: each row of the gradient does too.
        for row in dn.chunks(7) {
            let sum: f32 = row.iter().sum();
            assert!(sum.abs() < 1e-2, "a gradient row sums to {sum}");
        }
    }
}

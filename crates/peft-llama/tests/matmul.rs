//! `peft_llama::model::matmul` (the product every projection and attention uses) and its
//! gradients against an f64 reference computed on the host, for the layouts the model gives
//! it: row-major operands, transposed views (`[out, in]` weights, `keys.swap_dims(2, 3)`),
//! batches of heads, a broadcast (expanded) batch, and a frozen operand.
//!
//! On the CPU build this checks Burn's product. Built with `--features cuda` it runs on the GPU
//! and checks the cuBLAS route (`src/cublas.rs`): f32 must then be true f32 (rtol 1e-5 of the
//! largest reference value, which TF32 products would miss by two orders of magnitude), bf16
//! within 1e-2 (inputs rounded to bf16 first; the result is rounded to bf16 once).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use peft_llama::model::{cast_to, matmul};

#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda<f32>;
#[cfg(not(feature = "cuda"))]
type Inner = burn::backend::NdArray<f32>;
type Ad = burn::backend::Autodiff<Inner>;

/// Host copy of a tensor in f64.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    let data = t.into_data().convert::<f32>();
    data.into_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// `a · b` in f64 for row-major `[batch, m, k]` and `[batch, k, n]`.
fn reference(a: &[f64], b: &[f64], batch: usize, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; batch * m * n];
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                c[(z * m + i) * n + j] = (0..k)
                    .map(|p| a[(z * m + i) * k + p] * b[(z * k + p) * n + j])
                    .sum();
            }
        }
    }
    c
}

/// The transposes of `batch` row-major `[r, c]` matrices.
fn transposed(x: &[f64], batch: usize, r: usize, c: usize) -> Vec<f64> {
    let mut t = vec![0.0; x.len()];
    for z in 0..batch {
        for i in 0..r {
            for j in 0..c {
                t[(z * c + j) * r + i] = x[(z * r + i) * c + j];
            }
        }
    }
    t
}

fn assert_close(name: &str, got: &[f64], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    eprintln!("{name}: max |error| {worst:.3e} (largest value {scale:.3})");
    assert!(
        worst <= rtol * scale,
        "{name}: max |error| {worst:e} > {rtol} x {scale}"
    );
}

fn random<const D: usize>(shape: [usize; D], dtype: DType) -> Tensor<Ad, D> {
    cast_to(
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default()),
        dtype,
    )
}

/// One case: `a` `[batch.., m, k]`, `b` `[batch.., k, n]` built by `make`, checked forward and
/// backward (`loss = Σ r ⊙ (a · b)`, so `da = r · bᵀ`, `db = aᵀ · r`).
fn check<const D: usize>(
    name: &str,
    dtype: DType,
    a: Tensor<Ad, D>,
    b: Tensor<Ad, D>,
    b_trainable: bool,
) {
    let rtol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    let (sa, sb) = (a.dims(), b.dims());
    let batch: usize = sa[..D - 2].iter().product();
    let (m, k, n) = (sa[D - 2], sa[D - 1], sb[D - 1]);
    let a = a.require_grad();
    let b = if b_trainable { b.require_grad() } else { b };
    let (ha, hb) = (host(a.clone()), host(b.clone()));

    let c = matmul(a.clone(), b.clone());
    assert_eq!(c.dtype(), dtype, "{name}: result dtype");
    let r = random(c.dims(), dtype);
    let hr = host(r.clone());
    let want = reference(&ha, &hb, batch, m, k, n);
    assert_close(
        &format!("{name} {dtype:?} a·b"),
        &host(c.clone()),
        &want,
        rtol,
    );

    let grads = (cast_to(c, DType::F32) * cast_to(r, DType::F32))
        .sum()
        .backward();
    let da = a.grad(&grads).expect("a has a gradient");
    let want_da = reference(&hr, &transposed(&hb, batch, k, n), batch, m, n, k);
    assert_close(&format!("{name} {dtype:?} da"), &host(da), &want_da, rtol);
    let db = b.grad(&grads);
    if b_trainable {
        let want_db = reference(&transposed(&ha, batch, m, k), &hr, batch, k, m, n);
        let db = db.expect("b has a gradient");
        assert_close(&format!("{name} {dtype:?} db"), &host(db), &want_db, rtol);
    } else {
        assert!(db.is_none(), "{name}: a frozen operand has no gradient");
    }
}

fn dtypes() -> Vec<DType> {
    if cfg!(feature = "cuda") {
        vec![DType::F32, DType::BF16, DType::F16]
    } else {
        vec![DType::F32]
    }
}

#[test]
fn projection_through_a_transposed_weight() {
    for dtype in dtypes() {
        // A weight stored `[out, in]` and used as its `[in, out]` view, like the loader's.
        let x = random([37, 64], dtype);
        let w = random([48, 64], dtype).transpose();
        check("linear, frozen weight", dtype, x.clone(), w.clone(), false);
        check("linear, trainable weight", dtype, x, w, true);
    }
}

#[test]
fn row_major_operands() {
    for dtype in dtypes() {
        check(
            "row-major",
            dtype,
            random([19, 33], dtype),
            random([33, 21], dtype),
            true,
        );
    }
}

#[test]
fn batched_attention_products() {
    for dtype in dtypes() {
        let q = random([2, 3, 17, 16], dtype);
        let keys = random([2, 3, 19, 16], dtype).swap_dims(2, 3);
        check("scores q·kᵀ", dtype, q, keys, true);
        let p = random([2, 3, 17, 19], dtype);
        let v = random([2, 3, 19, 16], dtype);
        check("probabilities·v", dtype, p, v, true);
    }
}

#[test]
fn broadcast_batch() {
    for dtype in dtypes() {
        // Prompt keys shared by the batch: an expanded (stride-0) batch dimension.
        let q = random([2, 3, 7, 16], dtype);
        let keys = random([1, 3, 5, 16], dtype)
            .expand([2, 3, 5, 16])
            .swap_dims(2, 3);
        check("shared prompt keys", dtype, q, keys, false);
    }
}

//! `peft_ops::tensor::matmul` (the product every projection and attention uses) and its
//! gradients against an f64 reference computed on the host, for the layouts the model gives
//! it: row-major operands, transposed views (`[out, in]` weights, `keys.swap_dims(2, 3)`),
//! batches of heads, a broadcast (expanded) batch, and a frozen operand.
//!
//! On the CPU build this checks Burn's product. Built with `--features cuda` it runs on the GPU
//! and checks the cuBLAS route (`src/cublas.rs`) on Burn's CUDA backend both with kernel fusion
//! (`burn::backend::Cuda`, the product a custom fusion operation) and without
//! (`peft_ops::cublas::CudaBare`): f32 must then be true f32 (rtol 1e-5 of the
//! largest reference value, which TF32 products would miss by two orders of magnitude), bf16
//! within 1e-2 (inputs rounded to bf16 first; the result is rounded to bf16 once).

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Tensor};
use peft_ops::tensor::{cast_to, matmul};

/// Runs `$case::<A>()` for every autodiff backend of this build.
macro_rules! on_backends {
    ($case:ident) => {{
        #[cfg(feature = "cuda")]
        {
            $case::<Autodiff<burn::backend::Cuda<f32>>>();
            $case::<Autodiff<peft_ops::cublas::CudaBare>>();
        }
        #[cfg(not(feature = "cuda"))]
        $case::<Autodiff<burn::backend::NdArray<f32>>>();
    }};
}

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

fn random<A: Backend, const D: usize>(shape: [usize; D], dtype: DType) -> Tensor<A, D> {
    cast_to(
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default()),
        dtype,
    )
}

/// One case: `a` `[batch.., m, k]`, `b` `[batch.., k, n]` built by `make`, checked forward and
/// backward (`loss = Σ r ⊙ (a · b)`, so `da = r · bᵀ`, `db = aᵀ · r`).
fn check<A: AutodiffBackend, const D: usize>(
    name: &str,
    dtype: DType,
    a: Tensor<A, D>,
    b: Tensor<A, D>,
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
    let r = random::<A, D>(c.dims(), dtype);
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

fn transposed_weight<A: AutodiffBackend>() {
    for dtype in dtypes() {
        // A weight stored `[out, in]` and used as its `[in, out]` view, like the loader's.
        let x = random::<A, 2>([37, 64], dtype);
        let w = random::<A, 2>([48, 64], dtype).transpose();
        check("linear, frozen weight", dtype, x.clone(), w.clone(), false);
        check("linear, trainable weight", dtype, x, w, true);
    }
}

#[test]
fn projection_through_a_transposed_weight() {
    on_backends!(transposed_weight);
}

fn row_major<A: AutodiffBackend>() {
    for dtype in dtypes() {
        check(
            "row-major",
            dtype,
            random::<A, 2>([19, 33], dtype),
            random::<A, 2>([33, 21], dtype),
            true,
        );
    }
}

#[test]
fn row_major_operands() {
    on_backends!(row_major);
}

fn attention_products<A: AutodiffBackend>() {
    for dtype in dtypes() {
        let q = random::<A, 4>([2, 3, 17, 16], dtype);
        let keys = random::<A, 4>([2, 3, 19, 16], dtype).swap_dims(2, 3);
        check("scores q·kᵀ", dtype, q, keys, true);
        let p = random::<A, 4>([2, 3, 17, 19], dtype);
        let v = random::<A, 4>([2, 3, 19, 16], dtype);
        check("probabilities·v", dtype, p, v, true);
    }
}

#[test]
fn batched_attention_products() {
    on_backends!(attention_products);
}

fn shared_prompt_keys<A: AutodiffBackend>() {
    for dtype in dtypes() {
        // Prompt keys shared by the batch: an expanded (stride-0) batch dimension.
        let q = random::<A, 4>([2, 3, 7, 16], dtype);
        let keys = random::<A, 4>([1, 3, 5, 16], dtype)
            .expand([2, 3, 5, 16])
            .swap_dims(2, 3);
        check("shared prompt keys", dtype, q, keys, false);
    }
}

#[test]
fn broadcast_batch() {
    on_backends!(shared_prompt_keys);
}

/// Element-wise work on both sides of the product, which Burn's fusion puts into fused kernels
/// around the custom operation: `(2a + 1) · b`, then `relu`.
fn fused_neighbours<A: AutodiffBackend>() {
    for dtype in dtypes() {
        let rtol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let a = random::<A, 3>([2, 9, 12], dtype);
        let b = random::<A, 3>([2, 12, 7], dtype);
        let (ha, hb) = (host(a.clone()), host(b.clone()));
        let c = burn::tensor::activation::relu(matmul(a * 2.0 + 1.0, b));
        let shifted: Vec<f64> = ha.iter().map(|v| 2.0 * v + 1.0).collect();
        let want: Vec<f64> = reference(&shifted, &hb, 2, 9, 12, 7)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        assert_close(
            &format!("fused neighbours {dtype:?}"),
            &host(c),
            &want,
            rtol,
        );
    }
}

#[test]
fn element_wise_work_around_the_product() {
    on_backends!(fused_neighbours);
}

//! Products with a few rows on the CPU: decoding's `x · Wᵀ` for one token (or one per prompt).
//!
//! A GEMM packs both operands into panels before it multiplies; for a product of one row the
//! packing of the weight is the whole cost (a decoding step spent 64 % of its time packing).
//! Here each output `c[i, j]` is the dot product of row `i` of `a` with column `j` of `b`, read
//! where they lie, when `b` is the transpose of a contiguous row-major matrix (a weight
//! `[out, in]` seen as `[in, out]`, which is how every projection and the output head hold
//! theirs). Large products split the weight's rows over the cores. The sums run in another
//! order than the GEMM's (a few f32 roundings).
//!
//! [`quantized`] does the same against a quantized weight without a dense tile: each thread
//! dequantizes a few rows of the weight at a time into a buffer that stays in cache and takes
//! their dot products at once.

use std::ops::Range;

use burn::tensor::{DType, Tensor, TensorData};
use ndarray::{ArrayView2, ArrayViewMut2};
use peft_io::quant::QuantizedMatrix;

use super::Cpu;

/// Products with at most this many rows take this path.
const MAX_ROWS: usize = 4;

/// Below this many multiply-adds per row a product stays on one thread.
const PARALLEL_MIN: usize = 1 << 18;

/// Weight rows dequantized per batch in [`quantized`] (a few KiB to a few hundred, in cache).
const QUANTIZED_ROWS: usize = 8;

/// `c = a · b` for `a` `[m, k]` (m ≤ [`MAX_ROWS`]) and `b` `[k, n]` whose transpose is a
/// contiguous row-major `[n, k]` (a weight `[out, in]` seen as `[in, out]`); `false` (nothing
/// written) for any other layout.
pub(super) fn gemv(
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    c: &mut ArrayViewMut2<'_, f32>,
) -> bool {
    let ((m, k), n) = (a.dim(), b.dim().1);
    let weight = b.t();
    let (Some(w), true) = (weight.as_slice(), m <= MAX_ROWS && k > 0) else {
        return false;
    };
    let x: Vec<f32> = a.iter().copied().collect();
    let y = products(n, m, k, &|rows, out| {
        dots(&x, m, &w[rows.start * k..rows.end * k], k, out);
    });
    for ((i, j), c) in c.indexed_iter_mut() {
        *c = y[i * n + j];
    }
    true
}

/// `x · Wᵀ` for `x` `[m, k]` (m ≤ [`MAX_ROWS`], f32) and a quantized `W` `[n, k]` on the CPU
/// backend, rows of `W` dequantized a few at a time on every core; `None` for other inputs.
pub(crate) fn quantized(x: &Tensor<Cpu, 2>, weight: &QuantizedMatrix) -> Option<Tensor<Cpu, 2>> {
    let [m, k] = x.dims();
    if m > MAX_ROWS || x.dtype() != DType::F32 || k != weight.cols() || !super::enabled() {
        return None;
    }
    let xs: Vec<f32> = x.clone().into_data().into_vec::<f32>().ok()?;
    let n = weight.rows();
    let y = products(n, m, k, &|rows, out| {
        let mut buffer = vec![0.0f32; QUANTIZED_ROWS * k];
        for (batch, out) in out.chunks_mut(QUANTIZED_ROWS * m).enumerate() {
            let start = rows.start + batch * QUANTIZED_ROWS;
            let count = out.len() / m;
            let buffer = &mut buffer[..count * k];
            weight.dequantize_rows_into(start..start + count, buffer);
            dots(&xs, m, buffer, k, out);
        }
    });
    Some(Tensor::from_data(TensorData::new(y, [m, n]), &x.device()))
}

/// `x · Wᵀ` `[m, n]` row-major for `W` `[n, k]`: `rows(weight rows, their outputs)` fills the
/// transpose `[n, m]` on blocks of weight rows (one thread each when the product is large),
/// which is then turned around.
fn products(
    n: usize,
    m: usize,
    k: usize,
    rows: &(dyn Fn(Range<usize>, &mut [f32]) + Sync),
) -> Vec<f32> {
    let mut yt = vec![0.0f32; n * m];
    let min_values = if n * k >= PARALLEL_MIN { 0 } else { usize::MAX };
    peft_io::threads::fill_rows(&mut yt, n, min_values, rows);
    let mut y = vec![0.0f32; m * n];
    for (j, row) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            y[i * n + j] = v;
        }
    }
    y
}

/// `out[r · m + i] = x_i · w_r` for the `m` rows of `x` and the rows of `w`, both `k` wide.
fn dots(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features `dots_fma` is compiled for (checked just above).
        return unsafe { dots_fma(x, m, w, k, out) };
    }
    dots_with::<false>(x, m, w, k, out);
}

/// [`dots`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dots_fma(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    dots_with::<true>(x, m, w, k, out);
}

#[inline(always)]
fn dots_with<const FUSED: bool>(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    for (w_row, out) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        for (x_row, y) in x.chunks_exact(k).zip(out.iter_mut()) {
            *y = dot::<FUSED>(x_row, w_row);
        }
    }
}

/// `Σ a ⊙ b` in 16 lanes (vector registers), then the lanes and the tail.
#[inline(always)]
fn dot<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_blocks.remainder(), b_blocks.remainder());
    for (x, y) in a_blocks.zip(b_blocks) {
        for l in 0..LANES {
            acc[l] = if FUSED {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    let mut sum = 0.0f32;
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    // Pairwise over the lanes.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + sum
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ShapeBuilder};

    use super::*;

    /// Against a plain f64 product, for one to four rows, short and long inner sizes, narrow and
    /// wide outputs (the wide ones cut over threads); other layouts are declined.
    #[test]
    fn few_row_products_equal_the_exact_product() {
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0 - 1.0;
        for (m, k, n) in [
            (1, 5, 3),
            (1, 576, 1536),
            (3, 33, 700),
            (4, 1536, 576),
            (2, 64, 9000),
        ] {
            let a = Array2::from_shape_fn((m, k), |(i, t)| value(i * k + t, 1));
            // `[n, k]` row-major seen as `[k, n]`: contiguous columns, as a weight's transpose.
            let w = Array2::from_shape_fn((n, k), |(j, t)| value(j * k + t, 2));
            let b = w.t();
            let mut c = Array2::<f32>::zeros((m, n));
            assert!(gemv(&a.view(), &b, &mut c.view_mut()));
            let mut worst = 0.0f64;
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|t| f64::from(a[[i, t]]) * f64::from(b[[t, j]]))
                        .sum();
                    worst = worst.max((f64::from(c[[i, j]]) - exact).abs());
                }
            }
            assert!(worst < 1e-5 * k as f64, "{m}x{k}x{n}: {worst:e}");
        }
        let a = Array2::<f32>::zeros((1, 8));
        let row_major = Array2::<f32>::zeros((8, 4));
        assert!(!gemv(
            &a.view(),
            &row_major.view(),
            &mut Array2::zeros((1, 4)).view_mut()
        ));
        let five = Array2::<f32>::zeros((5, 8));
        let b = Array2::<f32>::zeros((8, 4).f());
        assert!(!gemv(
            &five.view(),
            &b.view(),
            &mut Array2::zeros((5, 4)).view_mut()
        ));
    }

    /// The quantized few-row product equals the dense product on the dequantized weight (within
    /// the sums' rounding), for NF4 blocks that straddle rows and for Q8_0, cut over threads or
    /// not; more than four rows are declined.
    #[test]
    fn quantized_few_row_products_equal_the_dense_product() {
        let value = |i: usize| ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
        for (m, n, k) in [(1, 3, 224), (4, 700, 224), (2, 1500, 256)] {
            let w: Vec<f32> = (0..n * k).map(value).collect();
            for weight in [
                QuantizedMatrix::quantize_nf4(&w, n, k).unwrap(),
                QuantizedMatrix::quantize_q8_0(&w, n, k).unwrap(),
            ] {
                let dense = Array2::from_shape_vec((n, k), weight.dequantize()).unwrap();
                let xs: Vec<f32> = (0..m * k).map(|i| value(i + 13)).collect();
                let x = Tensor::<Cpu, 2>::from_data(
                    TensorData::new(xs.clone(), [m, k]),
                    &Default::default(),
                );
                let y = quantized(&x, &weight)
                    .unwrap()
                    .into_data()
                    .into_vec::<f32>()
                    .unwrap();
                let xa = Array2::from_shape_vec((m, k), xs).unwrap();
                let want = xa.dot(&dense.t());
                for (got, want) in y.iter().zip(want.iter()) {
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{m}x{n}x{k}: {got} vs {want}"
                    );
                }
            }
        }
        let five = Tensor::<Cpu, 2>::zeros([5, 64], &Default::default());
        let q = QuantizedMatrix::quantize_q8_0(&[0.5; 64 * 3], 3, 64).unwrap();
        assert!(quantized(&five, &q).is_none());
    }
}

//! Products with a few rows on the CPU: decoding's `x · Wᵀ` for one token (or one per prompt).
//!
//! A GEMM packs both operands into panels before it multiplies; for a product of one row the
//! packing of the weight is the whole cost (a decoding step spent 64 % of its time packing).
//! Here each output `c[i, j]` is the dot product of row `i` of `a` with column `j` of `b`, read
//! where they lie, when `b`'s columns are contiguous (a weight `[out, in]` seen as its transpose,
//! which is how every projection and the output head hold theirs). Large products split their
//! columns over the cores. The sums run in another order than the GEMM's (a few f32 roundings).

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

/// Products with at most this many rows take this path.
pub(super) const MAX_ROWS: usize = 4;

/// Below this many multiply-adds per row a product stays on one thread.
const PARALLEL_MIN: usize = 1 << 18;

/// `c = a · b` for `a` `[m, k]` (m ≤ [`MAX_ROWS`]) and `b` `[k, n]` whose columns are contiguous;
/// `false` (nothing written) for any other layout.
pub(super) fn gemv(
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    c: &mut ArrayViewMut2<'_, f32>,
) -> bool {
    let (m, k) = a.dim();
    if m > MAX_ROWS || k == 0 || (b.strides()[0] != 1 && b.dim().0 > 1) {
        return false;
    }
    // The rows of `a`, contiguous (they are few and short).
    let rows: Vec<Vec<f32>> = a.rows().into_iter().map(|r| r.to_vec()).collect();
    let pieces = if k * b.dim().1 >= PARALLEL_MIN {
        crate::threads::pieces()
    } else {
        1
    };
    split(&rows, b.view(), c.view_mut(), pieces);
    true
}

/// Fills `c`'s columns from `b`'s, cut into `pieces` blocks of columns, one thread each.
fn split(rows: &[Vec<f32>], b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>, pieces: usize) {
    let n = b.dim().1;
    if pieces <= 1 || n < 2 {
        return columns(rows, b, c);
    }
    let mid = n / 2;
    let (b_low, b_high) = b.split_at(Axis(1), mid);
    let (c_low, c_high) = c.split_at(Axis(1), mid);
    let low = pieces / 2;
    std::thread::scope(|scope| {
        scope.spawn(|| split(rows, b_low, c_low, low));
        split(rows, b_high, c_high, pieces - low);
    });
}

/// `c[i, j] = rows[i] · b[:, j]` on this thread.
fn columns(rows: &[Vec<f32>], b: ArrayView2<'_, f32>, mut c: ArrayViewMut2<'_, f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features `columns_fma` is compiled for (checked just above).
        return unsafe { columns_fma(rows, b, c) };
    }
    columns_with::<false>(rows, b, &mut c);
}

/// [`columns`] compiled for AVX2 with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn columns_fma(rows: &[Vec<f32>], b: ArrayView2<'_, f32>, mut c: ArrayViewMut2<'_, f32>) {
    columns_with::<true>(rows, b, &mut c);
}

#[inline(always)]
fn columns_with<const FUSED: bool>(
    rows: &[Vec<f32>],
    b: ArrayView2<'_, f32>,
    c: &mut ArrayViewMut2<'_, f32>,
) {
    for (j, column) in b.columns().into_iter().enumerate() {
        let column = match column.as_slice() {
            Some(s) => s,
            None => unreachable!("columns checked contiguous"),
        };
        for (i, row) in rows.iter().enumerate() {
            c[[i, j]] = dot::<FUSED>(row, column);
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
}

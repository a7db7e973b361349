//! One-pass CPU kernels for the blocks of [`crate::blocks`] on `NdArray<f32>`, split over the
//! machine's cores.
//!
//! SwiGLU forward and backward run in one pass each with one `exp` per element, where the chain
//! of tensor operations takes five passes and three transcendental functions (Burn's sigmoid is
//! `exp(-ln(1 + exp(-x)))`); RMSNorm forward and its input gradient, and the attention softmax
//! and its gradient, in one pass per row, where the chains take five to seven over the whole
//! tensor; the rotary embedding and its gradient in one pass, where the chain narrows, negates,
//! concatenates, multiplies twice and adds (the forward's values are the chain's bit for bit).
//!
//! Burn's NdArray backend runs element-wise work on one thread. Here a large tensor's rows are
//! cut in two along a leading axis and each half runs on its own thread (recursively, one piece
//! per core); every value is computed exactly as on one thread, since no row is ever split.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use ndarray::{ArrayD, ArrayView1, ArrayViewD, ArrayViewMut1, ArrayViewMutD, Axis, IxDyn, Zip};

use super::{enabled, view, Cpu};
use crate::dispatch::{cast, is, Kernel};

/// The outputs of `kernel` on `inputs` when `X` is the CPU backend and this module has the
/// kernel; `None` otherwise (the caller then runs the chain of tensor operations).
pub(crate) fn run<X: Backend>(
    kernel: Kernel,
    inputs: &[FloatTensor<X>],
) -> Option<Vec<FloatTensor<X>>> {
    if !is::<X, Cpu>() || !enabled() {
        return None;
    }
    let inputs: Vec<FloatTensor<Cpu>> = inputs.iter().map(|t| cast(t.clone())).collect();
    let views = inputs.iter().map(view).collect::<Option<Vec<_>>>()?;
    let outputs = match kernel {
        Kernel::RmsNormForward { eps } => rms_norm_forward(&views, eps)?,
        Kernel::RmsNormBackward => rms_norm_backward(&views)?,
        Kernel::SoftmaxForward { scale } => softmax_forward(&views, scale)?,
        Kernel::SoftmaxBackward { scale } => softmax_backward(&views, scale)?,
        Kernel::SwigluForward | Kernel::SwigluBackward => swiglu(kernel, &views)?,
        Kernel::RopeForward | Kernel::RopeBackward => rope(kernel, &views)?,
    };
    Some(
        outputs
            .into_iter()
            .map(|out| {
                cast(burn::backend::ndarray::NdArrayTensor::from(
                    out.into_shared(),
                ))
            })
            .collect(),
    )
}

/// What a kernel does to a block of rows: writes its outputs from its inputs, all of the same
/// leading dimensions.
type Work<'w> = dyn Fn(&mut [ArrayViewMutD<'_, f32>], &[ArrayViewD<'_, f32>]) + Sync + 'w;

/// Below this many output elements a kernel stays on one thread (a thread costs more).
const PARALLEL_MIN: usize = 1 << 15;

/// Fresh outputs of `shapes`, filled by `work` over `ins`, which share the outputs' leading
/// dimensions (all but the last).
fn compute(shapes: &[Vec<usize>], ins: &[ArrayViewD<'_, f32>], work: &Work) -> Vec<ArrayD<f32>> {
    let mut outputs: Vec<ArrayD<f32>> = shapes.iter().map(|s| ArrayD::zeros(IxDyn(s))).collect();
    let outs = outputs.iter_mut().map(|o| o.view_mut()).collect();
    split(outs, ins.to_vec(), peft_io::threads::pieces(), work);
    outputs
}

/// Runs `work` on `outs` and `ins`, cut into `pieces` blocks of whole rows along the first
/// leading axis that has two or more rows, each block on its own thread.
fn split(
    mut outs: Vec<ArrayViewMutD<'_, f32>>,
    ins: Vec<ArrayViewD<'_, f32>>,
    pieces: usize,
    work: &Work,
) {
    let first = &outs[0];
    let axis = (0..first.ndim().saturating_sub(1))
        .map(Axis)
        .find(|&a| first.len_of(a) >= 2);
    let (axis, rows) = match axis {
        Some(a) if pieces > 1 && first.len() >= PARALLEL_MIN => (a, first.len_of(a)),
        _ => return work(&mut outs, &ins),
    };
    let fits = |len: usize| len == rows;
    if !outs.iter().all(|o| fits(o.len_of(axis))) || !ins.iter().all(|i| fits(i.len_of(axis))) {
        return work(&mut outs, &ins);
    }
    let mid = rows / 2;
    let (mut low_outs, mut high_outs) = (Vec::new(), Vec::new());
    for o in outs {
        let (low, high) = o.split_at(axis, mid);
        low_outs.push(low);
        high_outs.push(high);
    }
    let (mut low_ins, mut high_ins) = (Vec::new(), Vec::new());
    for i in ins {
        let (low, high) = i.split_at(axis, mid);
        low_ins.push(low);
        high_ins.push(high);
    }
    let low_pieces = pieces / 2;
    std::thread::scope(|scope| {
        scope.spawn(|| split(low_outs, low_ins, low_pieces, work));
        split(high_outs, high_ins, pieces - low_pieces, work);
    });
}

/// RMSNorm of `x` `[batch, seq, hidden]` by `weight` `[hidden]` in one pass per row: `y` and
/// `1/rms` `[batch, seq, 1]`, as `composed::rms_norm_with_inv_rms` (f32).
fn rms_norm_forward(views: &[ArrayViewD<'_, f32>], eps: f32) -> Option<Vec<ArrayD<f32>>> {
    let [x, weight] = views else { return None };
    let hidden = *x.shape().last()?;
    if x.ndim() != 3 || weight.shape() != [hidden] {
        return None;
    }
    let weight = weight.broadcast(x.raw_dim())?;
    let mut inv_shape = x.shape().to_vec();
    inv_shape[2] = 1;
    let last = Axis(2);
    let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
        let [y, inv] = outs else { return };
        let [x, weight] = ins else { return };
        Zip::from(y.lanes_mut(last))
            .and(inv.lanes_mut(last))
            .and(x.lanes(last))
            .and(weight.lanes(last))
            .for_each(|mut y, mut inv, x, weight| {
                // Accumulated in f64: one rounding, where the chain's f32 sum rounds at every add.
                let sum: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
                let mean_square = (sum / hidden as f64) as f32;
                let r = 1.0 / (mean_square + eps).sqrt();
                inv[0] = r;
                Zip::from(&mut y)
                    .and(&x)
                    .and(&weight)
                    .for_each(|y, &x, &w| *y = w * (x * r));
            });
    };
    Some(compute(
        &[x.shape().to_vec(), inv_shape],
        &[x.clone(), weight],
        &work,
    ))
}

/// The input gradient of RMSNorm from `[x, weight, dy, 1/rms]`: with `x̂ = x / rms` and
/// `g = dy ⊙ w`, `dx = (g − x̂ · mean(g ⊙ x̂)) / rms`, one pass per row.
fn rms_norm_backward(views: &[ArrayViewD<'_, f32>]) -> Option<Vec<ArrayD<f32>>> {
    let [x, weight, dy, inv] = views else {
        return None;
    };
    let hidden = *x.shape().last()?;
    if x.ndim() != 3 || dy.shape() != x.shape() || weight.shape() != [hidden] {
        return None;
    }
    if inv.shape() != [x.shape()[0], x.shape()[1], 1] {
        return None;
    }
    let weight = weight.broadcast(x.raw_dim())?;
    let last = Axis(2);
    let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
        let [dx] = outs else { return };
        let [x, weight, dy, inv] = ins else { return };
        Zip::from(dx.lanes_mut(last))
            .and(x.lanes(last))
            .and(weight.lanes(last))
            .and(dy.lanes(last))
            .and(inv.lanes(last))
            .for_each(|mut dx, x, weight, dy, inv| {
                let r = inv[0];
                let dot = Zip::from(&x)
                    .and(&dy)
                    .and(&weight)
                    .fold(0.0f64, |acc, &x, &d, &w| acc + f64::from(d * w * (x * r)))
                    / hidden as f64;
                let dot = dot as f32;
                Zip::from(&mut dx)
                    .and(&x)
                    .and(&dy)
                    .and(&weight)
                    .for_each(|dx, &x, &d, &w| *dx = (d * w - x * r * dot) * r);
            });
    };
    Some(compute(
        &[x.shape().to_vec()],
        &[x.clone(), weight, dy.clone(), inv.clone()],
        &work,
    ))
}

/// `softmax(scale · scores + bias)` over the last axis of `[batch, heads, queries, keys]`
/// scores, `bias` `[batch or 1, 1, queries, keys]` (0 or `-inf`) broadcast: one pass per row.
fn softmax_forward(views: &[ArrayViewD<'_, f32>], scale: f32) -> Option<Vec<ArrayD<f32>>> {
    let (scores, bias) = match views {
        [scores] => (scores, None),
        [scores, bias] => (scores, Some(bias.broadcast(scores.raw_dim())?)),
        _ => return None,
    };
    if scores.ndim() != 4 {
        return None;
    }
    let last = Axis(3);
    let row =
        |mut p: ArrayViewMut1<'_, f32>, s: ArrayView1<'_, f32>, b: Option<ArrayView1<'_, f32>>| {
            match b {
                Some(b) => Zip::from(&mut p)
                    .and(&s)
                    .and(&b)
                    .for_each(|p, &s, &b| *p = s * scale + b),
                None => Zip::from(&mut p).and(&s).for_each(|p, &s| *p = s * scale),
            }
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            p.mapv_inplace(|v| {
                let e = (v - max).exp();
                sum += e;
                e
            });
            p.mapv_inplace(|v| v / sum);
        };
    let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
        let [p] = outs else { return };
        match ins {
            [s, b] => Zip::from(p.lanes_mut(last))
                .and(s.lanes(last))
                .and(b.lanes(last))
                .for_each(|p, s, b| row(p, s, Some(b))),
            [s] => Zip::from(p.lanes_mut(last))
                .and(s.lanes(last))
                .for_each(|p, s| row(p, s, None)),
            _ => {}
        }
    };
    let mut ins = vec![scores.clone()];
    ins.extend(bias);
    Some(compute(&[scores.shape().to_vec()], &ins, &work))
}

/// `scale · p ⊙ (dp − Σ_keys dp ⊙ p)` from `[p, dp]`: one pass per row.
fn softmax_backward(views: &[ArrayViewD<'_, f32>], scale: f32) -> Option<Vec<ArrayD<f32>>> {
    let [p, dp] = views else { return None };
    if p.shape() != dp.shape() || p.ndim() != 4 {
        return None;
    }
    let last = Axis(3);
    let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
        let [ds] = outs else { return };
        let [p, dp] = ins else { return };
        Zip::from(ds.lanes_mut(last))
            .and(p.lanes(last))
            .and(dp.lanes(last))
            .for_each(|mut ds, p, dp| {
                let dot = Zip::from(&p)
                    .and(&dp)
                    .fold(0.0f32, |acc, &p, &d| acc + d * p);
                Zip::from(&mut ds)
                    .and(&p)
                    .and(&dp)
                    .for_each(|ds, &p, &d| *ds = p * (d - dot) * scale);
            });
    };
    Some(compute(
        &[p.shape().to_vec()],
        &[p.clone(), dp.clone()],
        &work,
    ))
}

/// SwiGLU forward (`[gate, up]` → `[y]`) and backward (`[gate, up, dy]` → `[d gate, d up]`).
fn swiglu(kernel: Kernel, views: &[ArrayViewD<'_, f32>]) -> Option<Vec<ArrayD<f32>>> {
    if views.iter().any(|v| v.shape() != views[0].shape()) {
        return None;
    }
    let shape = views[0].shape().to_vec();
    let sigmoid = |g: f32| 1.0 / (1.0 + (-g).exp());
    match (kernel, views) {
        (Kernel::SwigluForward, [_, _]) => {
            let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
                let ([y], [gate, up]) = (outs, ins) else {
                    return;
                };
                Zip::from(y)
                    .and(gate)
                    .and(up)
                    .for_each(|y, &g, &u| *y = g * sigmoid(g) * u);
            };
            Some(compute(&[shape], views, &work))
        }
        (Kernel::SwigluBackward, [_, _, _]) => {
            let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
                let ([dgate, dup], [gate, up, dy]) = (outs, ins) else {
                    return;
                };
                Zip::from(dgate)
                    .and(dup)
                    .and(gate)
                    .and(up)
                    .and(dy)
                    .for_each(|dg, du, &g, &u, &d| {
                        let s = sigmoid(g);
                        *du = d * (g * s);
                        *dg = d * u * s * (1.0 + g * (1.0 - s));
                    });
            };
            Some(compute(&[shape.clone(), shape], views, &work))
        }
        _ => None,
    }
}

/// The rotary embedding in the rotate-half layout, forward (`[x, cos, sin]` → `x ⊙ cos +
/// rotate_half(x) ⊙ sin`, `rotate_half([a, b]) = [−b, a]`) and backward (`[dy, cos, sin]` →
/// `dy ⊙ cos + [b, −a]` where `[a, b] = dy ⊙ sin`), for `x` `[batch, heads, seq, head_dim]`
/// (any strides: the heads view of a projection) and tables `[batch or 1, 1, seq, head_dim]`.
fn rope(kernel: Kernel, views: &[ArrayViewD<'_, f32>]) -> Option<Vec<ArrayD<f32>>> {
    let forward = match kernel {
        Kernel::RopeForward => true,
        Kernel::RopeBackward => false,
        _ => return None,
    };
    let [x, cos, sin] = views else { return None };
    let dim = *x.shape().last()?;
    if x.ndim() != 4 || dim % 2 != 0 || cos.shape() != sin.shape() {
        return None;
    }
    let (cos, sin) = (cos.broadcast(x.raw_dim())?, sin.broadcast(x.raw_dim())?);
    let half = dim / 2;
    let last = Axis(3);
    let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
        let ([y], [x, cos, sin]) = (outs, ins) else {
            return;
        };
        Zip::from(y.lanes_mut(last))
            .and(x.lanes(last))
            .and(cos.lanes(last))
            .and(sin.lanes(last))
            .for_each(|mut y, x, c, s| {
                for j in 0..half {
                    let (a, b) = (x[j], x[j + half]);
                    if forward {
                        // The chain's `x ⊙ cos + cat(−b, a) ⊙ sin`, operation for operation.
                        y[j] = a * c[j] + -b * s[j];
                        y[j + half] = b * c[j + half] + a * s[j + half];
                    } else {
                        y[j] = a * c[j] + b * s[j + half];
                        y[j + half] = b * c[j + half] + -(a * s[j]);
                    }
                }
            });
    };
    Some(compute(
        &[x.shape().to_vec()],
        &[x.clone(), cos, sin],
        &work,
    ))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::graph::raw;

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<Cpu, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// Outputs of `kernel` on `inputs` cut into `pieces`, after checking that [`split`] puts
    /// every row of the inputs back where it came from.
    fn in_pieces(kernel: Kernel, inputs: &[FloatTensor<Cpu>], pieces: usize) -> Vec<Vec<f32>> {
        let views: Vec<_> = inputs.iter().map(|t| view(t).unwrap()).collect();
        let mut copies: Vec<ArrayD<f32>> =
            views.iter().map(|v| ArrayD::zeros(v.raw_dim())).collect();
        let work = |outs: &mut [ArrayViewMutD<'_, f32>], ins: &[ArrayViewD<'_, f32>]| {
            for (o, i) in outs.iter_mut().zip(ins) {
                o.assign(i);
            }
        };
        let outs = copies.iter_mut().map(|c| c.view_mut()).collect();
        split(outs, views.clone(), pieces, &work);
        for (copy, input) in copies.iter().zip(&views) {
            assert_eq!(copy.view(), *input, "a row moved when cut into {pieces}");
        }
        peft_io::threads::set_pieces_on_this_thread(Some(pieces));
        let outputs = run::<Cpu>(kernel, inputs).unwrap();
        peft_io::threads::set_pieces_on_this_thread(None);
        outputs
            .iter()
            .map(|o| view(o).unwrap().iter().copied().collect())
            .collect()
    }

    /// Large enough to be cut: each kernel gives the same values cut into 1, 2 or 3 pieces (the
    /// kernels against the chains they replace: `tests/ops/blocks.rs`).
    #[test]
    fn cut_kernels_equal_one_thread_bit_for_bit() {
        let x = random([1, 64, 4, 128]).swap_dims(1, 2); // the heads view: [1, 4, 64, 128]
        let angles = random([1, 1, 64, 128]);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let rope_in = [raw(x), raw(cos), raw(sin)];
        let h = random([2, 128, 256]);
        let cases: Vec<(Kernel, Vec<FloatTensor<Cpu>>)> = vec![
            (Kernel::RopeForward, rope_in.to_vec()),
            (Kernel::RopeBackward, rope_in.to_vec()),
            (
                Kernel::SwigluForward,
                vec![raw(h.clone()), raw(h.clone().exp())],
            ),
            (
                Kernel::SwigluBackward,
                vec![raw(h.clone()), raw(h.clone().exp()), raw(h.clone().sin())],
            ),
            (
                Kernel::RmsNormForward { eps: 1e-5 },
                vec![raw(h.clone()), raw(random([256]))],
            ),
            (
                Kernel::SoftmaxForward { scale: 0.125 },
                vec![raw(random([2, 4, 64, 128]))],
            ),
            (
                Kernel::SoftmaxBackward { scale: 0.125 },
                vec![raw(random([2, 4, 64, 128])), raw(random([2, 4, 64, 128]))],
            ),
        ];
        for (kernel, inputs) in cases {
            let one = in_pieces(kernel, &inputs, 1);
            for pieces in [2, 3] {
                assert_eq!(
                    in_pieces(kernel, &inputs, pieces),
                    one,
                    "{kernel:?} in {pieces}"
                );
            }
        }
    }
}

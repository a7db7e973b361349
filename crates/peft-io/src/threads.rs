//! Host threads for work no backend threads: quantizing and dequantizing weights here, and the
//! CPU kernels and products of `peft-ops`. Work is cut into blocks of whole rows, one thread each,
//! so every value is computed exactly as on one thread.

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

thread_local! {
    /// [`set_pieces_on_this_thread`]'s value.
    static OVERRIDE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// How many pieces large host work is cut into: the value set for this thread, else
/// `MATMUL_NUM_THREADS` when set (the knob of the CPU products' threads), else the cores this
/// process may use.
pub fn pieces() -> usize {
    if let Some(n) = OVERRIDE.with(Cell::get) {
        return n;
    }
    static PIECES: OnceLock<usize> = OnceLock::new();
    *PIECES.get_or_init(|| {
        std::env::var("MATMUL_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1)
            .max(1)
    })
}

/// Sets [`pieces`] for work started on this thread (`None`: back to the process-wide value): a
/// caller that runs many requests side by side can keep each on one thread, and tests cut the
/// same work differently.
pub fn set_pieces_on_this_thread(pieces: Option<usize>) {
    OVERRIDE.with(|c| c.set(pieces.map(|n| n.max(1))));
}

/// Fills `out`, `rows` rows of equal width, by `fill(rows, their values)` on blocks of whole
/// rows, one thread per block when `out` holds at least `min_values` values.
pub fn fill_rows<T: Send>(
    out: &mut [T],
    rows: usize,
    min_values: usize,
    fill: &(dyn Fn(Range<usize>, &mut [T]) + Sync),
) {
    let pieces = pieces().min(rows.max(1));
    if pieces <= 1 || out.len() < min_values {
        return fill(0..rows, out);
    }
    let width = out.len() / rows;
    let per_piece = rows.div_ceil(pieces);
    std::thread::scope(|scope| {
        let mut blocks = out.chunks_mut(per_piece * width).enumerate();
        let first = blocks.next();
        for (i, block) in blocks {
            let start = i * per_piece;
            scope.spawn(move || fill(start..start + block.len() / width, block));
        }
        if let Some((_, block)) = first {
            fill(0..block.len() / width, block);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row lands where it belongs however the rows are cut.
    #[test]
    fn rows_are_filled_in_place_for_any_cut() {
        let (rows, width) = (37, 5);
        let fill = |range: Range<usize>, out: &mut [f32]| {
            assert_eq!(out.len(), range.len() * width);
            for (r, row) in range.zip(out.chunks_mut(width)) {
                row.iter_mut()
                    .enumerate()
                    .for_each(|(c, v)| *v = (r * width + c) as f32);
            }
        };
        let want: Vec<f32> = (0..rows * width).map(|v| v as f32).collect();
        for n in [1, 2, 3, 8, 64] {
            let mut out = vec![-1.0; rows * width];
            set_pieces_on_this_thread(Some(n));
            fill_rows(&mut out, rows, 0, &fill);
            set_pieces_on_this_thread(None);
            assert_eq!(out, want, "{n} pieces");
        }
    }
}

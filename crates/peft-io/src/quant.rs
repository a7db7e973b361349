//! Quantized weight matrices kept in their compact form: NF4 with double quantization (QLoRA's
//! format, as bitsandbytes stores it) quantized from dense weights at load time, Q8_0 quantized
//! the same way, and the block formats of GGUF files kept as the file holds them.
//!
//! A [`QuantizedMatrix`] is a row-major `[rows, cols]` matrix (a linear layer's `[out, in]`
//! weight) that is only ever dequantized a range of rows at a time
//! ([`QuantizedMatrix::dequantize_rows`]), so that a product with it needs one tile of dense
//! values, never the whole matrix.
//!
//! | format | block | stored per block | bits per weight |
//! | --- | --- | --- | --- |
//! | NF4 (double quantized) | 64 values | 4-bit codes into the 16 NF4 levels; the block's absmax as an 8-bit code of the signed dynamic map, scaled per 256 blocks (f32) around one f32 offset | 4.127 |
//! | Q8_0 | 32 | f16 scale, 32 × i8 | 8.5 |
//! | Q4_0 / Q4_1 | 32 | f16 scale (and minimum), 32 × 4 bits | 4.5 / 5.0 |
//! | Q4_K / Q5_K / Q6_K | 256 | see [`crate::gguf`] | 4.5 / 5.5 / 6.5625 |
//!
//! NF4's 16 levels are the quantiles of N(0, 1) given by Dettmers et al., "QLoRA: Efficient
//! Finetuning of Quantized LLMs" (2023); the 8-bit map of the block maxima is the signed dynamic
//! tree map of Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (2016), with 7
//! exponent bits, as bitsandbytes builds it. Values equal bitsandbytes' `quantize_4bit(...,
//! quant_type="nf4", compress_statistics=True)` (checked against fixtures it wrote).

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

use crate::error::{CheckpointError, Result};
use crate::gguf::{dequantize_into, GgmlType};

/// Values per NF4 block (one absmax each), as bitsandbytes' default.
pub const NF4_BLOCK: usize = 64;
/// NF4 blocks whose maxima share one f32 scale in the double quantization.
pub const NF4_GROUP: usize = 256;

/// The 16 NF4 levels (QLoRA, normal-float 4-bit), ascending; level 7 is exactly zero.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The format of a [`QuantizedMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// NF4 with double-quantized block maxima (QLoRA).
    Nf4,
    /// A ggml block type, stored as a GGUF file stores it: each row whole blocks.
    Ggml(GgmlType),
}

impl QuantFormat {
    /// The name users give (`nf4`, `q8_0`, `q4_k`, ...).
    pub fn name(self) -> String {
        match self {
            Self::Nf4 => "nf4".into(),
            Self::Ggml(kind) => format!("{kind:?}").to_lowercase(),
        }
    }

    /// The formats `--quantize` can produce from dense weights, by name.
    pub fn parse_target(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "nf4" => Ok(Self::Nf4),
            "q8_0" | "q8" => Ok(Self::Ggml(GgmlType::Q8_0)),
            other => Err(CheckpointError::Quantization(format!(
                "unknown quantization '{other}': choose nf4 or q8_0"
            ))),
        }
    }
}

/// The double-quantized block maxima of an NF4 matrix.
#[derive(Clone, PartialEq)]
struct Nf4Scales {
    /// One code into [`dynamic_map`] per block.
    codes: Vec<u8>,
    /// One scale per [`NF4_GROUP`] blocks.
    group_scales: Vec<f32>,
    /// Added back to every dequantized maximum (their mean before quantization).
    offset: f32,
}

impl Nf4Scales {
    fn absmax(&self, block: usize) -> f32 {
        dynamic_map()[usize::from(self.codes[block])] * self.group_scales[block / NF4_GROUP]
            + self.offset
    }
}

/// A `[rows, cols]` row-major matrix in a quantized format (see the module documentation).
#[derive(Clone, PartialEq)]
pub struct QuantizedMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// NF4: packed codes, two per byte, the first value in the high nibble (bitsandbytes'
    /// order). ggml: the blocks of each row in turn.
    data: Vec<u8>,
    nf4: Option<Nf4Scales>,
}

impl fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QuantizedMatrix({}, [{}, {}], {} bytes)",
            self.format.name(),
            self.rows,
            self.cols,
            self.storage_bytes()
        )
    }
}

fn check_values(values: &[f32], rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 || values.len() != rows * cols {
        return Err(CheckpointError::Quantization(format!(
            "cannot quantize {} values as a [{rows}, {cols}] matrix",
            values.len()
        )));
    }
    if let Some(position) = values.iter().position(|v| !v.is_finite()) {
        return Err(CheckpointError::Quantization(format!(
            "cannot quantize a matrix holding a non-finite value ({} at row {}, column {})",
            values[position],
            position / cols,
            position % cols
        )));
    }
    Ok(())
}

/// The index of the level of sorted `levels` nearest to `x`: the number of midpoints between
/// neighbouring levels that lie strictly below `x` (ties go to the lower level).
fn nearest(levels: &[f32], midpoints: &[f32], x: f32) -> u8 {
    debug_assert_eq!(levels.len(), midpoints.len() + 1);
    if midpoints.len() <= 16 {
        // The same index as the binary search (the midpoints are sorted), counted without
        // branches: NF4's 15 midpoints compare in a couple of vector instructions, where the
        // search mispredicts about once per level it visits.
        midpoints.iter().filter(|&&m| m < x).count() as u8
    } else {
        midpoints.partition_point(|&m| m < x) as u8
    }
}

fn midpoints(levels: &[f32]) -> Vec<f32> {
    levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// The block maxima of `values` in blocks of `block` (the last may be shorter), in f32.
fn block_absmax(values: &[f32], block: usize) -> Vec<f32> {
    values
        .chunks(block)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// `values` scaled by their block's maximum into [-1, 1] and coded to the nearest of `levels`.
fn code_blocks(values: &[f32], block: usize, absmax: &[f32], levels: &[f32]) -> Vec<u8> {
    let mids = midpoints(levels);
    let code = |values: &[f32], absmax: &[f32], codes: &mut [u8]| {
        for ((b, c), &m) in values
            .chunks(block)
            .zip(codes.chunks_mut(block))
            .zip(absmax)
        {
            let inverse = 1.0 / m.max(1e-38);
            for (c, &v) in c.iter_mut().zip(b) {
                *c = nearest(levels, &mids, (v * inverse).clamp(-1.0, 1.0));
            }
        }
    };
    let mut codes = vec![0u8; values.len()];
    // Whole blocks on every core, a last partial block after them.
    let whole = values.len() / block;
    let (head, tail) = codes.split_at_mut(whole * block);
    crate::threads::fill_rows(head, whole, 1 << 16, &|blocks, out| {
        let values = &values[blocks.start * block..blocks.end * block];
        code(values, &absmax[blocks], out);
    });
    code(&values[whole * block..], &absmax[whole..], tail);
    codes
}

impl QuantizedMatrix {
    /// NF4 with double quantization of `values` `[rows, cols]` row-major: blocks of
    /// [`NF4_BLOCK`] over the flattened matrix, each scaled by its absolute maximum and coded to
    /// the nearest NF4 level; the maxima, less their mean, coded to the 8-bit dynamic map in
    /// groups of [`NF4_GROUP`] with an f32 scale per group.
    ///
    /// # Errors
    /// A shape that does not match, or a non-finite value.
    pub fn quantize_nf4(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_values(values, rows, cols)?;
        let absmax = block_absmax(values, NF4_BLOCK);
        let codes = code_blocks(values, NF4_BLOCK, &absmax, &NF4_LEVELS);
        let mut data = vec![0u8; codes.len().div_ceil(2)];
        for (i, &code) in codes.iter().enumerate() {
            data[i / 2] |= if i % 2 == 0 { code << 4 } else { code };
        }
        // The mean in f64, rounded once.
        let offset =
            (absmax.iter().map(|&m| f64::from(m)).sum::<f64>() / absmax.len() as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|&m| m - offset).collect();
        let group_scales = block_absmax(&centred, NF4_GROUP);
        let scale_codes = code_blocks(&centred, NF4_GROUP, &group_scales, dynamic_map());
        Ok(Self {
            format: QuantFormat::Nf4,
            rows,
            cols,
            data,
            nf4: Some(Nf4Scales {
                codes: scale_codes,
                group_scales,
                offset,
            }),
        })
    }

    /// Q8_0 of `values` `[rows, cols]` (`cols` a multiple of 32), as llama.cpp quantizes it:
    /// per block of 32, `d = absmax / 127`, `q = round(x / d)`, `d` stored as f16.
    ///
    /// # Errors
    /// A shape that does not match or does not split into blocks, or a non-finite value.
    pub fn quantize_q8_0(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_values(values, rows, cols)?;
        let kind = GgmlType::Q8_0;
        if !cols.is_multiple_of(kind.block_values()) {
            return Err(CheckpointError::Quantization(format!(
                "Q8_0 needs rows of whole blocks of 32 values; a row here has {cols}"
            )));
        }
        let mut data = Vec::with_capacity(values.len() / 32 * kind.block_bytes());
        for block in values.chunks_exact(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            data.extend(block.iter().map(|&x| (x * inverse).round() as i8 as u8));
        }
        Self::from_ggml(kind, rows, cols, data)
    }

    /// Quantizes `values` `[rows, cols]` to `format` ([`QuantFormat::Nf4`] or Q8_0).
    ///
    /// # Errors
    /// See [`Self::quantize_nf4`], [`Self::quantize_q8_0`]; other formats are not produced from
    /// dense weights.
    pub fn quantize(format: QuantFormat, values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        match format {
            QuantFormat::Nf4 => Self::quantize_nf4(values, rows, cols),
            QuantFormat::Ggml(GgmlType::Q8_0) => Self::quantize_q8_0(values, rows, cols),
            QuantFormat::Ggml(kind) => Err(CheckpointError::Quantization(format!(
                "quantizing to {kind:?} is not supported: choose nf4 or q8_0 (GGUF files bring \
                 their own blocks)"
            ))),
        }
    }

    /// A matrix of ggml blocks as a GGUF file stores a `[rows, cols]` tensor (ggml's `ne` =
    /// `[cols, rows]`): `rows` rows of `cols / block_values` blocks each.
    ///
    /// # Errors
    /// `cols` not a whole number of blocks, or `data` of the wrong length.
    pub fn from_ggml(kind: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let per_block = kind.block_values();
        if rows == 0 || cols == 0 || !cols.is_multiple_of(per_block) {
            return Err(CheckpointError::Quantization(format!(
                "a [{rows}, {cols}] {kind:?} matrix needs rows of whole blocks of {per_block} values"
            )));
        }
        let expected = rows * (cols / per_block) * kind.block_bytes();
        if data.len() != expected {
            return Err(CheckpointError::Quantization(format!(
                "a [{rows}, {cols}] {kind:?} matrix takes {expected} bytes, {} given",
                data.len()
            )));
        }
        Ok(Self {
            format: QuantFormat::Ggml(kind),
            rows,
            cols,
            data,
            nf4: None,
        })
    }

    /// The matrix with its rows reordered: row `i` of the result is row `order[i]` of this
    /// one (undoing llama.cpp's query/key row permutation on blocks as they are).
    ///
    /// # Errors
    /// `order` not a permutation of the rows, or an NF4 matrix (whose blocks span rows).
    pub fn permute_rows(self, order: &[usize]) -> Result<Self> {
        let QuantFormat::Ggml(kind) = self.format else {
            return Err(CheckpointError::Quantization(
                "NF4 blocks span rows; permute the dense weight before quantizing".into(),
            ));
        };
        let mut seen = vec![false; self.rows];
        let is_permutation = order.len() == self.rows
            && order
                .iter()
                .all(|&r| r < self.rows && !std::mem::replace(&mut seen[r], true));
        if !is_permutation {
            return Err(CheckpointError::Quantization(format!(
                "a row order of {} entries is not a permutation of {} rows",
                order.len(),
                self.rows
            )));
        }
        let row_bytes = self.cols / kind.block_values() * kind.block_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &row in order {
            data.extend_from_slice(&self.data[row * row_bytes..(row + 1) * row_bytes]);
        }
        Ok(Self { data, ..self })
    }

    /// The format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Rows (a linear layer's output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (a linear layer's input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: codes or blocks plus scales.
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
            + self
                .nf4
                .as_ref()
                .map_or(0, |s| s.codes.len() + 4 * s.group_scales.len() + 4)
    }

    /// Rows `range` dequantized to f32, row-major `[range.len(), cols]`.
    ///
    /// # Panics
    /// A range outside the matrix.
    pub fn dequantize_rows(&self, range: Range<usize>) -> Vec<f32> {
        let mut out = vec![0.0; range.len() * self.cols];
        self.dequantize_rows_into(range, &mut out);
        out
    }

    /// [`Self::dequantize_rows`] into `out` (`range.len() · cols` values), so that callers can
    /// fill one buffer from several threads.
    ///
    /// # Panics
    /// A range outside the matrix, or `out` of another length.
    pub fn dequantize_rows_into(&self, range: Range<usize>, out: &mut [f32]) {
        assert!(
            range.start <= range.end && range.end <= self.rows,
            "rows {range:?} of a matrix of {}",
            self.rows
        );
        assert_eq!(
            out.len(),
            range.len() * self.cols,
            "dequantize_rows_into: output length"
        );
        match (&self.format, &self.nf4) {
            (QuantFormat::Nf4, Some(scales)) => {
                // Two codes per byte over the flattened matrix, the even index's in the high
                // nibble; one absolute maximum per NF4_BLOCK values.
                let first = range.start * self.cols;
                let mut done = 0;
                while done < out.len() {
                    let index = first + done;
                    let block = index / NF4_BLOCK;
                    let end = ((block + 1) * NF4_BLOCK).min(first + out.len());
                    let absmax = scales.absmax(block);
                    let levels = NF4_LEVELS.map(|level| level * absmax);
                    let y = &mut out[done..done + (end - index)];
                    let code = |i: usize| (self.data[i / 2] >> (4 * (1 - (i & 1)))) & 0xF;
                    // An odd first index is a low nibble alone; then whole bytes; then a high
                    // nibble alone if the segment ends mid-byte.
                    let lead = index & 1;
                    if lead == 1 {
                        y[0] = levels[usize::from(code(index))];
                    }
                    let pairs = (y.len() - lead) / 2;
                    let bytes = &self.data[(index + lead) / 2..(index + lead) / 2 + pairs];
                    for (pair, &byte) in y[lead..lead + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                        pair[0] = levels[usize::from(byte >> 4)];
                        pair[1] = levels[usize::from(byte & 0xF)];
                    }
                    if lead + 2 * pairs < y.len() {
                        let last = y.len() - 1;
                        y[last] = levels[usize::from(code(index + last))];
                    }
                    done += end - index;
                }
            }
            (QuantFormat::Ggml(kind), _) => {
                let row_bytes = self.cols / kind.block_values() * kind.block_bytes();
                dequantize_into(
                    *kind,
                    &self.data[range.start * row_bytes..range.end * row_bytes],
                    out,
                );
            }
            (QuantFormat::Nf4, None) => unreachable!("an NF4 matrix has its scales"),
        }
    }

    /// The whole matrix dequantized (tests and merging; products use
    /// [`Self::dequantize_rows`]).
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0..self.rows)
    }

    /// The NF4 codes, one per value (tests and fixtures).
    pub fn nf4_codes(&self) -> Option<Vec<u8>> {
        (self.format == QuantFormat::Nf4).then(|| {
            (0..self.rows * self.cols)
                .map(|i| {
                    let byte = self.data[i / 2];
                    if i % 2 == 0 {
                        byte >> 4
                    } else {
                        byte & 0xF
                    }
                })
                .collect()
        })
    }

    /// The NF4 block maxima after double quantization, one per block (tests and fixtures).
    pub fn nf4_absmax(&self) -> Option<Vec<f32>> {
        self.nf4
            .as_ref()
            .map(|s| (0..s.codes.len()).map(|b| s.absmax(b)).collect())
    }
}

/// `steps` points evenly spaced over [`start`, `end`], computed in f64 and rounded once (the
/// first half stepped from `start`, the second from `end`, as torch does; torch's vectorised f32
/// kernel rounds a few points one ulp the other way).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let (start, end) = (f64::from(start), f64::from(end));
    let step = (end - start) / (steps - 1) as f64;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                (start + step * i as f64) as f32
            } else {
                (end - step * (steps - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// The signed 8-bit dynamic map (7 exponent bits), ascending: for exponent `i` in 0..7,
/// `2^i` magnitudes `10^(i-6) · m` (the midpoints of `2^i + 1` points evenly spaced over
/// [0.1, 1]) of each sign, then 0 and 1.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut values = Vec::with_capacity(256);
        for i in 0..7i32 {
            let bounds = linspace(0.1, 1.0, (1usize << i) + 1);
            let scale = 10f64.powi(i - 6) as f32;
            for pair in bounds.windows(2) {
                let mean = (pair[0] + pair[1]) / 2.0;
                values.push(scale * mean);
                values.push(-(scale * mean));
            }
        }
        values.push(0.0);
        values.push(1.0);
        values.sort_by(f32::total_cmp);
        values
            .try_into()
            .unwrap_or_else(|_| unreachable!("2 · (2^7 - 1) + 2 values"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        // A deterministic heavy-ish tailed sample: sums of uniforms, with a few outliers.
        let mut state = seed;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..n)
            .map(|i| {
                let v = (next() + next() + next() - 1.5) * 0.05;
                if i % 997 == 0 {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn the_dynamic_map_has_256_distinct_sorted_levels_from_minus_one_to_one() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(map[255], 1.0);
        assert!(map.contains(&0.0));
        assert!((map[0] + 0.992_968_75).abs() < 1e-7);
    }

    /// Quantizing on several threads gives the bytes of one thread (blocks are coded where they
    /// lie; 90,000 values end in a partial block).
    #[test]
    fn nf4_on_several_threads_equals_one_thread() {
        let values = sample(300 * 300, 11);
        let quantize = |pieces| {
            crate::threads::set_pieces_on_this_thread(Some(pieces));
            let q = QuantizedMatrix::quantize_nf4(&values, 300, 300).unwrap();
            crate::threads::set_pieces_on_this_thread(None);
            (q.nf4_codes().unwrap(), q.dequantize())
        };
        let one = quantize(1);
        for pieces in [2, 3, 7] {
            assert!(quantize(pieces) == one, "{pieces} threads");
        }
    }

    /// Any range of rows dequantizes to the same values as the whole matrix, for NF4 blocks that
    /// straddle rows (200 columns, blocks of 64), rows that start mid-byte, and GGUF blocks.
    #[test]
    fn row_ranges_dequantize_as_the_whole_matrix() {
        let (rows, cols) = (9, 200);
        let values = sample(rows * cols, 3);
        let nf4 = QuantizedMatrix::quantize_nf4(&values, rows, cols).unwrap();
        let q8 = QuantizedMatrix::quantize_q8_0(&sample(9 * 64, 4), 9, 64).unwrap();
        // 75 columns: rows start on odd values, mid-byte.
        let odd = QuantizedMatrix::quantize_nf4(&sample(9 * 75, 5), 9, 75).unwrap();
        for q in [nf4, q8, odd] {
            let whole = q.dequantize();
            let cols = q.cols();
            for range in [0..9, 1..2, 3..8, 8..9, 4..4] {
                let mut out = vec![f32::NAN; range.len() * cols];
                q.dequantize_rows_into(range.clone(), &mut out);
                assert_eq!(
                    out,
                    whole[range.start * cols..range.end * cols],
                    "{range:?}"
                );
            }
        }
    }

    /// NF4 round trip: each value is within half the widest gap between neighbouring levels of
    /// its block's (double-quantized) maximum, plus the error of that maximum itself.
    #[test]
    fn nf4_round_trip_is_within_the_format_bound() {
        let (rows, cols) = (48, 200); // blocks straddle rows; 150 blocks, the last full
        let values = sample(rows * cols, 7);
        let q = QuantizedMatrix::quantize_nf4(&values, rows, cols).unwrap();
        let back = q.dequantize();
        let absmax = block_absmax(&values, NF4_BLOCK);
        let stored = q.nf4_absmax().unwrap();
        let half_gap = NF4_LEVELS
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max)
            / 2.0;
        // The maxima, less their mean, are coded to the 8-bit map scaled by their group's
        // largest magnitude: each within half the map's widest gap of that scale.
        let map_half_gap = dynamic_map()
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max)
            / 2.0;
        let offset = absmax.iter().sum::<f32>() / absmax.len() as f32;
        for (block, (&m, &s)) in absmax.iter().zip(&stored).enumerate() {
            let group = &absmax[block / NF4_GROUP * NF4_GROUP..];
            let scale = group[..group.len().min(NF4_GROUP)]
                .iter()
                .fold(0f32, |a, &x| a.max((x - offset).abs()));
            let bound = map_half_gap * scale * 1.001 + 1e-6;
            assert!(
                (m - s).abs() <= bound,
                "block {block}: {m} vs {s} (bound {bound})"
            );
        }
        for (i, (&v, &r)) in values.iter().zip(&back).enumerate() {
            let (m, s) = (absmax[i / NF4_BLOCK], stored[i / NF4_BLOCK]);
            let bound = half_gap * s + (m - s).abs() + 1e-6;
            assert!(
                (v - r).abs() <= bound,
                "value {i}: {v} vs {r} (bound {bound})"
            );
        }
        // 4.127 bits per weight, as QLoRA states for block 64 and group 256.
        let bits = 8.0 * q.storage_bytes() as f64 / (rows * cols) as f64;
        assert!(bits < 4.2, "{bits} bits per weight");
        // Rows dequantize alone to the same values.
        assert_eq!(
            q.dequantize_rows(17..23),
            back[17 * cols..23 * cols].to_vec()
        );
    }

    fn fixture() -> crate::TensorMap {
        let mut map = crate::TensorMap::new("quant fixture");
        map.add_safetensors(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../fixtures/quant/blocks.safetensors"),
        )
        .unwrap();
        map
    }

    fn take_u8(map: &mut crate::TensorMap, key: &str) -> Vec<u8> {
        let (snapshot, _) = map.tensors.remove(key).unwrap();
        snapshot.to_data().unwrap().into_vec::<u8>().unwrap()
    }

    /// bitsandbytes' `quantize_4bit(nf4, blocksize=64, compress_statistics=True)` and
    /// `create_dynamic_map()` (fixtures/quant, scripts/make_quant_fixtures.py).
    #[test]
    fn nf4_matches_bitsandbytes() {
        let mut map = fixture();
        let (rows, cols) = (192, 128);
        let weight = map.take_f32("weight", &[rows, cols]).unwrap();
        let want_map = map.take_f32("dynamic_map", &[256]).unwrap();
        // torch's vectorised linspace rounds some levels the other way: within two ulps.
        for (g, w) in dynamic_map().iter().zip(&want_map) {
            assert!(
                (g - w).abs() <= 2.0 * f32::EPSILON * w.abs(),
                "map level {g} vs {w}"
            );
        }
        let q = QuantizedMatrix::quantize_nf4(&weight, rows, cols).unwrap();
        let want_codes = take_u8(&mut map, "nf4_codes");
        let want_absmax = map
            .take_f32("nf4_absmax", &[rows * cols / NF4_BLOCK])
            .unwrap();
        let want = map.take_f32("nf4_dequantized", &[rows, cols]).unwrap();
        let (codes, absmax, got) = (
            q.nf4_codes().unwrap(),
            q.nf4_absmax().unwrap(),
            q.dequantize(),
        );
        // bitsandbytes' CPU search for the nearest map level is not exact at near-ties: one block
        // maximum of these 384 (block 240, 0.4 % closer to the level below) takes the level above.
        // Such a block is one level away; every other block is equal in codes and values.
        let mut off_by_a_level = 0;
        for (block, (g, w)) in absmax.iter().zip(&want_absmax).enumerate() {
            let values = block * NF4_BLOCK..(block + 1) * NF4_BLOCK;
            if (g - w).abs() <= 1e-6 * w.abs() {
                assert_eq!(
                    codes[values.clone()],
                    want_codes[values.clone()],
                    "block {block}"
                );
                for (i, (g, w)) in got[values.clone()].iter().zip(&want[values]).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs(),
                        "block {block}[{i}]: {g} vs {w}"
                    );
                }
            } else {
                off_by_a_level += 1;
                let scales = q.nf4.as_ref().unwrap();
                let ours = usize::from(scales.codes[block]);
                let neighbour = |code: usize| {
                    dynamic_map()[code] * scales.group_scales[block / NF4_GROUP] + scales.offset
                };
                let theirs = [ours - 1, ours + 1].map(neighbour);
                assert!(
                    theirs.iter().any(|t| (t - w).abs() <= 1e-6 * w.abs()),
                    "block {block}: {g} vs {w} is not one level away"
                );
            }
        }
        assert!(off_by_a_level <= 1, "{off_by_a_level} block maxima differ");
        map.discard("q8_0_blocks");
        map.discard("q8_0_dequantized");
        map.finish().unwrap();
    }

    /// gguf-py's `quants.quantize(..., Q8_0)`: the same bytes.
    #[test]
    fn q8_0_matches_gguf_py() {
        let mut map = fixture();
        let (rows, cols) = (192, 128);
        let weight = map.take_f32("weight", &[rows, cols]).unwrap();
        let q = QuantizedMatrix::quantize_q8_0(&weight, rows, cols).unwrap();
        assert_eq!(q.data, take_u8(&mut map, "q8_0_blocks"));
        let want = map.take_f32("q8_0_dequantized", &[rows, cols]).unwrap();
        assert_eq!(q.dequantize(), want);
    }

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let (rows, cols) = (10, 96);
        let values = sample(rows * cols, 3);
        let q = QuantizedMatrix::quantize_q8_0(&values, rows, cols).unwrap();
        let back = q.dequantize();
        for (block, (v, r)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = f16::from_f32(amax / 127.0).to_f32();
            // Half a step, plus what rounding the scale to f16 moves the largest code (127).
            let bound = d / 2.0 + 127.0 * (d - amax / 127.0).abs() + 1e-7;
            for (x, y) in v.iter().zip(r) {
                assert!((x - y).abs() <= bound, "block {block}: {x} vs {y}");
            }
        }
        assert_eq!(q.storage_bytes(), rows * cols / 32 * 34);
        assert_eq!(q.dequantize_rows(4..6), back[4 * cols..6 * cols].to_vec());
    }

    #[test]
    fn bad_shapes_and_values_are_refused_by_name() {
        let err = QuantizedMatrix::quantize_nf4(&[1.0; 6], 2, 4).unwrap_err();
        assert!(err.to_string().contains("[2, 4]"), "{err}");
        let err = QuantizedMatrix::quantize_nf4(&[1.0, f32::NAN, 0.0, 0.0], 2, 2).unwrap_err();
        assert!(err.to_string().contains("row 0, column 1"), "{err}");
        let err = QuantizedMatrix::quantize_q8_0(&[0.5; 40], 2, 20).unwrap_err();
        assert!(err.to_string().contains("blocks of 32"), "{err}");
        let err = QuantizedMatrix::from_ggml(GgmlType::Q4_K, 2, 256, vec![0; 100]).unwrap_err();
        assert!(err.to_string().contains("288 bytes"), "{err}");
        let err = QuantFormat::parse_target("int3").unwrap_err();
        assert!(err.to_string().contains("nf4 or q8_0"), "{err}");
    }

    #[test]
    fn ggml_rows_permute_as_whole_blocks_and_bad_orders_are_refused() {
        let (rows, cols) = (4, 64);
        let values = sample(rows * cols, 11);
        let q = QuantizedMatrix::quantize_q8_0(&values, rows, cols).unwrap();
        let dense = q.dequantize();
        let permuted = q.clone().permute_rows(&[2, 0, 3, 1]).unwrap().dequantize();
        for (i, &row) in [2, 0, 3, 1].iter().enumerate() {
            assert_eq!(
                permuted[i * cols..(i + 1) * cols],
                dense[row * cols..(row + 1) * cols]
            );
        }
        let err = q.clone().permute_rows(&[0, 0, 1, 2]).unwrap_err();
        assert!(err.to_string().contains("not a permutation"), "{err}");
        let nf4 = QuantizedMatrix::quantize_nf4(&values, rows, cols).unwrap();
        assert!(nf4.permute_rows(&[0, 1, 2, 3]).is_err());
    }

    #[test]
    fn an_all_zero_block_stays_zero() {
        let mut values = vec![0f32; 128];
        values[100] = 0.25;
        let q = QuantizedMatrix::quantize_nf4(&values, 2, 64).unwrap();
        let back = q.dequantize();
        assert!(
            back[..64].iter().all(|&v| v.abs() < 1e-3),
            "{:?}",
            &back[..4]
        );
        let q = QuantizedMatrix::quantize_q8_0(&values, 2, 64).unwrap();
        assert!(q.dequantize()[..64].iter().all(|&v| v == 0.0));
    }
}

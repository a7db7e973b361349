//! A batch of token ids with its padding mask, the input of the model, the cache and generation.

use crate::error::{LlamaError, Result};

/// A batch of token ids on the host, row-major `[batch, seq]`, with an optional mask of real
/// tokens (`true`) versus padding (`false`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// `batch · seq` token ids.
    pub ids: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq: usize,
    /// `batch · seq` flags, `true` for real tokens; `None` means all real.
    pub mask: Option<Vec<bool>>,
}

impl TokenBatch {
    /// A batch from rows of equal length.
    ///
    /// # Errors
    /// Rows of different lengths, or no rows.
    pub fn from_rows(rows: &[Vec<u32>]) -> Result<Self> {
        let seq = rows
            .first()
            .map(Vec::len)
            .ok_or_else(|| LlamaError::Input("empty batch".into()))?;
        if rows.iter().any(|r| r.len() != seq) {
            return Err(LlamaError::Input(
                "rows of different lengths need padding and a mask".into(),
            ));
        }
        Ok(Self {
            ids: rows.concat(),
            batch: rows.len(),
            seq,
            mask: None,
        })
    }

    /// Pads rows of different lengths on the right with `pad_id` and masks the padding.
    ///
    /// # Errors
    /// No rows, or an empty row.
    pub fn right_padded(rows: &[Vec<u32>], pad_id: u32) -> Result<Self> {
        Self::padded(rows, pad_id, false)
    }

    /// Pads rows of different lengths on the left (for generation) and masks the padding.
    ///
    /// # Errors
    /// No rows, or an empty row.
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32) -> Result<Self> {
        Self::padded(rows, pad_id, true)
    }

    fn padded(rows: &[Vec<u32>], pad_id: u32, left: bool) -> Result<Self> {
        if rows.is_empty() || rows.iter().any(Vec::is_empty) {
            return Err(LlamaError::Input(
                "every row needs at least one token".into(),
            ));
        }
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for row in rows {
            let pad = seq - row.len();
            let (before, after) = if left { (pad, 0) } else { (0, pad) };
            ids.extend(std::iter::repeat_n(pad_id, before));
            mask.extend(std::iter::repeat_n(false, before));
            ids.extend_from_slice(row);
            mask.extend(std::iter::repeat_n(true, row.len()));
            ids.extend(std::iter::repeat_n(pad_id, after));
            mask.extend(std::iter::repeat_n(false, after));
        }
        Ok(Self {
            ids,
            batch: rows.len(),
            seq,
            mask: Some(mask),
        })
    }

    /// Whether token `column` of row `row` is real.
    pub fn is_real(&self, row: usize, column: usize) -> bool {
        self.mask
            .as_ref()
            .is_none_or(|m| m[row * self.seq + column])
    }
}

//! The key/value cache for incremental decoding.

use burn::tensor::{backend::Backend, Tensor};

use crate::tokens::TokenBatch;

/// One layer's cached rotated keys and values `[batch, kv_heads, tokens, head_dim]` (`None`
/// before the first token).
pub type LayerKv<B> = (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>);

/// Rotated keys and values of every layer for the tokens seen so far, with which of them are
/// real tokens (not padding) and where each row's next position is.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerKv<B>>,
    batch: usize,
    /// `batch` rows of flags, one per cached token.
    real: Vec<Vec<bool>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `num_layers` layers and `batch` sequences.
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![(None, None); num_layers],
            batch,
            real: vec![Vec::new(); batch],
        }
    }

    /// Number of cached tokens (padding included).
    pub fn len(&self) -> usize {
        self.real.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Whether cached token `index` of `row` is real.
    pub fn is_real(&self, row: usize, index: usize) -> bool {
        self.real[row][index]
    }

    /// The position the next real token of `row` takes (its count of real tokens so far).
    pub fn next_position(&self, row: usize) -> usize {
        self.real[row].iter().filter(|&&r| r).count()
    }

    /// The cached rotated keys and values of `layer`, each `[batch, kv_heads, tokens, head_dim]`
    /// (`None` before the first forward pass or for a layer out of range).
    pub fn layer(&self, layer: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        match self.layers.get(layer)? {
            (Some(keys), Some(values)) => Some((keys.clone(), values.clone())),
            _ => None,
        }
    }

    pub(crate) fn layer_mut(
        &mut self,
        layer: usize,
    ) -> &mut (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) {
        &mut self.layers[layer]
    }

    pub(crate) fn append(&mut self, tokens: &TokenBatch) {
        for (row, flags) in self.real.iter_mut().enumerate() {
            flags.extend((0..tokens.seq).map(|column| tokens.is_real(row, column)));
        }
    }
}

//! Frozen linear layers whose weight stays quantized in memory (NF4, Q8_0, GGUF blocks; see
//! [`peft_io::quant`]), and [`FrozenLinear`], the dense-or-quantized projection models hold.
//!
//! A [`QuantizedLinear`] multiplies tile by tile: a tile of rows of the weight (about
//! [`TILE_VALUES`] values) is dequantized into a dense tensor, multiplied, and dropped before
//! the next, so a product never holds more than one tile of dense weight besides its input and
//! output. The product is differentiable with respect to its input only (the weight is frozen):
//!
//! - on `Autodiff<X>` for a backend this crate names (NdArray, CUDA), it is one autodiff node
//!   that keeps the quantized weight (shared, not copied) and computes `dx = dy · W` tile by
//!   tile again in its backward pass: no dense weight and no weight-shaped gradient is ever
//!   kept;
//! - on any other backend it is the same chain of tensor operations, whose autodiff (if any)
//!   keeps each dense tile for its backward pass (the values are the same; the memory is that
//!   of a dense weight).
//!
//! On the CPU backend a product of one to four rows (decoding) makes no dense tile at all: each
//! core dequantizes a few rows of the weight at a time into its cache and takes their dot
//! products there (`cpu/gemv.rs`).
//!
//! The tiles are dequantized on the host (on every core) and uploaded; a device kernel that
//! reads the blocks where they are is the CUDA half of the work and not in this build.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Autodiff;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

pub use peft_io::quant::{QuantFormat, QuantizedMatrix};

use crate::blocks::on_known_autodiff;
use crate::dispatch::{cast, is};
use crate::graph::{prim, raw, record, tensor};
use crate::tensor::{cast_to, linear_rows, matmul};

/// Dense values per tile of a quantized product (4 MiB in f32): 256 rows of a 4096-wide weight.
pub const TILE_VALUES: usize = 1 << 20;

/// A quantized weight matrix `[out, in]` shared by every copy of the module holding it.
#[derive(Clone)]
pub struct QuantizedWeight(pub Arc<QuantizedMatrix>);

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl QuantizedWeight {
    /// The row ranges of the tiles a product goes through.
    fn tiles(&self) -> impl Iterator<Item = Range<usize>> {
        let (rows, cols) = (self.0.rows(), self.0.cols());
        let per_tile = (TILE_VALUES / cols).max(1);
        (0..rows.div_ceil(per_tile)).map(move |t| t * per_tile..((t + 1) * per_tile).min(rows))
    }

    /// Rows `range` as a dense `[range.len(), in]` tensor of `dtype` on `device`.
    fn tile<B: Backend>(
        &self,
        range: Range<usize>,
        device: &B::Device,
        dtype: DType,
    ) -> Tensor<B, 2> {
        let (rows, cols) = (range.len(), self.0.cols());
        // Dequantized on every core (a block of rows each): the host's share of every product.
        let mut values = vec![0.0f32; rows * cols];
        let start = range.start;
        peft_io::threads::fill_rows(&mut values, rows, 1 << 16, &|block, out| {
            self.0
                .dequantize_rows_into(start + block.start..start + block.end, out)
        });
        let data = TensorData::new(values, [rows, cols]);
        cast_to(Tensor::from_data(data, device), dtype)
    }

    /// `x · Wᵀ` for `x` `[n, in]`: `[n, out]`.
    fn product<B: Backend>(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // A few rows (decoding) on the CPU: no dense tile, rows dequantized into cache.
        #[cfg(feature = "ndarray")]
        if is::<B, burn::backend::NdArray<f32>>() {
            let cpu: Tensor<burn::backend::NdArray<f32>, 2> = cast(x.clone());
            if let Some(y) = crate::cpu::quantized(&cpu, &self.0) {
                return cast(y);
            }
        }
        let (device, dtype) = (x.device(), x.dtype());
        let parts: Vec<Tensor<B, 2>> = self
            .tiles()
            .map(|range| matmul(x.clone(), self.tile::<B>(range, &device, dtype).transpose()))
            .collect();
        if parts.len() == 1 {
            parts.into_iter().next().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(parts, 1)
        }
    }

    /// `dy · W` for `dy` `[n, out]`: `[n, in]`, summed over the tiles.
    fn input_gradient<B: Backend>(&self, dy: Tensor<B, 2>) -> Tensor<B, 2> {
        let (device, dtype) = (dy.device(), dy.dtype());
        self.tiles()
            .map(|range| {
                let dy_rows = dy.clone().slice([0..dy.dims()[0], range.clone()]);
                matmul(dy_rows, self.tile::<B>(range, &device, dtype))
            })
            .reduce(|sum, part| sum + part)
            .unwrap_or_else(|| unreachable!("a matrix has at least one row"))
    }
}

/// A frozen linear layer `y = x · Wᵀ + b` whose weight `W` `[out, in]` stays quantized.
#[derive(Module, Debug)]
pub struct QuantizedLinear<B: Backend> {
    /// The quantized weight `[out, in]` (host memory, shared between clones).
    #[module(skip)]
    pub weight: QuantizedWeight,
    /// The bias `[out]`, dense.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> QuantizedLinear<B> {
    /// A layer over `weight` `[out, in]` with an optional dense bias.
    pub fn new(weight: QuantizedMatrix, bias: Option<Param<Tensor<B, 1>>>) -> Self {
        Self {
            weight: QuantizedWeight(Arc::new(weight)),
            bias,
        }
    }

    /// The weight's format.
    pub fn format(&self) -> QuantFormat {
        self.weight.0.format()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.0.cols()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.0.rows()
    }

    /// `x` `[n, in]` → `[n, out]`.
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let output = quantized_product(x, &self.weight);
        match &self.bias {
            Some(bias) => output + bias.val().unsqueeze_dim(0),
            None => output,
        }
    }

    /// `x` `[batch, seq, in]` → `[batch, seq, out]`, as one product over `batch · seq` rows.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, width] = x.dims();
        let output = self.forward_2d(x.reshape([batch * seq, width]));
        let out = output.dims()[1];
        output.reshape([batch, seq, out])
    }
}

/// `x · Wᵀ` for `x` `[n, in]` and a quantized `W` `[out, in]`, differentiable with respect to
/// `x` (see the module documentation for what is kept on which backend).
pub fn quantized_product<B: Backend>(x: Tensor<B, 2>, weight: &QuantizedWeight) -> Tensor<B, 2> {
    on_known_autodiff!(
        B,
        X,
        cast(QuantizedProductNode::<X>::apply(cast(x), weight.clone()))
    );
    weight.product(x)
}

/// The quantized product node.
#[derive(Debug)]
struct QuantizedProductNode<X>(PhantomData<X>);

impl<X: Backend> QuantizedProductNode<X> {
    fn apply(x: Tensor<Autodiff<X>, 2>, weight: QuantizedWeight) -> Tensor<Autodiff<X>, 2> {
        let x = prim(x);
        let out = raw(weight.product(tensor::<X, 2>(x.primitive.clone())));
        let node = record(Self(PhantomData), [&x], || weight, out);
        Tensor::from_primitive(TensorPrimitive::Float(node))
    }
}

impl<X: Backend> Backward<X, 1> for QuantizedProductNode<X> {
    /// The quantized weight (shared).
    type State = QuantizedWeight;

    /// `dx = dy · W`, tile by tile.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<X>(&ops.node);
        let Some(node) = node else { return };
        let dx = ops.state.input_gradient(tensor::<X, 2>(dy));
        grads.register::<X>(node.id, raw(dx));
    }
}

/// A tensor's values as row-major f32 on the host.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_else(|e| unreachable!("float data converts to f32: {e:?}"))
}

/// A frozen projection as a model holds it: dense (Burn's [`Linear`], weight `[in, out]`) or
/// quantized.
#[derive(Module, Debug)]
pub enum FrozenLinear<B: Backend> {
    /// A dense weight.
    Dense(Linear<B>),
    /// A quantized weight.
    Quantized(QuantizedLinear<B>),
}

impl<B: Backend> From<Linear<B>> for FrozenLinear<B> {
    fn from(linear: Linear<B>) -> Self {
        Self::Dense(linear)
    }
}

impl<B: Backend> FrozenLinear<B> {
    /// `x` `[batch, seq, in]` → `[batch, seq, out]` (one 2-D product over all rows).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Dense(linear) => linear_rows(linear, x),
            Self::Quantized(linear) => linear.forward(x),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            Self::Dense(linear) => linear.weight.dims()[0],
            Self::Quantized(linear) => linear.in_features(),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            Self::Dense(linear) => linear.weight.dims()[1],
            Self::Quantized(linear) => linear.out_features(),
        }
    }

    /// The quantized format, `None` for a dense weight.
    pub fn quant_format(&self) -> Option<QuantFormat> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized(linear) => Some(linear.format()),
        }
    }

    /// The dense layer, if dense.
    pub fn dense(&self) -> Option<&Linear<B>> {
        match self {
            Self::Dense(linear) => Some(linear),
            Self::Quantized(_) => None,
        }
    }

    /// The dense layer, if dense (for merging an adapter into it).
    pub fn dense_mut(&mut self) -> Option<&mut Linear<B>> {
        match self {
            Self::Dense(linear) => Some(linear),
            Self::Quantized(_) => None,
        }
    }

    /// The weight `[out, in]` as row-major f32 host values (dequantized if quantized), and the
    /// bias: for saving and inspection, not for products.
    pub fn host_weight(&self) -> (Vec<f32>, Option<Vec<f32>>) {
        match self {
            Self::Dense(linear) => (
                host(linear.weight.val().transpose()),
                linear.bias.as_ref().map(|b| host(b.val())),
            ),
            Self::Quantized(linear) => (
                linear.weight.0.dequantize(),
                linear.bias.as_ref().map(|b| host(b.val())),
            ),
        }
    }

    /// The layer with a dense weight of `dtype` on `device` (the dequantized values for a
    /// quantized one; a dense layer as it is): for merging into, or comparing with the quantized
    /// layer.
    pub fn to_dense(&self, device: &B::Device, dtype: DType) -> Linear<B> {
        match self {
            Self::Dense(linear) => linear.clone(),
            Self::Quantized(linear) => {
                let rows = linear.out_features();
                let weight = linear.weight.tile::<B>(0..rows, device, dtype);
                Linear {
                    weight: Param::from_tensor(weight.transpose()).set_require_grad(false),
                    bias: linear.bias.clone(),
                }
            }
        }
    }

    /// Quantizes a dense layer to `format` (its bias stays dense); a quantized one is returned
    /// as it is when already in `format`.
    ///
    /// # Errors
    /// A weight the format cannot hold (see [`QuantizedMatrix::quantize`]), or a layer already
    /// quantized to another format.
    pub fn quantize(self, format: QuantFormat) -> Result<Self, peft_io::CheckpointError> {
        match self {
            Self::Quantized(linear) if linear.format() == format => Ok(Self::Quantized(linear)),
            Self::Quantized(linear) => Err(peft_io::CheckpointError::Quantization(format!(
                "the layer is already quantized to {}; re-quantizing it to {} would compound \
                 two roundings",
                linear.format().name(),
                format.name()
            ))),
            Self::Dense(linear) => {
                let [inp, out] = linear.weight.dims();
                let values = host(linear.weight.val().transpose());
                let matrix = QuantizedMatrix::quantize(format, &values, out, inp)?;
                Ok(Self::Quantized(QuantizedLinear::new(matrix, linear.bias)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::Distribution;

    type B = NdArray<f32>;
    type A = Autodiff<B>;

    fn dense_reference(matrix: &QuantizedMatrix) -> Tensor<A, 2> {
        let data = TensorData::new(matrix.dequantize(), [matrix.rows(), matrix.cols()]);
        Tensor::from_data(data, &Default::default())
    }

    fn close(got: Tensor<A, 2>, want: Tensor<A, 2>, what: &str) {
        let (got, want) = (
            got.into_data().to_vec::<f32>().unwrap(),
            want.into_data().to_vec::<f32>().unwrap(),
        );
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs() + 1e-6 * scale,
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Output and input gradient equal the dense computation on the dequantized weight, for each
    /// format and with a weight of several tiles.
    #[test]
    fn output_and_input_gradient_equal_the_dense_product_on_the_dequantized_weight() {
        let device = Default::default();
        // 2,600 rows of 512: two tiles (2,048 rows, then 552).
        for (format, rows) in [
            (QuantFormat::Nf4, 2600),
            (QuantFormat::Ggml(peft_io::gguf::GgmlType::Q8_0), 70),
        ] {
            let cols = 512;
            let values =
                Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, 0.02), &device)
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap();
            let matrix = QuantizedMatrix::quantize(format, &values, rows, cols).unwrap();
            let weight = QuantizedWeight(Arc::new(matrix.clone()));
            assert_eq!(weight.tiles().count(), if rows > 2048 { 2 } else { 1 });
            let x = Tensor::<A, 2>::random([5, cols], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let probe = Tensor::<A, 2>::random([5, rows], Distribution::Normal(0.0, 1.0), &device);
            let y = quantized_product(x.clone(), &weight);
            let grads = (y.clone() * probe.clone()).sum().backward();
            let dx = x.grad(&grads).unwrap();
            let x_dense = x.clone().detach().require_grad();
            let y_dense = x_dense.clone().matmul(dense_reference(&matrix).transpose());
            let grads_dense = (y_dense.clone() * probe).sum().backward();
            let dx_dense = x_dense.grad(&grads_dense).unwrap();
            close(y, y_dense, &format!("{} output", format.name()));
            close(
                Tensor::from_inner(dx),
                Tensor::from_inner(dx_dense),
                &format!("{} input gradient", format.name()),
            );
        }
    }

    /// The same values on a backend without autodiff (inference).
    #[test]
    fn the_product_without_autodiff_is_the_same() {
        let device = Default::default();
        let (rows, cols) = (64, 128);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0)
            .collect();
        let matrix = QuantizedMatrix::quantize_nf4(&values, rows, cols).unwrap();
        let linear = QuantizedLinear::<B>::new(matrix.clone(), None);
        let x = Tensor::<B, 3>::random([2, 3, cols], Distribution::Normal(0.0, 1.0), &device);
        let y = linear.forward(x.clone()).reshape([6, rows]);
        let want = Tensor::<A, 2>::from_inner(x.reshape([6, cols]))
            .matmul(dense_reference(&matrix).transpose());
        close(Tensor::from_inner(y), want, "inference output");
    }

    #[test]
    fn a_dense_layer_quantizes_and_keeps_its_bias() {
        let device = Default::default();
        let linear = burn::nn::LinearConfig::new(64, 32).init::<B>(&device);
        let bias = linear.bias.as_ref().unwrap().val().into_data();
        let frozen = FrozenLinear::from(linear)
            .quantize(QuantFormat::Nf4)
            .unwrap();
        assert_eq!(frozen.quant_format(), Some(QuantFormat::Nf4));
        assert_eq!((frozen.in_features(), frozen.out_features()), (64, 32));
        assert_eq!(
            frozen.host_weight().1.unwrap(),
            bias.to_vec::<f32>().unwrap()
        );
        let err = frozen
            .quantize(QuantFormat::Ggml(peft_io::gguf::GgmlType::Q8_0))
            .unwrap_err();
        assert!(
            err.to_string().contains("already quantized to nf4"),
            "{err}"
        );
    }
}

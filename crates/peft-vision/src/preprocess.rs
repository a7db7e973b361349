//! Image preprocessing as `transformers`' `CLIPImageProcessor`: convert to RGB, resize the
//! shortest side to `shortest_edge` (bicubic), centre-crop, rescale by 1/255 and normalise
//! with CLIP's mean and standard deviation.
//!
//! In `transformers` 5.x, `CLIPImageProcessor` is the torchvision backend (the PIL one is
//! `CLIPImageProcessorPil`). It resizes the `uint8` image with torchvision's antialiased
//! bicubic on CPU, which is torch's integer kernel: separable taps of Keys' cubic with
//! `a = -0.5`, widened by the scale when shrinking, normalised, quantised to `i16` with the
//! largest precision that keeps the biggest tap below 2¹⁵, applied horizontally then vertically,
//! each pass rounded and clamped to `u8`. That is what [`resize_bicubic`] computes, so the
//! resized bytes are identical, not merely close (checked against the processor by
//! `scripts/make_clip_fixtures.py`).

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::error::{Result, VisionError};

/// OpenAI CLIP's per-channel mean (`OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel standard deviation (`OPENAI_CLIP_STD`).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// An 8-bit RGB image, row-major `[height, width, 3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Decodes a PNG or JPEG file; grey and alpha images are converted to RGB (alpha dropped).
    ///
    /// # Errors
    /// An unreadable file, an unsupported format or a corrupt image.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| VisionError::io(path, e))?;
        let decoded = image::load_from_memory(&bytes).map_err(|e| VisionError::Image {
            path: path.into(),
            message: e.to_string(),
        })?;
        let rgb = decoded.to_rgb8();
        Ok(Self {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            pixels: rgb.into_raw(),
        })
    }
}

/// The settings of `CLIPImageProcessor`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    /// Target of the shortest side.
    pub shortest_edge: usize,
    /// Crop height.
    pub crop_height: usize,
    /// Crop width.
    pub crop_width: usize,
    /// Per-channel mean (applied after rescaling by 1/255).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation.
    pub image_std: [f32; 3],
}

impl ClipImageProcessor {
    /// CLIP's processing for a tower taking `image_size`² images (shortest side and crop both
    /// `image_size`, as the released CLIP processors are configured).
    pub fn new(image_size: usize) -> Self {
        Self {
            shortest_edge: image_size,
            crop_height: image_size,
            crop_width: image_size,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// Normalised pixel values of `image`, `[3, crop_height, crop_width]` row-major.
    ///
    /// # Errors
    /// An empty image, or zero sizes in the settings.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Vec<f32>> {
        if image.width == 0
            || image.height == 0
            || image.pixels.len() != image.width * image.height * 3
        {
            return Err(VisionError::Shape {
                what: "RGB image".into(),
                expected: vec![image.height, image.width, 3],
                found: vec![image.pixels.len()],
            });
        }
        if self.shortest_edge == 0 || self.crop_height == 0 || self.crop_width == 0 {
            return Err(VisionError::Config {
                origin: "image processor".into(),
                message: "shortest_edge and crop sizes must be positive".into(),
            });
        }
        let (out_h, out_w) = resized_size(image.height, image.width, self.shortest_edge);
        let resized = resize_bicubic(image, out_h, out_w);
        Ok(self.crop_and_normalise(&resized))
    }

    /// [`ClipImageProcessor::preprocess`] of an image file.
    ///
    /// # Errors
    /// See [`RgbImage::open`] and [`ClipImageProcessor::preprocess`].
    pub fn preprocess_file(&self, path: impl AsRef<Path>) -> Result<Vec<f32>> {
        self.preprocess(&RgbImage::open(path)?)
    }

    /// A batch of image files as pixel values `[batch, 3, crop_height, crop_width]`.
    ///
    /// # Errors
    /// See [`ClipImageProcessor::preprocess_file`].
    pub fn batch<B: Backend, P: AsRef<Path>>(
        &self,
        paths: &[P],
        device: &B::Device,
    ) -> Result<Tensor<B, 4>> {
        let mut values = Vec::with_capacity(paths.len() * 3 * self.crop_height * self.crop_width);
        for path in paths {
            values.extend(self.preprocess_file(path)?);
        }
        let shape = [paths.len(), 3, self.crop_height, self.crop_width];
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// Centre crop (zero-padded where the crop is larger than the image, as torchvision pads)
    /// and normalisation, `[3, crop_height, crop_width]`.
    fn crop_and_normalise(&self, image: &RgbImage) -> Vec<f32> {
        let (ch, cw) = (self.crop_height, self.crop_width);
        // torchvision pads by ((c - s) / 2) on the top/left and crops at int((s - c) / 2).
        let offset = |size: usize, crop: usize| -> isize {
            if crop > size {
                -(((crop - size) / 2) as isize)
            } else {
                ((size - crop) / 2) as isize
            }
        };
        let top = offset(image.height, ch);
        let left = offset(image.width, cw);
        let mut out = vec![0.0f32; 3 * ch * cw];
        for c in 0..3 {
            // (x / 255 − mean) / std, computed as torchvision's fused form (x − 255·mean) / (255·std).
            let mean = self.image_mean[c] * 255.0;
            let std = self.image_std[c] * 255.0;
            for y in 0..ch {
                for x in 0..cw {
                    let (sy, sx) = (y as isize + top, x as isize + left);
                    let inside = sy >= 0
                        && sx >= 0
                        && (sy as usize) < image.height
                        && (sx as usize) < image.width;
                    let value = if inside {
                        image.pixels[(sy as usize * image.width + sx as usize) * 3 + c]
                    } else {
                        0
                    };
                    out[(c * ch + y) * cw + x] = (f32::from(value) - mean) / std;
                }
            }
        }
        out
    }
}

/// The size after resizing the shortest side to `shortest`: `transformers`'
/// `get_resize_output_image_size` (the long side is `int(shortest · long / short)`).
pub fn resized_size(height: usize, width: usize, shortest: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (shortest as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (new_long, shortest)
    } else {
        (shortest, new_long)
    }
}

/// Keys' cubic convolution kernel with `a = -0.5` (the antialiased kernel of PIL and torch).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Integer taps for resampling one axis from `input` to `output` samples: for each output
/// sample its first input index and `i16`-range weights, plus the weights' precision in bits.
fn integer_taps(input: usize, output: usize) -> (Vec<(usize, Vec<i32>)>, u32) {
    let scale = input as f64 / output as f64;
    let (support, inverse) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let mut rows = Vec::with_capacity(output);
    let mut largest = 0.0f64;
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        // Truncation toward zero, then clamping, as the C++ casts do.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64)
            .min(input as i64)
            .max(lo as i64) as usize;
        let mut weights: Vec<f64> = (lo..hi)
            .map(|j| cubic((j as f64 - center + 0.5) * inverse))
            .collect();
        let total: f64 = weights.iter().sum();
        if total != 0.0 {
            for w in &mut weights {
                *w /= total;
                largest = largest.max(*w);
            }
        }
        rows.push((lo, weights));
    }
    let mut precision = 0u32;
    while precision < 22
        && ((0.5 + largest * f64::from(1u32 << (precision + 1))) as i64) < (1 << 15)
    {
        precision += 1;
    }
    let unit = f64::from(1u32 << precision);
    let taps = rows
        .into_iter()
        .map(|(lo, weights)| {
            let quantised = weights
                .iter()
                .map(|w| {
                    let v = w * unit;
                    if v < 0.0 {
                        (-0.5 + v) as i32
                    } else {
                        (0.5 + v) as i32
                    }
                })
                .collect();
            (lo, quantised)
        })
        .collect();
    (taps, precision)
}

/// Resamples axis 1 of `[rows, len, 3]` bytes to `output` samples.
fn resample_rows(src: &[u8], rows: usize, len: usize, output: usize) -> Vec<u8> {
    let (taps, precision) = integer_taps(len, output);
    let half = if precision == 0 {
        0
    } else {
        1i64 << (precision - 1)
    };
    let mut out = vec![0u8; rows * output * 3];
    for r in 0..rows {
        let row = &src[r * len * 3..(r + 1) * len * 3];
        for (i, (lo, weights)) in taps.iter().enumerate() {
            for c in 0..3 {
                let mut acc = half;
                for (k, &w) in weights.iter().enumerate() {
                    acc += i64::from(row[(lo + k) * 3 + c]) * i64::from(w);
                }
                out[(r * output + i) * 3 + c] = (acc >> precision).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// Bicubic resize of `image` to `height × width` exactly as `CLIPImageProcessor` (torchvision,
/// antialiased) does on CPU; see the module docs. An axis already at its size is left alone.
pub fn resize_bicubic(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    let mut pixels = image.pixels.clone();
    if width != image.width {
        pixels = resample_rows(&pixels, image.height, image.width, width);
    }
    if height != image.height {
        // Vertical pass on the transposed image, then back.
        let transposed = transpose_rgb(&pixels, image.height, width);
        let resampled = resample_rows(&transposed, width, image.height, height);
        pixels = transpose_rgb(&resampled, width, height);
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// `[rows, cols, 3]` → `[cols, rows, 3]`.
fn transpose_rgb(src: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[(c * rows + r) * 3..(c * rows + r) * 3 + 3]
                .copy_from_slice(&src[(r * cols + c) * 3..(r * cols + c) * 3 + 3]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_side_goes_to_the_target_and_the_long_side_truncates() {
        assert_eq!(resized_size(40, 48, 32), (32, 38));
        assert_eq!(resized_size(48, 40, 32), (38, 32));
        assert_eq!(resized_size(224, 224, 224), (224, 224));
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point_and_a_flat_image_stays_flat() {
        for (input, output) in [(48, 38), (40, 32), (7, 20), (300, 224)] {
            let (taps, precision) = integer_taps(input, output);
            for (_, weights) in &taps {
                let sum: i32 = weights.iter().sum();
                assert!(
                    (sum - (1 << precision)).abs() <= weights.len() as i32,
                    "{sum}"
                );
            }
        }
        let flat = RgbImage {
            width: 9,
            height: 5,
            pixels: vec![77; 9 * 5 * 3],
        };
        let resized = resize_bicubic(&flat, 3, 4);
        assert!(
            resized.pixels.iter().all(|&p| p == 77),
            "{:?}",
            resized.pixels
        );
    }

    #[test]
    fn a_crop_larger_than_the_image_is_zero_padded_before_normalising() {
        let processor = ClipImageProcessor {
            shortest_edge: 2,
            crop_height: 4,
            crop_width: 4,
            image_mean: [0.0; 3],
            image_std: [1.0; 3],
        };
        let image = RgbImage {
            width: 2,
            height: 2,
            pixels: vec![255; 12],
        };
        let values = processor.preprocess(&image).unwrap();
        // Rows 1..3 and columns 1..3 hold the image (padding 1 on each side).
        assert_eq!(values[0], 0.0);
        assert_eq!(values[4 + 1], 1.0);
        assert_eq!(values[2 * 4 + 2], 1.0);
        assert_eq!(values[3 * 4 + 3], 0.0);
    }
}

//! The CLIP vision tower and preprocessing against `transformers` 5.24 (fixtures from
//! `scripts/make_clip_fixtures.py`, see `fixtures/clip/README.md`).
//!
//! Tolerances: class-token features, pooled output and last hidden state within rtol 1e-4 /
//! atol 1e-5 of the float64 reference; pixel values within 1e-5 (absolute) of
//! `CLIPImageProcessor`'s.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use peft_vision::{ClipImageProcessor, ClipVisionLoader, ClipVisionModel, VisionError};
use safetensors::SafeTensors;

pub(crate) type B = NdArray<f32>;

pub(crate) fn clip_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/clip")
}

pub(crate) fn read_f32(file: &str, key: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(clip_fixtures().join(file)).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(key).unwrap();
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (values, view.shape().to_vec())
}

pub(crate) fn host<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Asserts `|got - want| <= atol + rtol·|want|` elementwise and returns the worst ratio of
/// error to allowance.
pub(crate) fn assert_close(got: &[f32], want: &[f32], rtol: f32, atol: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ratio = (g - w).abs() / (atol + rtol * w.abs());
        // A NaN ratio is the worst of all.
        if ratio.is_nan() || ratio > worst.0 {
            worst = (ratio, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= 1.0,
        "{what}: element {i} is {} but the reference is {} ({}x the tolerance)",
        got[i],
        want[i],
        worst.0
    );
    worst.0
}

pub(crate) fn model() -> ClipVisionModel<B> {
    ClipVisionLoader::new(clip_fixtures().join("model"))
        .load::<B>(&Default::default())
        .unwrap()
}

pub(crate) fn fixture_pixels() -> Tensor<B, 4> {
    let (values, shape) = read_f32("features.safetensors", "pixel_values");
    let shape: [usize; 4] = shape.try_into().unwrap();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

#[test]
fn every_layers_class_token_matches_transformers() {
    let model = model();
    let (expected, shape) = read_f32("features.safetensors", "class_tokens");
    let [states, batch, hidden] = [shape[0], shape[1], shape[2]];
    assert_eq!(states, model.config.num_hidden_layers + 1);
    for layer in 0..states {
        let got = host(
            model
                .class_token_features(fixture_pixels(), &[layer])
                .unwrap(),
        );
        let want = &expected[layer * batch * hidden..(layer + 1) * batch * hidden];
        assert_close(
            &got,
            want,
            1e-4,
            1e-5,
            &format!("class token of hidden state {layer}"),
        );
    }
    // The multi-scale feature is the chosen class tokens side by side, per example.
    let layers = [1, 3];
    let got = host(
        model
            .class_token_features(fixture_pixels(), &layers)
            .unwrap(),
    );
    assert_eq!(got.len(), batch * layers.len() * hidden);
    for b in 0..batch {
        for (slot, &layer) in layers.iter().enumerate() {
            let from = (layer * batch + b) * hidden;
            let at = (b * layers.len() + slot) * hidden;
            assert_close(
                &got[at..at + hidden],
                &expected[from..from + hidden],
                1e-4,
                1e-5,
                &format!("multi-scale feature, example {b}, layer {layer}"),
            );
        }
    }
}

#[test]
fn pooled_output_and_last_hidden_state_match_transformers() {
    let model = model();
    let (pooled, _) = read_f32("features.safetensors", "pooler_output");
    let (last, _) = read_f32("features.safetensors", "last_hidden_state");
    assert_close(
        &host(model.pooled_output(fixture_pixels()).unwrap()),
        &pooled,
        1e-4,
        1e-5,
        "pooler_output",
    );
    let states = model.hidden_states(fixture_pixels()).unwrap();
    assert_close(
        &host(states.last().unwrap().clone()),
        &last,
        1e-4,
        1e-5,
        "last_hidden_state",
    );
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let processor = ClipImageProcessor::new(32);
    let got = processor
        .preprocess_file(clip_fixtures().join("test_image.png"))
        .unwrap();
    let (want, shape) = read_f32("preprocess.safetensors", "pixel_values");
    assert_eq!(shape, vec![1, 3, 32, 32]);
    assert_close(&got, &want, 0.0, 1e-5, "pixel_values");
    // The features fixture's first example is the same image.
    let (batch, _) = read_f32("features.safetensors", "pixel_values");
    assert_close(
        &got,
        &batch[..got.len()],
        0.0,
        1e-5,
        "pixel_values in features",
    );
}

#[test]
fn missing_and_unexpected_tensors_are_reported_by_name() {
    let dir = std::env::temp_dir().join(format!("peft-vision-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        clip_fixtures().join("model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(clip_fixtures().join("model/model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let write = |skip: &str, extra: bool| {
        let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
            .tensors()
            .into_iter()
            .filter(|(name, _)| name != skip)
            .collect();
        if extra {
            let (_, view) = file
                .tensors()
                .into_iter()
                .find(|(n, _)| n == "post_layernorm.bias")
                .unwrap();
            views.push(("encoder.layers.9.extra".into(), view));
        }
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    };
    write("encoder.layers.1.mlp.fc1.bias", false);
    let error = ClipVisionLoader::new(&dir)
        .load::<B>(&Default::default())
        .unwrap_err();
    assert!(matches!(error, VisionError::Weights(_)));
    assert!(
        error.to_string().contains("encoder.layers.1.mlp.fc1.bias"),
        "{error}"
    );
    write("", true);
    let error = ClipVisionLoader::new(&dir)
        .load::<B>(&Default::default())
        .unwrap_err();
    assert!(
        error.to_string().contains("encoder.layers.9.extra"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pixels_of_the_wrong_size_are_an_error() {
    let model = model();
    let pixels = Tensor::<B, 4>::zeros([1, 3, 16, 32], &Default::default());
    let error = model.class_token_features(pixels, &[1]).unwrap_err();
    assert!(error.to_string().contains("[1, 3, 16, 32]"), "{error}");
    let error = model
        .class_token_features(fixture_pixels(), &[4])
        .unwrap_err();
    assert!(error.to_string().contains("layer 4"), "{error}");
}

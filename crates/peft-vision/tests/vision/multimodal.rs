//! Properties of the multimodal LLaMA-Adapter on the vendored stories260k LLaMA and the tiny
//! CLIP fixture: zero gates leave the base logits exactly unchanged, the image reaches the
//! output once the gates open, eq. 10 holds (the image shifts every prompt by the projected
//! feature), only prompts, gates and projection receive gradients, and files round-trip.

use peft_core::Randomise;
use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor, TensorData};
use peft_core::{Adapter, AdaptionPrompt, AdaptionPromptConfig};
use peft_llama::{Llama, LlamaLoader, NoHooks, TokenBatch};
use peft_vision::{
    load_multimodal, save_multimodal, ClipImageProcessor, ClipVisionLoader, ClipVisionModel,
    MultimodalAdaptionPrompt, MultimodalAdaptionPromptConfig,
};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn base<Bk: Backend>() -> Llama<Bk> {
    LlamaLoader::new(root().join("models/stories260k"))
        .load::<Bk>(&Default::default())
        .unwrap()
}

fn vision<Bk: Backend>() -> ClipVisionModel<Bk> {
    ClipVisionLoader::new(root().join("fixtures/clip/model"))
        .load::<Bk>(&Default::default())
        .unwrap()
}

fn tokens() -> TokenBatch {
    TokenBatch::right_padded(&[vec![1, 403, 407, 261, 378, 432], vec![1, 261, 376]], 0).unwrap()
}

/// Two different images: the committed test image and a seeded random one.
fn pixels<Bk: Backend>() -> Tensor<Bk, 4> {
    let device = Default::default();
    let image = ClipImageProcessor::new(32)
        .batch::<Bk, _>(&[root().join("fixtures/clip/test_image.png")], &device)
        .unwrap();
    let noise = Tensor::<Bk, 4>::random([1, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    Tensor::cat(vec![image, noise], 0)
}

fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn config(layers: Vec<usize>) -> MultimodalAdaptionPromptConfig {
    MultimodalAdaptionPromptConfig::new(
        AdaptionPromptConfig::new()
            .with_adapter_len(4)
            .with_adapter_layers(3),
        layers,
        32,
    )
}

#[test]
fn zero_gate_multimodal_model_gives_the_base_logits_exactly() {
    let base = base::<B>();
    let vision = vision::<B>();
    let adapter = config(vec![1, 2, 3])
        .init::<B>(&base, &Default::default())
        .unwrap();
    let features = adapter.visual_features(&vision, pixels()).unwrap();
    assert_eq!(features.dims(), [2, 96]);
    let hooks = adapter.hooks_with_image(&base, features, 2).unwrap();
    let adapted = host(base.forward(&tokens(), hooks.as_ref(), None).unwrap());
    let plain = host(base.forward(&tokens(), &NoHooks, None).unwrap());
    assert_eq!(
        adapted, plain,
        "zero gates must leave every logit bit-identical"
    );
}

#[test]
fn with_open_gates_each_image_changes_its_own_rows_logits() {
    let base = base::<B>();
    let vision = vision::<B>();
    let adapter = config(vec![2, 3])
        .init::<B>(&base, &Default::default())
        .unwrap()
        .map(&mut Randomise(0.5));
    let features = adapter.visual_features(&vision, pixels()).unwrap();
    let swapped = Tensor::cat(
        vec![
            features.clone().narrow(0, 1, 1),
            features.clone().narrow(0, 0, 1),
        ],
        0,
    );
    let run = |f: Tensor<B, 2>| {
        let hooks = adapter.hooks_with_image(&base, f, 2).unwrap();
        host(base.forward(&tokens(), hooks.as_ref(), None).unwrap())
    };
    let text_only = host(
        base.forward(&tokens(), adapter.hooks(&base).as_ref(), None)
            .unwrap(),
    );
    let (original, exchanged) = (run(features), run(swapped));
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(
        max_diff(&original, &text_only) > 1e-3,
        "the image has no effect"
    );
    assert!(
        max_diff(&original, &exchanged) > 1e-3,
        "exchanging the images has no effect"
    );
}

#[test]
fn the_image_shifts_every_prompt_by_its_projected_feature() {
    // Eq. 10 checked independently: with the same image for every row, the multimodal
    // adapter must equal a text-only adapter whose prompts are P_l + Projection(I).
    let base = base::<B>();
    let vision = vision::<B>();
    let adapter = config(vec![1, 3])
        .init::<B>(&base, &Default::default())
        .unwrap()
        .map(&mut Randomise(0.5));
    let one = adapter
        .visual_features(&vision, pixels())
        .unwrap()
        .narrow(0, 0, 1);
    let both = Tensor::cat(vec![one.clone(), one.clone()], 0);
    let hooks = adapter.hooks_with_image(&base, both, 2).unwrap();
    let multimodal = host(base.forward(&tokens(), hooks.as_ref(), None).unwrap());
    drop(hooks);
    let offset = adapter.projection.forward(one); // [1, D]
    let shifted_prompts = adapter.adaption_prompt.prompts.val() + offset.unsqueeze_dim::<3>(0);
    let shifted = AdaptionPrompt::from_tensors(
        adapter.adaption_prompt.config.clone(),
        &base,
        shifted_prompts,
        adapter.adaption_prompt.gates.val(),
    );
    let reference = host(
        base.forward(&tokens(), shifted.hooks(&base).as_ref(), None)
            .unwrap(),
    );
    for (i, (m, r)) in multimodal.iter().zip(&reference).enumerate() {
        assert!(
            (m - r).abs() <= 1e-5 + 1e-5 * r.abs(),
            "logit {i}: {m} vs {r}"
        );
    }
}

struct GradientCount<'a> {
    grads: &'a <AD as AutodiffBackend>::Gradients,
    with: Vec<String>,
    without: usize,
}
impl ModuleVisitor<AD> for GradientCount<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        match param.val().grad(self.grads) {
            Some(grad) => {
                let magnitude: f32 = grad.abs().sum().into_scalar();
                self.with
                    .push(format!("{:?} |g|={magnitude}", param.dims()))
            }
            None => self.without += 1,
        }
    }
}

#[test]
fn only_prompts_gates_and_projection_receive_gradients() {
    let base = base::<AD>();
    let vision = vision::<AD>();
    let adapter = config(vec![1, 2, 3])
        .init::<AD>(&base, &Default::default())
        .unwrap()
        .map(&mut Randomise(0.5));
    let features = adapter.visual_features(&vision, pixels()).unwrap();
    let hooks = adapter.hooks_with_image(&base, features, 2).unwrap();
    let logits = base.forward(&tokens(), hooks.as_ref(), None).unwrap();
    drop(hooks);
    let grads = logits.powi_scalar(2).mean().backward();
    let count = |visit: &dyn Fn(&mut GradientCount)| {
        let mut c = GradientCount {
            grads: &grads,
            with: vec![],
            without: 0,
        };
        visit(&mut c);
        c
    };
    let on_base = count(&|c| base.visit(c));
    let on_vision = count(&|c| vision.visit(c));
    let on_adapter = count(&|c| adapter.visit(c));
    assert!(
        on_base.with.is_empty(),
        "base got gradients: {:?}",
        on_base.with
    );
    assert!(
        on_vision.with.is_empty(),
        "vision tower got gradients: {:?}",
        on_vision.with
    );
    assert_eq!(
        on_adapter.without, 0,
        "an adapter parameter got no gradient"
    );
    // prompts, gates, projection.first.{weight,bias}, projection.second.{weight,bias}
    assert_eq!(on_adapter.with.len(), 6, "{:?}", on_adapter.with);
    assert!(
        on_adapter.with.iter().all(|g| !g.ends_with("|g|=0")),
        "{:?}",
        on_adapter.with
    );
}

#[test]
fn save_then_load_round_trips_exactly_with_the_projection() {
    let base = base::<B>();
    let device = Default::default();
    let adapter: MultimodalAdaptionPrompt<B> = config(vec![0, 3])
        .init::<B>(&base, &device)
        .unwrap()
        .map(&mut Randomise(0.3));
    let dir = std::env::temp_dir().join(format!("peft-vision-roundtrip-{}", std::process::id()));
    save_multimodal(&adapter, &base, &dir).unwrap();
    assert!(peft_vision::is_multimodal_adapter(&dir));
    let loaded = load_multimodal::<B>(&dir, &base, &device).unwrap();
    assert_eq!(loaded.config, adapter.config);
    let names = |a: &MultimodalAdaptionPrompt<B>| a.named_tensors();
    let (before, after) = (names(&adapter), names(&loaded));
    assert!(before
        .iter()
        .any(|t| t.key == "visual_projection.first.weight"));
    assert_eq!(before, after);
    // A text-only loader refuses it by name rather than dropping the projection.
    let error = peft_core::load_adapter::<B>(
        &dir,
        &base,
        &peft_core::LoadOptions::default().with_adapter_len(10),
        &device,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(error.contains("MULTIMODAL_ADAPTION_PROMPT"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn features_of_the_wrong_batch_are_an_error() {
    let base = base::<B>();
    let adapter = config(vec![1])
        .init::<B>(&base, &Default::default())
        .unwrap();
    let features = Tensor::<B, 2>::from_data(
        TensorData::new(vec![0.0f32; 32], [1, 32]),
        &Default::default(),
    );
    let error = adapter.hooks_with_image(&base, features, 2).err().unwrap();
    assert!(error.to_string().contains("[2, 32]"), "{error}");
}

#[test]
fn corrupt_multimodal_manifests_are_errors_naming_the_problem() {
    let base = base::<B>();
    let device = Default::default();
    let adapter: MultimodalAdaptionPrompt<B> = config(vec![1]).init::<B>(&base, &device).unwrap();
    let dir = std::env::temp_dir().join(format!("peft-vision-corrupt-{}", std::process::id()));
    save_multimodal(&adapter, &base, &dir).unwrap();
    let manifest_path = dir.join(peft_core::native_format::CONFIG_FILE);
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let load_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut manifest = original.clone();
        edit(&mut manifest);
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        load_multimodal::<B>(&dir, &base, &device)
            .expect_err("refused")
            .to_string()
    };
    // A visual width whose projection cannot be addressed: an error before any allocation.
    let error =
        load_with(&|m| m["config"]["visual_hidden_size"] = serde_json::json!(usize::MAX / 2));
    assert!(
        error.contains("more values than this machine can address"),
        "{error}"
    );
    // A plausible but wrong width: the tensor file's header disagrees.
    let error = load_with(&|m| m["config"]["visual_hidden_size"] = serde_json::json!(64));
    assert!(
        error.contains("holds") && error.contains("values"),
        "{error}"
    );
    // Another adapter kind and another model are named as such.
    let error = load_with(&|m| m["peft_type"] = serde_json::json!("LORA"));
    assert!(error.contains("not a multimodal adapter"), "{error}");
    let error = load_with(&|m| m["model"]["hidden_size"] = serde_json::json!(4096));
    assert!(error.contains("adapter made for a model with"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

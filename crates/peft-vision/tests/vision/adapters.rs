//! LoRA, prefix tuning and adaption prompts on the CLIP vision tower, through the same
//! `peft-core` code as on LLaMA (fixtures from `scripts/make_clip_adapter_fixtures.py`, see
//! `fixtures/clip-adapters/README.md`).
//!
//! Tolerances: `last_hidden_state` and `pooler_output` within rtol 1e-4 / atol 1e-5 of the
//! float64 reference (PEFT's own float32 LoRA meets the same bound, the script checks).

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::Tensor;
use peft_core::{
    gradients_as_module, host_values, load_adapter, save_adapter, Adapter, AdapterFormat,
    AdaptionPromptConfig, AnyAdapter, LoadOptions, LoraConfig, NoHooks, PeftModel,
    PrefixTuningConfig, Randomise, TargetModules,
};
use peft_vision::{ClipVisionLoader, ClipVisionModel, PeftClip};
use safetensors::SafeTensors;

use super::parity::{assert_close, clip_fixtures, fixture_pixels, host, model, B};

const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

fn adapter_fixtures() -> PathBuf {
    clip_fixtures().join("../clip-adapters")
}

fn reference(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(adapter_fixtures().join("outputs.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn load(case: &str, base: &ClipVisionModel<B>) -> AnyAdapter<B> {
    load_adapter::<B>(
        &adapter_fixtures().join(case),
        base,
        &LoadOptions::default(),
        &Default::default(),
    )
    .unwrap()
}

/// Runs the tower with `adapter` and checks both outputs against the fixture's `case`.
fn assert_matches_reference(base: ClipVisionModel<B>, adapter: AnyAdapter<B>, case: &str) {
    let adapted = PeftModel::with_adapter(base, adapter).unwrap();
    let output = adapted.forward(fixture_pixels()).unwrap();
    assert_close(
        &host(output.last_hidden_state),
        &reference(&format!("{case}.last_hidden_state")),
        RTOL,
        ATOL,
        &format!("{case}: last_hidden_state"),
    );
    assert_close(
        &host(output.pooler_output),
        &reference(&format!("{case}.pooler_output")),
        RTOL,
        ATOL,
        &format!("{case}: pooler_output"),
    );
}

use peft_io::scratch::ScratchDir as TempDir;

fn safetensors_of(dir: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<_> = tensors
        .tensors()
        .into_iter()
        .map(|(key, view)| (key, view.shape().to_vec(), view.data().to_vec()))
        .collect();
    all.sort();
    all
}

#[test]
fn the_base_tower_matches_the_functional_reference_the_adapters_are_checked_with() {
    let output = model().forward(fixture_pixels(), &NoHooks).unwrap();
    assert_close(
        &host(output.last_hidden_state),
        &reference("base.last_hidden_state"),
        RTOL,
        ATOL,
        "base: last_hidden_state",
    );
}

#[test]
fn a_lora_peft_saved_on_clip_vision_model_gives_peft_outputs() {
    let base = model();
    let adapter = load("lora", &base);
    // q, k, v, out projections and fc1 of 3 layers.
    assert!(matches!(&adapter, AnyAdapter::Lora(lora) if lora.modules.len() == 15));
    assert_matches_reference(base, adapter, "lora");
}

#[test]
fn a_merged_lora_gives_the_unmerged_outputs_and_unmerges_to_the_base() {
    let base = model();
    let adapter = load("lora", &base);
    let mut adapted = PeftModel::with_adapter(base, adapter).unwrap();
    adapted.merge_active().unwrap();
    let merged = adapted.base().forward(fixture_pixels(), &NoHooks).unwrap();
    assert_close(
        &host(merged.last_hidden_state),
        &reference("lora.last_hidden_state"),
        RTOL,
        ATOL,
        "merged LoRA",
    );
    adapted.unmerge().unwrap();
    let base = adapted.base().forward(fixture_pixels(), &NoHooks).unwrap();
    assert_close(
        &host(base.last_hidden_state),
        &reference("base.last_hidden_state"),
        RTOL,
        ATOL,
        "after unmerge",
    );
}

#[test]
fn a_lora_saved_here_is_the_directory_peft_wrote() {
    let base = model();
    let adapter = load("lora", &base);
    let out = TempDir::new("lora-resave");
    let format = save_adapter(&adapter, &base, out.path(), None).unwrap();
    assert_eq!(format, AdapterFormat::Peft);
    // The same keys, shapes, dtype and bytes as PEFT's own file: PEFT loads it as its own.
    assert_eq!(
        safetensors_of(out.path()),
        safetensors_of(&adapter_fixtures().join("lora"))
    );
    let read = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (ours, theirs) = (read(out.path()), read(&adapter_fixtures().join("lora")));
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "fan_in_fan_out",
        "bias",
    ] {
        // Numbers compare as numbers (`8.0` and `8` are the same alpha to PEFT).
        match (ours[key].as_f64(), theirs[key].as_f64()) {
            (Some(a), Some(b)) => assert_eq!(a, b, "adapter_config.json `{key}`"),
            _ => assert_eq!(ours[key], theirs[key], "adapter_config.json `{key}`"),
        }
    }
    let mut targets: Vec<String> = serde_json::from_value(ours["target_modules"].clone()).unwrap();
    targets.sort();
    assert_eq!(targets, ["fc1", "k_proj", "out_proj", "q_proj", "v_proj"]);
    // The tower knows where it came from.
    let source = ours["base_model_name_or_path"].as_str().unwrap();
    assert!(source.ends_with("fixtures/clip/model"), "{source}");
}

#[test]
fn a_prefix_peft_saved_for_clip_gives_the_reference_outputs() {
    let base = model();
    let adapter = load("prefix", &base);
    assert!(matches!(adapter, AnyAdapter::PrefixTuning(_)));
    assert_matches_reference(base, adapter, "prefix");
}

#[test]
fn adaption_prompts_on_the_top_clip_layers_give_the_reference_outputs() {
    let base = model();
    let adapter = load("adaption_prompt", &base);
    assert!(matches!(adapter, AnyAdapter::AdaptionPrompt(_)));
    assert_matches_reference(base, adapter, "adaption_prompt");
}

type AD = Autodiff<NdArray<f32>>;

/// Every method attaches to the tower, starts where its initialisation says, and trains: each
/// trainable tensor gets a gradient, the tower none.
#[test]
fn every_method_attaches_to_clip_and_receives_gradients() {
    let device = Default::default();
    let base = ClipVisionLoader::new(clip_fixtures().join("model"))
        .load::<AD>(&device)
        .unwrap();
    let pixels = Tensor::<AD, 4>::from_inner(fixture_pixels());
    let base_output = host_values(
        base.forward(pixels.clone(), &NoHooks)
            .unwrap()
            .last_hidden_state,
    );
    let adapters: Vec<(&str, AnyAdapter<AD>)> = vec![
        (
            "lora all-linear",
            LoraConfig::new()
                .with_r(2)
                .with_target_modules(TargetModules::AllLinear)
                .init(&base, &device)
                .unwrap()
                .into(),
        ),
        (
            "prefix",
            PrefixTuningConfig::new()
                .with_num_virtual_tokens(2)
                .init(&base, &device)
                .unwrap()
                .into(),
        ),
        (
            "adaption prompt",
            AdaptionPromptConfig::new()
                .with_adapter_len(3)
                .with_adapter_layers(2)
                .init(&base, &device)
                .unwrap()
                .into(),
        ),
    ];
    for (name, adapter) in adapters {
        let starts_at_base = !matches!(adapter, AnyAdapter::PrefixTuning(_));
        let untrained = host_values(
            base.forward(pixels.clone(), adapter.hooks(&base).as_ref())
                .unwrap()
                .last_hidden_state,
        );
        if starts_at_base {
            assert_eq!(
                untrained, base_output,
                "{name}: untrained adapter changes the tower"
            );
        } else {
            assert_ne!(
                untrained, base_output,
                "{name}: prefixes change the attention"
            );
        }
        // Non-zero everywhere, so that every tensor's gradient is non-zero too.
        let adapter = adapter.map(&mut Randomise(0.3));
        let output = base
            .forward(pixels.clone(), adapter.hooks(&base).as_ref())
            .unwrap();
        let loss = output.pooler_output.powi_scalar(2).mean();
        let grads = loss.backward();
        let gradients = gradients_as_module(&adapter, &grads).named_tensors();
        assert!(!gradients.is_empty(), "{name}: no trainable tensors");
        for tensor in gradients {
            assert!(
                tensor.values.iter().any(|v| *v != 0.0)
                    && tensor.values.iter().all(|v| v.is_finite()),
                "{name}: `{}` got no gradient",
                tensor.key
            );
        }
        let frozen = gradients_as_module(&base, &grads);
        assert!(
            host_values(frozen.layers[0].self_attn.q_proj.weight.val())
                .iter()
                .all(|v| *v == 0.0),
            "{name}: the frozen tower got a gradient"
        );
    }
}

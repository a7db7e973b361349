//! Adapter files: every method round-trips exactly through every format that can hold it, and
//! every malformed or mismatched file is refused with a message naming the file and what is wrong.
//!
//! Round trips use the real stories260k model (GQA, 5 layers) and random non-zero parameters;
//! the error cases start from the PEFT-written fixtures of `fixtures/tiny-mha` (whose loading is
//! covered by `tests/parity.rs`) and break one thing each. CPU (NdArray, f32), a few seconds.

use crate::common;

use peft_core::Adapter;
use peft_core::LoadOptions;
use peft_core::Randomise;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use common::{fixtures, inputs, stories260k};
use peft_core::official_format::{load_official, save_official};
use peft_core::peft_format::safetensors_bytes;
use peft_core::{
    load_adapter, save_adapter, AdapterFormat, AdaptionPrompt, AdaptionPromptConfig, AnyAdapter,
    GateActivation, GateShape, LoraConfig, NamedTensor, PrefixTuningConfig,
};
use peft_io::torch_pickle::state_dict_bytes;
use peft_llama::weights::TensorMap;
use peft_llama::{Llama, LlamaConfig, LlamaLoader, TokenBatch};
use safetensors::SafeTensors;

type B = NdArray<f32>;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

use peft_io::scratch::ScratchDir as TempDir;

fn stories() -> Llama<B> {
    LlamaLoader::new(stories260k())
        .load::<B>(&Default::default())
        .unwrap()
}

fn tiny(model: &str) -> Llama<B> {
    LlamaLoader::new(fixtures().join(model).join("model"))
        .load::<B>(&Default::default())
        .unwrap()
}

/// Random weights of a fixture model's shape (loading and saving adapters need only its sizes).
fn tiny_config(model: &str) -> Llama<B> {
    LlamaConfig::from_hf_file(fixtures().join(model).join("model/config.json"))
        .unwrap()
        .init::<B>(&Default::default(), burn::tensor::DType::F32)
}

/// A right-padded batch: the tiny fixtures' inputs, or two stories260k prompts.
fn tokens(model: &Llama<B>) -> TokenBatch {
    if model.config.vocab_size == 128 {
        inputs("tiny-mha")
    } else {
        TokenBatch::right_padded(&[vec![1, 403, 407, 261, 378, 432], vec![1, 261, 376]], 0).unwrap()
    }
}

/// Every parameter of a module, in visiting order, as (shape, values).
#[derive(Default)]
struct Parameters(Vec<(Vec<usize>, Vec<f32>)>);

impl ModuleVisitor<B> for Parameters {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        self.0.push((tensor.dims().to_vec(), host(tensor)));
    }
}

/// Asserts that two adapters have the same module parameters (all of them, in the same order,
/// bit for bit): what a format stores beyond PEFT's tensors, e.g. the prefix MLP.
fn assert_same_parameters(a: &AnyAdapter<B>, b: &AnyAdapter<B>, what: &str) {
    let (a, b) = (parameters(a), parameters(b));
    assert_eq!(a.len(), b.len(), "{what}: number of parameters");
    for (index, ((shape_a, a), (shape_b, b))) in a.iter().zip(&b).enumerate() {
        assert_eq!(shape_a, shape_b, "{what}: shape of parameter {index}");
        assert_same_bits(a, b, &format!("{what}: parameter {index}"));
    }
}

fn parameters(adapter: &AnyAdapter<B>) -> Vec<(Vec<usize>, Vec<f32>)> {
    let mut visitor = Parameters::default();
    match adapter {
        AnyAdapter::Lora(a) => a.visit(&mut visitor),
        AnyAdapter::PrefixTuning(a) => a.visit(&mut visitor),
        AnyAdapter::AdaptionPrompt(a) => a.visit(&mut visitor),
    }
    visitor.0
}

fn host<const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap()
}

fn logits(base: &Llama<B>, adapter: &AnyAdapter<B>) -> Vec<f32> {
    host(
        base.forward(&tokens(base), adapter.hooks(base).as_ref(), None)
            .unwrap(),
    )
}

fn same_named_tensors(a: &[NamedTensor], b: &[NamedTensor], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: number of tensors");
    for (a, b) in a.iter().zip(b) {
        assert_eq!((&a.key, &a.shape), (&b.key, &b.shape), "{what}");
        assert_same_bits(
            &a.values,
            &b.values,
            &format!("{what}: values of {}", a.key),
        );
    }
}

fn assert_same_bits(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!(
            "{what}: element {i} is {} in one and {} in the other",
            a[i], b[i]
        );
    }
}

/// Saves `adapter` in `format`, loads it back with the format detected, and checks that the
/// loaded adapter is the same: method, parameters and logits, bit for bit.
fn assert_roundtrip(
    base: &Llama<B>,
    adapter: &AnyAdapter<B>,
    format: AdapterFormat,
    what: &str,
) -> AnyAdapter<B> {
    let dir = TempDir::new("roundtrip");
    assert_eq!(
        save_adapter(adapter, base, dir.path(), Some(format)).unwrap(),
        format,
        "{what}"
    );
    let loaded = load_adapter::<B>(
        dir.path(),
        base,
        &LoadOptions::default().with_adapter_len(adapter_len(adapter)),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(loaded.method(), adapter.method(), "{what}");
    same_named_tensors(&adapter.named_tensors(), &loaded.named_tensors(), what);
    assert_same_parameters(adapter, &loaded, what);
    assert_same_bits(
        &logits(base, adapter),
        &logits(base, &loaded),
        &format!("{what}: logits"),
    );
    loaded
}

fn adapter_len(adapter: &AnyAdapter<B>) -> usize {
    match adapter {
        AnyAdapter::AdaptionPrompt(a) => a.config.adapter_len,
        _ => 10,
    }
}

fn per_head_tanh(model: &Llama<B>) -> AdaptionPrompt<B> {
    AdaptionPromptConfig::new()
        .with_adapter_len(4)
        .with_adapter_layers(3)
        .with_gate_shape(GateShape::PerHead)
        .with_gate_activation(GateActivation::Tanh)
        .init::<B>(model, &Default::default())
        .unwrap()
        .map(&mut Randomise(0.8))
}

/// Copies a fixture adapter directory (files only) into a fresh temporary directory.
fn copy_fixture(model: &str, case: &str) -> TempDir {
    let dir = TempDir::new(case);
    for entry in std::fs::read_dir(fixtures().join(model).join("adapters").join(case)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// The tensors of a safetensors file, as f32.
fn read_tensors(path: &Path) -> Vec<NamedTensor> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<NamedTensor> = file
        .tensors()
        .into_iter()
        .map(|(key, view)| NamedTensor {
            key,
            shape: view.shape().to_vec(),
            values: view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

fn write_tensors(path: &Path, tensors: &[NamedTensor]) {
    std::fs::write(path, safetensors_bytes(tensors, path).unwrap()).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

/// The error message of a load that must fail.
fn load_error(dir: &Path, model: &Llama<B>) -> String {
    match load_adapter::<B>(
        dir,
        model,
        &LoadOptions::default().with_adapter_len(4),
        &Default::default(),
    ) {
        Ok(adapter) => panic!(
            "{} loaded as {} but must be refused",
            dir.display(),
            adapter.method()
        ),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "the message should mention `{part}`: {message}"
        );
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files_in(dir)
        .into_iter()
        .map(|name| (name.clone(), std::fs::read(dir.join(&name)).unwrap()))
        .collect()
}

const LORA_B: &str = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn lora_roundtrips_exactly_in_peft_and_native_formats() {
    let base = stories();
    let device = Default::default();
    let q_v = LoraConfig::new()
        .with_r(4)
        .with_lora_alpha(8.0)
        .init::<B>(&base, &device)
        .unwrap();
    let all = LoraConfig::new()
        .with_r(2)
        .with_lora_alpha(4.0)
        .with_use_rslora(true)
        .with_target_modules(peft_core::TargetModules::AllLinear)
        .with_layers_to_transform(Some(vec![1, 3]))
        .init::<B>(&base, &device)
        .unwrap();
    for (name, lora) in [("q_v", q_v), ("all-linear rsLoRA", all)] {
        let adapter = AnyAdapter::Lora(lora.map(&mut Randomise(0.2)));
        for format in [AdapterFormat::Peft, AdapterFormat::Native] {
            let loaded =
                assert_roundtrip(&base, &adapter, format, &format!("LoRA {name} {format:?}"));
            let (AnyAdapter::Lora(a), AnyAdapter::Lora(b)) = (&adapter, &loaded) else {
                unreachable!()
            };
            assert_eq!(a.config, b.config, "LoRA {name} {format:?}");
        }
    }
}

#[test]
fn prefix_tuning_roundtrips_exactly_in_peft_and_native_formats() {
    let base = stories();
    let prefix = PrefixTuningConfig::new()
        .with_num_virtual_tokens(3)
        .init::<B>(&base, &Default::default())
        .unwrap();
    let adapter = AnyAdapter::PrefixTuning(prefix.map(&mut Randomise(1.0)));
    for format in [AdapterFormat::Peft, AdapterFormat::Native] {
        assert_roundtrip(&base, &adapter, format, &format!("prefix {format:?}"));
    }
}

#[test]
fn projected_prefix_keeps_its_mlp_natively_and_saves_its_output_as_peft() {
    let base = stories();
    let prefix = PrefixTuningConfig::new()
        .with_num_virtual_tokens(3)
        .with_prefix_projection(true)
        .with_encoder_hidden_size(16)
        .init::<B>(&base, &Default::default())
        .unwrap();
    let adapter = AnyAdapter::PrefixTuning(prefix.map(&mut Randomise(0.5)));

    // Without a format, the one that keeps the training state is chosen.
    let dir = TempDir::new("projected-default");
    assert_eq!(
        save_adapter(&adapter, &base, dir.path(), None).unwrap(),
        AdapterFormat::Native
    );

    let native = assert_roundtrip(
        &base,
        &adapter,
        AdapterFormat::Native,
        "projected prefix, native",
    );
    let AnyAdapter::PrefixTuning(native) = native else {
        unreachable!()
    };
    assert!(
        native.projection.is_some(),
        "the native format keeps the reparameterisation MLP"
    );
    assert!(native.config.prefix_projection);

    // PEFT stores the MLP's output (as PEFT itself does): same prefixes, same logits, no MLP.
    let dir = TempDir::new("projected-peft");
    save_adapter(&adapter, &base, dir.path(), Some(AdapterFormat::Peft)).unwrap();
    let peft = load_adapter::<B>(
        dir.path(),
        &base,
        &peft_core::LoadOptions::default().with_adapter_len(10),
        &Default::default(),
    )
    .unwrap();
    let AnyAdapter::PrefixTuning(prefix) = &peft else {
        panic!("loaded as {}", peft.method())
    };
    assert!(prefix.projection.is_none());
    same_named_tensors(
        &adapter.named_tensors(),
        &peft.named_tensors(),
        "projected prefix, PEFT",
    );
    assert_same_bits(
        &logits(&base, &adapter),
        &logits(&base, &peft),
        "projected prefix, PEFT: logits",
    );
}

#[test]
fn peft_adaption_prompt_roundtrips_exactly_in_peft_and_native_formats() {
    let base = stories();
    let prompt = AdaptionPromptConfig::peft_compatible(4, 3)
        .init::<B>(&base, &Default::default())
        .unwrap();
    let adapter = AnyAdapter::AdaptionPrompt(prompt.map(&mut Randomise(0.8)));
    for format in [AdapterFormat::Peft, AdapterFormat::Native] {
        let loaded = assert_roundtrip(
            &base,
            &adapter,
            format,
            &format!("adaption prompt {format:?}"),
        );
        let (AnyAdapter::AdaptionPrompt(a), AnyAdapter::AdaptionPrompt(b)) = (&adapter, &loaded)
        else {
            unreachable!()
        };
        assert_eq!(a.config, b.config);
    }
}

#[test]
fn per_head_tanh_adaption_prompt_roundtrips_in_native_and_official_formats() {
    let base = stories();
    let adapter = AnyAdapter::AdaptionPrompt(per_head_tanh(&base));

    let dir = TempDir::new("per-head-default");
    assert_eq!(
        save_adapter(&adapter, &base, dir.path(), None).unwrap(),
        AdapterFormat::Native
    );

    for format in [AdapterFormat::Native, AdapterFormat::Official] {
        let loaded = assert_roundtrip(
            &base,
            &adapter,
            format,
            &format!("per-head tanh {format:?}"),
        );
        let AnyAdapter::AdaptionPrompt(loaded) = loaded else {
            unreachable!()
        };
        assert_eq!(loaded.config.gate_shape, GateShape::PerHead);
        assert_eq!(loaded.config.gate_activation, GateActivation::Tanh);
    }

    // The same tensors as .safetensors, loaded from the file path.
    let AnyAdapter::AdaptionPrompt(prompt) = &adapter else {
        unreachable!()
    };
    let dir = TempDir::new("per-head-safetensors");
    let file = dir.join("adapter.safetensors");
    save_official(prompt, &base, &file).unwrap();
    let loaded = load_adapter::<B>(
        &file,
        &base,
        &peft_core::LoadOptions::default().with_adapter_len(4),
        &Default::default(),
    )
    .unwrap();
    same_named_tensors(
        &adapter.named_tensors(),
        &loaded.named_tensors(),
        "official .safetensors",
    );
    assert_same_parameters(&adapter, &loaded, "official .safetensors");
    assert_same_bits(
        &logits(&base, &adapter),
        &logits(&base, &loaded),
        "official .safetensors: logits",
    );
}

#[test]
fn official_pth_is_what_torch_save_writes_and_reads_back_through_burn_store() {
    // The fixture was written by torch.save; ours must hold the same tensors under the same keys.
    let fixture = fixtures().join("tiny-mha/adapters/official_adapter/adapter.pth");
    let mut reference = TensorMap::new("fixture");
    reference.add_pth(&fixture).unwrap();
    let keys: Vec<String> = reference.keys().cloned().collect();
    let tensors: Vec<NamedTensor> = keys
        .iter()
        .map(|key| {
            let shape = reference.shape(key).unwrap();
            NamedTensor {
                key: key.clone(),
                values: reference.take_f32(key, &shape).unwrap(),
                shape,
            }
        })
        .collect();
    let dir = TempDir::new("pth");
    let path = dir.join("adapter.pth");
    std::fs::write(&path, state_dict_bytes(&tensors, &path).unwrap()).unwrap();
    let mut ours = TensorMap::new("ours");
    ours.add_pth(&path).unwrap();
    for tensor in &tensors {
        assert_same_bits(
            &ours.take_f32(&tensor.key, &tensor.shape).unwrap(),
            &tensor.values,
            &tensor.key,
        );
    }
    ours.finish().unwrap();
    // And the adapter made from it gives the same logits as from torch's file.
    let base = tiny("tiny-mha");
    let device = Default::default();
    let from_torch =
        AnyAdapter::AdaptionPrompt(load_official::<B>(&fixture, 4, &base, &device).unwrap());
    let from_ours =
        AnyAdapter::AdaptionPrompt(load_official::<B>(&path, 4, &base, &device).unwrap());
    assert_same_bits(
        &logits(&base, &from_torch),
        &logits(&base, &from_ours),
        "logits",
    );
}

#[test]
fn per_head_adaption_prompt_with_different_gates_cannot_be_saved_as_peft() {
    let base = stories();
    let adapter = AnyAdapter::AdaptionPrompt(per_head_tanh(&base));
    let dir = TempDir::new("per-head-peft");
    let target = dir.join("adapter");
    let message = save_adapter(&adapter, &base, &target, Some(AdapterFormat::Peft))
        .unwrap_err()
        .to_string();
    assert_mentions(&message, &["different gate per head", "PEFT", "own format"]);
    assert!(!target.exists(), "a refused save writes nothing");
}

#[test]
fn per_head_adaption_prompt_sharing_one_gate_per_layer_saves_as_peft_with_the_activated_gate() {
    let base = stories();
    let prompt = per_head_tanh(&base);
    let heads = base.config.num_attention_heads;
    let raw = [0.9f32, -0.3, 0.45];
    let gates: Vec<f32> = raw
        .iter()
        .flat_map(|&g| std::iter::repeat_n(g, heads))
        .collect();
    let prompt = AdaptionPrompt::from_tensors(
        prompt.config.clone(),
        &base,
        prompt.prompts.val(),
        Tensor::from_data(TensorData::new(gates, [3, heads]), &Default::default()),
    );
    let adapter = AnyAdapter::AdaptionPrompt(prompt);
    let dir = TempDir::new("shared-gate");
    // PEFT's format holds it exactly, so it is the default.
    assert_eq!(
        save_adapter(&adapter, &base, dir.path(), None).unwrap(),
        AdapterFormat::Peft
    );

    let stored = read_tensors(&dir.join("adapter_model.safetensors"));
    let stored_gates: Vec<f32> = stored
        .iter()
        .filter(|t| t.key.ends_with(".adaption_gate"))
        .flat_map(|t| t.values.clone())
        .collect();
    assert_eq!(
        stored
            .iter()
            .filter(|t| t.key.ends_with(".adaption_gate"))
            .count(),
        3
    );
    for (stored, raw) in stored_gates.iter().zip(raw) {
        assert!(
            (stored - raw.tanh()).abs() < 1e-6,
            "PEFT stores tanh({raw}) = {}, found {stored}",
            raw.tanh()
        );
    }

    let loaded = load_adapter::<B>(
        dir.path(),
        &base,
        &peft_core::LoadOptions::default().with_adapter_len(4),
        &Default::default(),
    )
    .unwrap();
    let AnyAdapter::AdaptionPrompt(loaded_prompt) = &loaded else {
        unreachable!()
    };
    assert_eq!(loaded_prompt.config.gate_shape, GateShape::Scalar);
    assert_eq!(
        loaded_prompt.config.gate_activation,
        GateActivation::Identity
    );
    let (expected, found) = (logits(&base, &adapter), logits(&base, &loaded));
    let worst = expected
        .iter()
        .zip(&found)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-6,
        "logits differ by {worst} after saving as PEFT"
    );
}

// ---------------------------------------------------------------------------------------------
// One test per error
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_tensor_is_reported_with_file_and_key() {
    let dir = copy_fixture("tiny-mha", "lora");
    let weights = dir.join("adapter_model.safetensors");
    let mut tensors = read_tensors(&weights);
    tensors.retain(|t| t.key != LORA_B);
    write_tensors(&weights, &tensors);
    let message = load_error(dir.path(), &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &[
            "adapter_model.safetensors",
            "missing tensor",
            LORA_B,
            "[32, 4]",
        ],
    );
}

#[test]
fn unexpected_tensor_is_reported_with_file_and_key() {
    let dir = copy_fixture("tiny-mha", "lora");
    let weights = dir.join("adapter_model.safetensors");
    let mut tensors = read_tensors(&weights);
    let extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    tensors.push(NamedTensor {
        key: extra.into(),
        shape: vec![4, 32],
        values: vec![0.5; 128],
    });
    write_tensors(&weights, &tensors);
    let message = load_error(dir.path(), &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &["adapter_model.safetensors", "unexpected tensor", extra],
    );
}

#[test]
fn adapter_for_another_model_size_is_refused_naming_key_and_shapes() {
    // tiny-mha: hidden 32, v width 32; tiny-gqa: hidden 48, v width 16.
    let dir = copy_fixture("tiny-mha", "lora");
    let message = load_error(dir.path(), &tiny_config("tiny-gqa"));
    assert_mentions(
        &message,
        &[
            "adapter_model.safetensors",
            "lora_A.weight",
            "[4, 32]",
            "[4, 48]",
        ],
    );

    // The native format records the model it was made for.
    let base = tiny("tiny-mha");
    let lora = LoraConfig::new()
        .init::<B>(&base, &Default::default())
        .unwrap();
    let dir = TempDir::new("native-other-model");
    save_adapter(
        &AnyAdapter::Lora(lora),
        &base,
        dir.path(),
        Some(AdapterFormat::Native),
    )
    .unwrap();
    let message = load_error(dir.path(), &tiny_config("tiny-gqa"));
    assert_mentions(
        &message,
        &[
            "peft_rs_config.json",
            "\"hidden_size\":32",
            "\"hidden_size\":48",
        ],
    );
}

#[test]
fn wrong_number_of_layers_is_refused() {
    // A prefix for the 3-layer tiny-mha on the 5-layer stories260k (same kv width, 32).
    let stories = stories();
    let dir = copy_fixture("tiny-mha", "prefix");
    let message = load_error(dir.path(), &stories);
    assert_mentions(&message, &["adapter_config.json", "3 layers", "has 5"]);

    // An adaption prompt claiming more layers than the model has.
    let dir = copy_fixture("tiny-mha", "adaption_prompt");
    edit_json(&dir.join("adapter_config.json"), |c| {
        c["adapter_layers"] = 4.into()
    });
    let message = load_error(dir.path(), &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &["adapter_config.json", "adapter_layers = 4", "3 layers"],
    );

    // LoRA on a layer the model lacks.
    let dir = copy_fixture("tiny-mha", "lora");
    edit_json(&dir.join("adapter_config.json"), |c| {
        c["layers_to_transform"] = serde_json::json!([0, 7])
    });
    let message = load_error(dir.path(), &tiny_config("tiny-mha"));
    assert_mentions(&message, &["adapter_config.json", "layer 7", "3 layers"]);
}

#[test]
fn unknown_peft_type_is_refused() {
    let dir = copy_fixture("tiny-mha", "lora");
    edit_json(&dir.join("adapter_config.json"), |c| {
        c["peft_type"] = "IA3".into()
    });
    let message = load_error(dir.path(), &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &[
            "adapter_config.json",
            "IA3",
            "LORA, PREFIX_TUNING, ADAPTION_PROMPT",
        ],
    );

    let base = tiny("tiny-mha");
    let lora = LoraConfig::new()
        .init::<B>(&base, &Default::default())
        .unwrap();
    let dir = TempDir::new("native-unknown");
    save_adapter(
        &AnyAdapter::Lora(lora),
        &base,
        dir.path(),
        Some(AdapterFormat::Native),
    )
    .unwrap();
    edit_json(&dir.join("peft_rs_config.json"), |c| {
        c["peft_type"] = "IA3".into()
    });
    let message = load_error(dir.path(), &base);
    assert_mentions(
        &message,
        &["peft_rs_config.json", "unknown peft_type", "IA3"],
    );
}

#[test]
fn truncated_json_is_reported_with_file_and_position() {
    let dir = copy_fixture("tiny-mha", "lora");
    let config = dir.join("adapter_config.json");
    let text = std::fs::read(&config).unwrap();
    std::fs::write(&config, &text[..text.len() / 2]).unwrap();
    let message = load_error(dir.path(), &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &["adapter_config.json", "malformed JSON", "EOF", "line"],
    );

    let base = tiny("tiny-mha");
    let prefix = PrefixTuningConfig::new()
        .with_num_virtual_tokens(2)
        .init::<B>(&base, &Default::default())
        .unwrap();
    let dir = TempDir::new("native-truncated-json");
    save_adapter(
        &AnyAdapter::PrefixTuning(prefix),
        &base,
        dir.path(),
        Some(AdapterFormat::Native),
    )
    .unwrap();
    let config = dir.join("peft_rs_config.json");
    let text = std::fs::read(&config).unwrap();
    std::fs::write(&config, &text[..text.len() - 3]).unwrap();
    let message = load_error(dir.path(), &base);
    assert_mentions(&message, &["peft_rs_config.json", "malformed JSON"]);
}

#[test]
fn truncated_or_corrupt_safetensors_is_reported_with_file() {
    let original =
        std::fs::read(fixtures().join("tiny-mha/adapters/lora/adapter_model.safetensors")).unwrap();
    let header = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("shorter than the header length", original[..5].to_vec()),
        ("cut inside the header", original[..8 + header / 2].to_vec()),
        (
            "cut inside the data",
            original[..original.len() - 100].to_vec(),
        ),
        ("header length beyond the file", {
            let mut bytes = original.clone();
            bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            bytes
        }),
        ("header that is not JSON", {
            let mut bytes = original.clone();
            bytes[8..8 + header].fill(b'#');
            bytes
        }),
    ];
    cases.push((
        "random bytes",
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
    ));
    for (what, bytes) in cases {
        let dir = copy_fixture("tiny-mha", "lora");
        std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
        let message = load_error(dir.path(), &tiny_config("tiny-mha"));
        assert_mentions(&message, &["adapter_model.safetensors"]);
        assert!(
            message.contains("unreadable weight file") || message.contains("too short"),
            "{what}: the message should say the file is unreadable: {message}"
        );
    }

    // The native format's tensor file.
    let base = tiny("tiny-mha");
    let lora = LoraConfig::new()
        .init::<B>(&base, &Default::default())
        .unwrap();
    let dir = TempDir::new("native-truncated");
    save_adapter(
        &AnyAdapter::Lora(lora),
        &base,
        dir.path(),
        Some(AdapterFormat::Native),
    )
    .unwrap();
    let weights = dir.join("adapter.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 10]).unwrap();
    let message = load_error(dir.path(), &base);
    assert_mentions(&message, &["adapter.safetensors"]);
}

#[test]
fn truncated_pth_is_reported_with_file() {
    let original =
        std::fs::read(fixtures().join("tiny-mha/adapters/official_adapter/adapter.pth")).unwrap();
    let dir = TempDir::new("truncated-pth");
    let path = dir.join("adapter.pth");
    for length in [0, 10, original.len() / 2, original.len() - 30] {
        std::fs::write(&path, &original[..length]).unwrap();
        let message = load_error(&path, &tiny_config("tiny-mha"));
        assert_mentions(&message, &["adapter.pth", "unreadable weight file"]);
    }
}

#[test]
fn pth_holding_a_string_instead_of_a_tensor_is_refused_naming_the_key() {
    let path = fixtures().join("bad/official_string_instead_of_tensor.pth");
    let message = load_error(&path, &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &[
            "official_string_instead_of_tensor.pth",
            "key 'adapter_query.weight' holds a non-tensor (a string)",
        ],
    );
}

#[test]
fn pth_holding_non_tensor_values_is_refused_naming_them() {
    let path = fixtures().join("bad/official_with_non_tensor_values.pth");
    let message = load_error(&path, &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &[
            "official_with_non_tensor_values.pth",
            "key 'epoch' holds a non-tensor (an integer)",
            "key 'note' holds a non-tensor (a string)",
        ],
    );
}

/// The official fixture's tensors with `edit` applied, written as a `.pth` by our writer.
fn official_variant(dir: &TempDir, edit: impl FnOnce(&mut Vec<NamedTensor>)) -> PathBuf {
    let mut tensors =
        read_tensors(&fixtures().join("tiny-mha/adapters/official_adapter/adapter.safetensors"));
    edit(&mut tensors);
    let path = dir.join("adapter.pth");
    std::fs::write(&path, state_dict_bytes(&tensors, &path).unwrap()).unwrap();
    path
}

#[test]
fn nonzero_gate_below_the_adapted_layers_is_refused() {
    let dir = TempDir::new("gate-below");
    let path = official_variant(&dir, |tensors| {
        let gate = tensors
            .iter_mut()
            .find(|t| t.key == "layers.0.attention.gate")
            .unwrap();
        gate.values[2] = 0.25;
    });
    let message = load_error(&path, &tiny_config("tiny-mha"));
    assert_mentions(
        &message,
        &[
            "adapter.pth",
            "layers.0.attention.gate",
            "non-zero",
            "below the 2 adapted layers",
        ],
    );
}

#[test]
fn official_checkpoint_with_the_wrong_adapter_len_is_refused() {
    let path = fixtures().join("tiny-mha/adapters/official_adapter/adapter.pth");
    let model = tiny_config("tiny-mha");
    let device = Default::default();
    let error = |len| {
        load_official::<B>(&path, len, &model, &device)
            .unwrap_err()
            .to_string()
    };
    // 8 prompt rows: 3 does not divide them.
    assert_mentions(
        &error(3),
        &["adapter.pth", "8 rows", "adapter_len 3", "--adapter-len"],
    );
    // 8 = 1 layer of 8: the real second adapted layer's gate is then "below" the adapted one.
    assert_mentions(
        &error(8),
        &[
            "adapter.pth",
            "layers.1.attention.gate",
            "non-zero",
            "--adapter-len",
        ],
    );
    // The right value loads.
    load_official::<B>(&path, 4, &model, &device).unwrap();
}

#[test]
fn official_checkpoint_whose_adapter_len_implies_too_many_layers_names_the_file() {
    let path = fixtures().join("tiny-mha/adapters/official_adapter/adapter.pth");
    // 8 = 4 layers of 2, and the model has 3.
    let message = load_official::<B>(&path, 2, &tiny_config("tiny-mha"), &Default::default())
        .unwrap_err()
        .to_string();
    assert_mentions(&message, &["adapter.pth", "adapter_len 2", "4", "3 layers"]);
}

/// Sizes far beyond any file: allocating them aborts the process (3·10⁹ rows of 32 floats is
/// 384 GB) or overflows `usize` (2⁶²·32).
const HUGE: u64 = 3_000_000_000;
const OVERFLOWING: u64 = 1 << 62;

#[test]
fn native_config_with_absurd_sizes_is_refused_before_allocating() {
    let base = tiny("tiny-mha");
    let device = Default::default();
    let lora = AnyAdapter::Lora(LoraConfig::new().init::<B>(&base, &device).unwrap());
    let prompt = AnyAdapter::AdaptionPrompt(per_head_tanh(&base));
    let prefix = AnyAdapter::PrefixTuning(
        PrefixTuningConfig::new()
            .with_num_virtual_tokens(2)
            .with_prefix_projection(true)
            .with_encoder_hidden_size(8)
            .init::<B>(&base, &device)
            .unwrap(),
    );
    let cases: [(&AnyAdapter<B>, &str, u64); 8] = [
        (&lora, "r", 2_000_000_000),
        (&lora, "r", OVERFLOWING),
        (&prompt, "adapter_len", HUGE),
        (&prompt, "adapter_len", OVERFLOWING),
        (&prompt, "adapter_layers", OVERFLOWING),
        (&prefix, "num_virtual_tokens", HUGE),
        (&prefix, "num_virtual_tokens", OVERFLOWING),
        (&prefix, "encoder_hidden_size", OVERFLOWING),
    ];
    for (adapter, key, value) in cases {
        let dir = TempDir::new("native-absurd");
        save_adapter(adapter, &base, dir.path(), Some(AdapterFormat::Native)).unwrap();
        edit_json(&dir.join("peft_rs_config.json"), |c| {
            c["config"][key] = value.into()
        });
        let message = load_error(dir.path(), &base);
        let setting = format!("\"{key}\":{value}");
        if key == "adapter_layers" {
            // More layers than the model has: refused by the configuration's own check.
            assert_mentions(
                &message,
                &["peft_rs_config.json", "adapter_layers", "3 layers"],
            );
        } else {
            assert_mentions(
                &message,
                &[
                    "peft_rs_config.json",
                    &setting,
                    "adapter.safetensors",
                    "holds",
                ],
            );
        }
    }

    // Zero sizes are refused by the configuration's checks, naming the file.
    let dir = TempDir::new("native-zero");
    save_adapter(&lora, &base, dir.path(), Some(AdapterFormat::Native)).unwrap();
    edit_json(&dir.join("peft_rs_config.json"), |c| {
        c["config"]["r"] = 0.into()
    });
    let message = load_error(dir.path(), &base);
    assert_mentions(&message, &["peft_rs_config.json", "r must be positive"]);
}

#[test]
fn native_config_whose_sizes_disagree_with_its_tensors_is_refused() {
    // A plausible r that is simply not the file's: caught before `init`, naming both files.
    let base = tiny("tiny-mha");
    let lora = LoraConfig::new()
        .with_r(4)
        .init::<B>(&base, &Default::default())
        .unwrap();
    let dir = TempDir::new("native-other-r");
    save_adapter(
        &AnyAdapter::Lora(lora),
        &base,
        dir.path(),
        Some(AdapterFormat::Native),
    )
    .unwrap();
    edit_json(&dir.join("peft_rs_config.json"), |c| {
        c["config"]["r"] = 8.into()
    });
    let message = load_error(dir.path(), &base);
    // q and v of 3 layers, [32, r] + [r, 32] each.
    assert_mentions(
        &message,
        &[
            "peft_rs_config.json",
            "\"r\":8",
            "needs 3072 values",
            "adapter.safetensors",
            "holds 1536",
        ],
    );
}

#[test]
fn peft_config_with_absurd_sizes_is_refused_before_allocating() {
    let model = tiny_config("tiny-mha");
    let cases: [(&str, &str, u64, &str); 5] = [
        ("adaption_prompt", "adapter_len", HUGE, "adaption_prompt"),
        (
            "adaption_prompt",
            "adapter_len",
            OVERFLOWING,
            "adaption_prompt",
        ),
        ("lora", "r", 2_000_000_000, "lora_A.weight"),
        ("lora", "r", OVERFLOWING, "lora_A.weight"),
        (
            "prefix",
            "num_virtual_tokens",
            OVERFLOWING,
            "prompt_embeddings",
        ),
    ];
    for (case, key, value, tensor) in cases {
        let dir = copy_fixture("tiny-mha", case);
        edit_json(&dir.join("adapter_config.json"), |c| c[key] = value.into());
        let message = load_error(dir.path(), &model);
        assert_mentions(
            &message,
            &["adapter_model.safetensors", tensor, &value.to_string()],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Saving is atomic
// ---------------------------------------------------------------------------------------------

#[test]
fn saving_over_an_existing_adapter_replaces_it_whole_and_leaves_no_temporary_files() {
    let base = stories();
    let device = Default::default();
    let first = AnyAdapter::Lora(
        LoraConfig::new()
            .with_r(4)
            .init::<B>(&base, &device)
            .unwrap()
            .map(&mut Randomise(0.2)),
    );
    let second = AnyAdapter::Lora(
        LoraConfig::new()
            .with_r(2)
            .with_target_modules(peft_core::TargetModules::names(&["o_proj", "down_proj"]))
            .init::<B>(&base, &device)
            .unwrap()
            .map(&mut Randomise(0.2)),
    );
    for format in [AdapterFormat::Peft, AdapterFormat::Native] {
        let dir = TempDir::new("overwrite");
        save_adapter(&first, &base, dir.path(), Some(format)).unwrap();
        let files = files_in(dir.path());
        save_adapter(&second, &base, dir.path(), Some(format)).unwrap();
        assert_eq!(
            files_in(dir.path()),
            files,
            "{format:?}: the same files, no temporary ones left"
        );
        let loaded = load_adapter::<B>(
            dir.path(),
            &base,
            &peft_core::LoadOptions::default().with_adapter_len(10),
            &device,
        )
        .unwrap();
        same_named_tensors(
            &second.named_tensors(),
            &loaded.named_tensors(),
            &format!("{format:?} overwrite"),
        );
    }
    // The official file alone.
    let prompt = AnyAdapter::AdaptionPrompt(per_head_tanh(&base));
    let dir = TempDir::new("overwrite-official");
    save_adapter(&prompt, &base, dir.path(), Some(AdapterFormat::Official)).unwrap();
    let again = AnyAdapter::AdaptionPrompt(per_head_tanh(&base));
    save_adapter(&again, &base, dir.path(), Some(AdapterFormat::Official)).unwrap();
    assert_eq!(files_in(dir.path()), ["adapter.pth"]);
    let loaded = load_adapter::<B>(
        dir.path(),
        &base,
        &peft_core::LoadOptions::default().with_adapter_len(4),
        &device,
    )
    .unwrap();
    same_named_tensors(
        &again.named_tensors(),
        &loaded.named_tensors(),
        "official overwrite",
    );
}

#[test]
fn saving_in_another_format_over_an_adapter_loads_the_new_one() {
    let base = stories();
    let device = Default::default();
    let old = AnyAdapter::Lora(
        LoraConfig::new()
            .init::<B>(&base, &device)
            .unwrap()
            .map(&mut Randomise(0.2)),
    );
    let new = AnyAdapter::Lora(
        LoraConfig::new()
            .init::<B>(&base, &device)
            .unwrap()
            .map(&mut Randomise(0.2)),
    );
    let dir = TempDir::new("reformat");
    save_adapter(&old, &base, dir.path(), Some(AdapterFormat::Native)).unwrap();
    save_adapter(&new, &base, dir.path(), Some(AdapterFormat::Peft)).unwrap();
    let loaded = load_adapter::<B>(
        dir.path(),
        &base,
        &peft_core::LoadOptions::default().with_adapter_len(10),
        &device,
    )
    .unwrap();
    same_named_tensors(
        &new.named_tensors(),
        &loaded.named_tensors(),
        "re-saved as PEFT",
    );
}

#[test]
fn saving_in_another_format_leaves_only_the_new_adapter() {
    let base = tiny("tiny-mha");
    let device = Default::default();
    let lora = AnyAdapter::Lora(LoraConfig::new().init::<B>(&base, &device).unwrap());
    let prompt = AnyAdapter::AdaptionPrompt(per_head_tanh(&base));
    let dir = TempDir::new("one-adapter");
    let steps: [(&AnyAdapter<B>, AdapterFormat, &[&str]); 4] = [
        (
            &lora,
            AdapterFormat::Native,
            &["adapter.safetensors", "peft_rs_config.json"],
        ),
        (
            &lora,
            AdapterFormat::Peft,
            &["adapter_config.json", "adapter_model.safetensors"],
        ),
        (
            &prompt,
            AdapterFormat::Native,
            &["adapter.safetensors", "peft_rs_config.json"],
        ),
        (&prompt, AdapterFormat::Official, &["adapter.pth"]),
    ];
    for (adapter, format, files) in steps {
        save_adapter(adapter, &base, dir.path(), Some(format)).unwrap();
        assert_eq!(files_in(dir.path()), files, "after saving as {format:?}");
        let loaded = load_adapter::<B>(
            dir.path(),
            &base,
            &peft_core::LoadOptions::default().with_adapter_len(4),
            &device,
        )
        .unwrap();
        same_named_tensors(
            &adapter.named_tensors(),
            &loaded.named_tensors(),
            &format!("saved as {format:?}"),
        );
    }

    // A weight file without its configuration is not an adapter of that format: the official
    // checkpoint's `adapter.safetensors` stays when a PEFT adapter is saved beside it.
    let dir = copy_fixture("tiny-mha", "official_adapter");
    save_adapter(&lora, &base, dir.path(), Some(AdapterFormat::Peft)).unwrap();
    for name in ["adapter.pth", "adapter.safetensors", "adapter_config.json"] {
        assert!(dir.join(name).is_file(), "{name} is kept or written");
    }
}

#[test]
fn a_directory_holding_both_formats_is_refused_naming_both_configurations() {
    let base = tiny("tiny-mha");
    let lora = AnyAdapter::Lora(
        LoraConfig::new()
            .init::<B>(&base, &Default::default())
            .unwrap(),
    );
    let dir = copy_fixture("tiny-mha", "lora");
    let native = TempDir::new("native-beside");
    save_adapter(&lora, &base, native.path(), Some(AdapterFormat::Native)).unwrap();
    for name in ["peft_rs_config.json", "adapter.safetensors"] {
        std::fs::copy(native.join(name), dir.join(name)).unwrap();
    }
    let message = load_error(dir.path(), &base);
    assert_mentions(
        &message,
        &[
            &dir.display().to_string(),
            "ambiguous",
            "peft_rs_config.json",
            "adapter_config.json",
        ],
    );
}

#[test]
fn concurrent_saves_of_one_file_do_not_collide() {
    let dir = TempDir::new("concurrent");
    let path = dir.join("adapter_model.safetensors");
    let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 64 * 1024]).collect();
    std::thread::scope(|scope| {
        for bytes in &contents {
            let path = &path;
            scope.spawn(move || {
                for _ in 0..20 {
                    peft_io::files::write_atomic(path, bytes).unwrap();
                }
            });
        }
    });
    let written = std::fs::read(&path).unwrap();
    assert!(
        contents.contains(&written),
        "the file is one whole write, not a mixture"
    );
    assert_eq!(
        files_in(dir.path()),
        ["adapter_model.safetensors"],
        "no temporary file left"
    );
}

#[test]
fn saving_where_files_cannot_be_written_fails_and_leaves_existing_files_alone() {
    let base = tiny("tiny-mha");
    let device = Default::default();
    let old = AnyAdapter::Lora(
        LoraConfig::new()
            .init::<B>(&base, &device)
            .unwrap()
            .map(&mut Randomise(0.2)),
    );
    let new = AnyAdapter::Lora(
        LoraConfig::new()
            .init::<B>(&base, &device)
            .unwrap()
            .map(&mut Randomise(0.2)),
    );

    // A "parent directory" that is a file.
    let dir = TempDir::new("parent-is-a-file");
    std::fs::write(dir.join("file"), b"not a directory").unwrap();
    for format in [
        AdapterFormat::Peft,
        AdapterFormat::Native,
        AdapterFormat::Official,
    ] {
        let adapter = if format == AdapterFormat::Official {
            AnyAdapter::AdaptionPrompt(per_head_tanh(&base))
        } else {
            new.clone()
        };
        let message =
            save_adapter(&adapter, &base, &dir.join("file/adapter"), Some(format)).unwrap_err();
        assert_mentions(&message.to_string(), &["file"]);
    }
    assert_eq!(
        contents(dir.path()),
        [("file".to_string(), b"not a directory".to_vec())]
    );

    // A read-only directory holding a good adapter (only meaningful where permissions apply,
    // i.e. not as root).
    for format in [AdapterFormat::Peft, AdapterFormat::Native] {
        let dir = TempDir::new("read-only");
        save_adapter(&old, &base, dir.path(), Some(format)).unwrap();
        let before = contents(dir.path());
        set_read_only(dir.path(), true);
        let probe = dir.join("probe");
        if std::fs::write(&probe, b"").is_ok() {
            let _ = std::fs::remove_file(&probe);
            set_read_only(dir.path(), false);
            eprintln!("permissions are not enforced for this user (root?): read-only case skipped");
            break;
        }
        let error = save_adapter(&new, &base, dir.path(), Some(format))
            .unwrap_err()
            .to_string();
        set_read_only(dir.path(), false);
        assert_mentions(&error, &[&dir.display().to_string()]);
        assert_eq!(
            contents(dir.path()),
            before,
            "{format:?}: existing files untouched"
        );
    }
}

#[test]
fn a_failed_save_leaves_no_temporary_file() {
    let base = tiny("tiny-mha");
    let lora = AnyAdapter::Lora(
        LoraConfig::new()
            .init::<B>(&base, &Default::default())
            .unwrap(),
    );
    let dir = TempDir::new("failed-rename");
    // A non-empty directory where the tensor file goes: the final rename must fail.
    std::fs::create_dir_all(dir.join("adapter_model.safetensors/occupied")).unwrap();
    let message = save_adapter(&lora, &base, dir.path(), Some(AdapterFormat::Peft))
        .unwrap_err()
        .to_string();
    assert_mentions(&message, &["adapter_model.safetensors"]);
    assert_eq!(
        files_in(dir.path()),
        ["adapter_model.safetensors"],
        "no temporary file left"
    );
}

fn set_read_only(dir: &Path, read_only: bool) {
    let mut permissions = std::fs::metadata(dir).unwrap().permissions();
    permissions.set_readonly(read_only);
    std::fs::set_permissions(dir, permissions).unwrap();
}

#[test]
fn a_peft_config_names_the_checkpoint_the_model_was_loaded_from() {
    let dir = TempDir::new("name-or-path");
    let device = Default::default();
    let base = LlamaLoader::new(stories260k())
        .load::<NdArray<f32>>(&device)
        .unwrap();
    let adapter: AnyAdapter<NdArray<f32>> = LoraConfig::new().init(&base, &device).unwrap().into();
    save_adapter(&adapter, &base, &dir.join("lora"), None).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("lora").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["base_model_name_or_path"],
        stories260k().display().to_string()
    );
    // A model built in memory has no source to name.
    let built = base
        .config
        .init::<NdArray<f32>>(&device, burn::tensor::DType::F32);
    save_adapter(&adapter, &built, &dir.join("built"), None).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("built").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert!(config["base_model_name_or_path"].is_null());
}

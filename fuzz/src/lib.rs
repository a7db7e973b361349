//! What the fuzz targets share: a scratch directory per process, the tiny fixture model, and one
//! function per parser that feeds it a file holding the fuzzer's bytes.
//!
//! The parsers read files, not byte slices, so each input is written to a file first (the
//! loaders are called exactly as the CLI calls them). Every error is fine; a panic, an abort or
//! an unbounded allocation is a finding.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::NdArray;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_core::native_format::CONFIG_FILE as NATIVE_CONFIG;
use peft_core::peft_format::{CONFIG_FILE as PEFT_CONFIG, WEIGHTS_FILE as PEFT_WEIGHTS};
use peft_core::{
    load_native, load_peft, save_native, AdaptionPromptConfig, AnyAdapter, GateActivation,
    GateShape, LoraConfig, PrefixTuningConfig, TargetModules,
};
use peft_llama::weights::TensorMap;
use peft_llama::{Llama, LlamaConfig, LlamaLoader};

type B = NdArray<f32>;

/// The repository's `fixtures/` directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A directory of this process, created on first use.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("peft-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// The model of `fixtures/tiny-mha/model`, loaded once per thread.
pub fn model() -> &'static Llama<B> {
    thread_local! {
        static MODEL: &'static Llama<B> = Box::leak(Box::new(
            LlamaLoader::new(fixtures().join("tiny-mha/model"))
                .load::<B>(&Default::default())
                .expect("fixture model"),
        ));
    }
    MODEL.with(|model| *model)
}

struct Randomise;
impl<Bk: Backend> ModuleMapper<Bk> for Randomise {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        let (id, tensor, mapper) = param.consume();
        let noise = Tensor::random(
            tensor.shape(),
            Distribution::Normal(0.0, 0.5),
            &tensor.device(),
        );
        Param::from_mapped_value(id, noise, mapper)
    }
}

/// The adapter directories the configuration target writes into: a format, and the tensor file
/// that stays in place while the fuzzer replaces the configuration.
pub struct ConfigCase {
    /// Directory holding a valid tensor file.
    pub dir: PathBuf,
    /// True for this crate's format, false for PEFT's.
    pub native: bool,
}

/// PEFT directories with the tiny-mha fixtures' tensors, and native ones made here.
pub fn config_cases() -> &'static [ConfigCase] {
    static CASES: OnceLock<Vec<ConfigCase>> = OnceLock::new();
    CASES.get_or_init(|| {
        let mut cases = Vec::new();
        for case in ["lora", "lora_all", "prefix", "adaption_prompt"] {
            let dir = scratch().join(format!("peft-{case}"));
            std::fs::create_dir_all(&dir).unwrap();
            let source = fixtures()
                .join("tiny-mha/adapters")
                .join(case)
                .join(PEFT_WEIGHTS);
            std::fs::copy(source, dir.join(PEFT_WEIGHTS)).unwrap();
            cases.push(ConfigCase { dir, native: false });
        }
        for (name, adapter) in native_adapters() {
            let dir = scratch().join(format!("native-{name}"));
            save_native(&adapter, model(), &dir).unwrap();
            std::fs::remove_file(dir.join(NATIVE_CONFIG)).unwrap();
            cases.push(ConfigCase { dir, native: true });
        }
        cases
    })
}

/// One adapter of every method and setting the native format distinguishes.
pub fn native_adapters() -> Vec<(&'static str, AnyAdapter<B>)> {
    let device = Default::default();
    let model = model();
    vec![
        (
            "lora",
            LoraConfig::new()
                .with_r(2)
                .with_target_modules(TargetModules::parse(&["q_proj", "down_proj"]).unwrap())
                .init::<B>(model, &device)
                .unwrap()
                .map(&mut Randomise)
                .into(),
        ),
        (
            "prefix",
            PrefixTuningConfig::new()
                .with_num_virtual_tokens(2)
                .init::<B>(model, &device)
                .unwrap()
                .into(),
        ),
        (
            "prefix-projection",
            PrefixTuningConfig::new()
                .with_num_virtual_tokens(2)
                .with_prefix_projection(true)
                .with_encoder_hidden_size(4)
                .init::<B>(model, &device)
                .unwrap()
                .into(),
        ),
        (
            "per-head",
            AdaptionPromptConfig::new()
                .with_adapter_len(2)
                .with_adapter_layers(2)
                .with_gate_shape(GateShape::PerHead)
                .with_gate_activation(GateActivation::Tanh)
                .init::<B>(model, &device)
                .unwrap()
                .map(&mut Randomise)
                .into(),
        ),
    ]
}

/// Adapter configuration: the first byte picks an adapter directory (PEFT or native, with a
/// valid tensor file), the rest becomes its configuration file, and the directory is loaded.
pub fn adapter_config(data: &[u8]) {
    let Some((&selector, config)) = data.split_first() else {
        return;
    };
    let cases = config_cases();
    let case = &cases[selector as usize % cases.len()];
    let device = Default::default();
    if case.native {
        std::fs::write(case.dir.join(NATIVE_CONFIG), config).unwrap();
        let _ = load_native::<B>(&case.dir, model(), &device);
    } else {
        std::fs::write(case.dir.join(PEFT_CONFIG), config).unwrap();
        let _ = load_peft::<B>(&case.dir, model(), &device);
    }
}

/// Reads every tensor a map holds, at its own shape, as the loaders do.
fn take_all(mut tensors: TensorMap) {
    let keys: Vec<String> = tensors.keys().cloned().collect();
    for key in keys {
        if let Some(shape) = tensors.shape(&key) {
            let _ = tensors.take_f32(&key, &shape);
        }
    }
    let _ = tensors.finish();
}

/// A safetensors file: header and data.
pub fn safetensors_file(data: &[u8]) {
    let path = scratch().join("input.safetensors");
    std::fs::write(&path, data).unwrap();
    let mut tensors = TensorMap::new("fuzz");
    if tensors.add_safetensors(&path).is_ok() {
        take_all(tensors);
    }
}

/// A `.pth` file as is: zip archive, legacy or tar format.
pub fn pth_file(data: &[u8]) {
    let path = scratch().join("input.pth");
    std::fs::write(&path, data).unwrap();
    pth_at(&path);
}

fn pth_at(path: &Path) {
    let mut tensors = TensorMap::new("fuzz");
    if tensors.add_pth(path).is_ok() {
        take_all(tensors);
    }
}

/// The bytes as `data.pkl` of a well-formed torch zip archive with four storages `data/0..3`
/// of 1024 bytes each, so that mutations reach the pickle reader instead of the zip checks.
pub fn pth_pickle(data: &[u8]) {
    let path = scratch().join("pickle.pth");
    std::fs::write(&path, archive_with_pickle(data)).unwrap();
    pth_at(&path);
}

/// A torch-style archive whose `data.pkl` is `pickle`.
pub fn archive_with_pickle(pickle: &[u8]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::DEFAULT
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut entry = |name: &str, bytes: &[u8]| {
        zip.start_file(format!("archive/{name}"), options).unwrap();
        zip.write_all(bytes).unwrap();
    };
    entry("data.pkl", pickle);
    entry("byteorder", b"little");
    for index in 0..4u8 {
        let bytes: Vec<u8> = (0..1024u32)
            .map(|b| (b as u8).wrapping_mul(index + 1))
            .collect();
        entry(&format!("data/{index}"), &bytes);
    }
    entry("version", b"3\n");
    zip.finish().unwrap().into_inner()
}

/// A model configuration: the first byte picks Hugging Face `config.json` (even) or Meta
/// `params.json` (odd); the rest is the file, read as the loader reads it.
pub fn model_config(data: &[u8]) {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let config = if selector % 2 == 0 {
        let path = scratch().join("config.json");
        std::fs::write(&path, text).unwrap();
        LlamaConfig::from_hf_file(&path)
    } else {
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        // The loader passes the shapes of two tensors when the file has them.
        let from_weights = (selector & 2 != 0).then_some(64);
        LlamaConfig::from_meta_json(text, "params.json", from_weights, from_weights)
    };
    if let Ok(config) = config {
        // What a valid configuration promises: these sizes are computable.
        let _ = (
            config.num_parameters(),
            config.query_width(),
            config.kv_width(),
        );
    }
}

/// A directory holding tiny-mha's configuration and four shards, made once.
fn sharded_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch().join("sharded");
        std::fs::create_dir_all(&dir).unwrap();
        let source = fixtures().join("tiny-mha/model-sharded");
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        dir
    })
}

/// A sharded checkpoint's `model.safetensors.index.json`; the model is loaded from it.
pub fn sharded_index(data: &[u8]) {
    let dir = sharded_model();
    std::fs::write(dir.join("model.safetensors.index.json"), data).unwrap();
    let _ = peft_llama::LlamaLoader::new(dir).load::<B>(&Default::default());
}

/// The vendored stories260k tokenizer.
fn tokenizer() -> &'static peft_llama::LlamaTokenizer {
    static TOKENIZER: OnceLock<peft_llama::LlamaTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        peft_llama::LlamaTokenizer::from_dir(fixtures().join("../models/stories260k")).unwrap()
    })
}

/// An Alpaca JSON / JSON Lines file; what loads is tokenized with `max_seq_len` 48, so that
/// prompts longer than that meet the truncation.
pub fn alpaca_data(data: &[u8]) {
    let path = scratch().join("alpaca.json");
    std::fs::write(&path, data).unwrap();
    if let Ok(records) = peft_train::load_alpaca(&path) {
        if let Ok(dataset) = peft_train::tokenize_alpaca_records(&records, tokenizer(), 48) {
            assert!(dataset.examples.iter().all(|e| e.input_ids.len() <= 48));
        }
    }
}

/// A pre-tokenized JSON Lines file (vocabulary 512, `max_seq_len` 48).
pub fn pretokenized_data(data: &[u8]) {
    let path = scratch().join("tokens.jsonl");
    std::fs::write(&path, data).unwrap();
    if let Ok(dataset) = peft_train::load_pretokenized(&path, 512, 48) {
        assert!(dataset
            .examples
            .iter()
            .all(|e| e.input_ids.len() <= 48 && e.input_ids.len() == e.labels.len()));
    }
}

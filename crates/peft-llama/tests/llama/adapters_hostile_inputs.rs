//! Hostile `.pth` files and adapter directories: a pickle that asks for anything but tensor
//! storage is refused (and nothing runs), declared sizes never become allocations, NaN weights
//! are refused naming the tensor, and empty, non-UTF-8 or mistyped adapter configurations are
//! refused naming the file. Complements `tests/adapter_files.rs` (truncated and corrupt files,
//! absurd sizes, mismatched shapes); `docs/reliability.md` lists both. CPU, well under a second
//! of work per test on `fixtures/tiny-mha`.

use crate::common;

use std::io::{Cursor, Write};
use std::path::Path;

use burn::backend::NdArray;
use common::fixtures;
use peft_core::peft_format::safetensors_bytes;
use peft_core::LoadOptions;
use peft_core::{load_adapter, NamedTensor, PeftError};
use peft_io::torch_pickle::state_dict_bytes;
use peft_llama::weights::TensorMap;
use peft_llama::{LlamaConfig, LlamaLoader};
use safetensors::SafeTensors;

type B = NdArray<f32>;

use peft_io::scratch::ScratchDir as TempDir;

fn tiny_config() -> LlamaConfig {
    LlamaConfig::from_hf_file(fixtures().join("tiny-mha/model/config.json")).unwrap()
}

/// Random weights of the tiny model's shape: loading an adapter needs only its sizes and sites.
fn tiny_model() -> peft_llama::Llama<B> {
    tiny_config().init::<B>(&Default::default(), burn::tensor::DType::F32)
}

/// Prints the error (for `docs/reliability.md`, with `--nocapture`) and checks its fragments.
fn refused<T, E: std::fmt::Display>(case: &str, result: Result<T, E>, fragments: &[&str]) {
    let message = match result {
        Ok(_) => panic!("{case}: accepted"),
        Err(e) => e.to_string(),
    };
    println!("{case}: {message}");
    for fragment in fragments {
        assert!(
            message.contains(fragment),
            "{case}: `{fragment}` not in: {message}"
        );
    }
}

fn load_official(path: &Path) -> Result<(), PeftError> {
    load_adapter::<B>(
        path,
        &tiny_model(),
        &LoadOptions::default().with_adapter_len(4),
        &Default::default(),
    )
    .map(|_| ())
}

fn load_model(dir: &Path) -> Result<(), peft_llama::LlamaError> {
    LlamaLoader::new(dir)
        .load::<B>(&Default::default())
        .map(|_| ())
}

/// A torch-style zip archive (`archive/data.pkl`, one 64-byte storage `archive/data/0`).
fn archive(pickle: &[u8], compression: zip::CompressionMethod) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::DEFAULT.compression_method(compression);
    let mut entry = |name: &str, bytes: &[u8]| {
        zip.start_file(format!("archive/{name}"), options).unwrap();
        zip.write_all(bytes).unwrap();
    };
    entry("data.pkl", pickle);
    entry("byteorder", b"little");
    entry("data/0", &[0u8; 64]);
    entry("version", b"3\n");
    zip.finish().unwrap().into_inner()
}

/// A pickle of `{"adapter_query.weight": <tensor of shape [rows, cols] over storage "0">}`,
/// with the rest written as `torch.save` does.
fn tensor_pickle(rows: u32, cols: u32, numel: u32) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00X\x14\x00\x00\x00adapter_query.weightq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06J".to_vec();
    p.extend(numel.to_le_bytes());
    p.extend(b"tq\x07QK\x00J");
    p.extend(rows.to_le_bytes());
    p.push(b'J');
    p.extend(cols.to_le_bytes());
    p.extend(b"\x86q\x08J");
    p.extend(cols.to_le_bytes());
    p.extend(b"K\x01\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.");
    p
}

// ---------------------------------------------------------------------------------------------
// Pickle safety
// ---------------------------------------------------------------------------------------------

/// Pickles that would run `touch <marker>` (or worse) under Python's unrestricted `pickle.load`.
fn malicious_pickles(marker: &Path) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let command = format!("touch {}", marker.display());
    let mut text = vec![b'X'];
    text.extend((command.len() as u32).to_le_bytes());
    text.extend(command.as_bytes());
    let with = |head: &[u8], tail: &[u8]| {
        let mut p = head.to_vec();
        p.extend(&text);
        p.extend(tail);
        p
    };
    vec![
        (
            "GLOBAL os.system + REDUCE",
            with(b"\x80\x02cos\nsystem\nq\x00", b"\x85q\x01Rq\x02."),
            "`os.system`",
        ),
        (
            "os.system inside a state dict value",
            with(
                b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01cposix\nsystem\nq\x02",
                b"\x85Rs.",
            ),
            "`posix.system`",
        ),
        (
            "INST subprocess.call",
            {
                let mut p = b"\x80\x02(".to_vec();
                p.extend(&text);
                p.extend(b"isubprocess\ncall\n.");
                p
            },
            "`subprocess.call`",
        ),
        (
            "STACK_GLOBAL builtins.eval (protocol 4)",
            with(
                b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94",
                b"\x85R.",
            ),
            "`builtins.eval`",
        ),
        (
            "EXT1 (copyreg extension registry)",
            with(b"\x80\x02\x82\x01", b"\x85R."),
            "extension-registry",
        ),
    ]
}

#[test]
fn a_pth_whose_pickle_names_a_callable_is_refused_and_nothing_runs() {
    let dir = TempDir::new("malicious");
    let marker = dir.join("executed");
    for (case, pickle, name) in malicious_pickles(&marker) {
        // As an official adapter checkpoint.
        let path = dir.join("adapter.pth");
        std::fs::write(&path, archive(&pickle, zip::CompressionMethod::Stored)).unwrap();
        refused(
            &format!("adapter .pth: {case}"),
            load_official(&path),
            &["adapter.pth", name],
        );
        // As a Meta model checkpoint.
        let model = TempDir::copy_of(&fixtures().join("tiny-mha/meta"), "malicious-meta");
        std::fs::write(
            model.join("consolidated.00.pth"),
            archive(&pickle, zip::CompressionMethod::Stored),
        )
        .unwrap();
        refused(
            &format!("consolidated.00.pth: {case}"),
            load_model(model.path()),
            &["consolidated.00.pth", name],
        );
        // A bare pickle file (no archive) goes through the same check.
        std::fs::write(&path, &pickle).unwrap();
        refused(
            &format!("bare pickle: {case}"),
            load_official(&path),
            &["adapter.pth", name],
        );
    }
    assert!(!marker.exists(), "a pickle's command was executed");
}

#[test]
fn the_refusal_names_the_offset_and_says_nothing_ran() {
    let dir = TempDir::new("refusal-message");
    let path = dir.join("adapter.pth");
    let (_, pickle, _) = malicious_pickles(&dir.join("x")).remove(0);
    std::fs::write(&path, archive(&pickle, zip::CompressionMethod::Stored)).unwrap();
    refused(
        "adapter .pth: message",
        load_official(&path),
        &[
            "archive/data.pkl, byte 2: the pickle refers to `os.system`, which is not tensor storage",
            "nothing was executed",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Declared sizes
// ---------------------------------------------------------------------------------------------

#[test]
fn a_string_length_of_4_gib_in_data_pkl_is_refused_before_reading() {
    // The fuzzer's finding: burn-store allocates a BINUNICODE's declared length before reading.
    let dir = TempDir::new("binunicode");
    let path = dir.join("adapter.pth");
    let mut pickle = b"\x80\x02}q\x00X".to_vec();
    pickle.extend(0xffff_0017u32.to_le_bytes());
    pickle.extend(b"adapter_query.weight");
    std::fs::write(&path, archive(&pickle, zip::CompressionMethod::Stored)).unwrap();
    refused(
        "adapter .pth: BINUNICODE length 0xffff0017",
        load_official(&path),
        &["BINUNICODE declares 4294901783 bytes but only 20 remain"],
    );
    // The same through the fuzzer's regression input, where it exists.
    let regression = fixtures().join("../fuzz/regressions/pth_pickle/binunicode-length-4GiB");
    if let Ok(pickle) = std::fs::read(regression) {
        std::fs::write(&path, archive(&pickle, zip::CompressionMethod::Stored)).unwrap();
        refused(
            "adapter .pth: fuzz regression binunicode-length-4GiB",
            load_official(&path),
            &["BINUNICODE declares"],
        );
    }
}

#[test]
fn a_tensor_shape_larger_than_its_file_is_refused_before_reading() {
    let dir = TempDir::new("huge-shape");
    let path = dir.join("adapter.pth");
    // 100000 × 32 floats (12.8 MB) over a 64-byte storage, in a file of a few hundred bytes.
    let pickle = tensor_pickle(100_000, 32, 16);
    std::fs::write(&path, archive(&pickle, zip::CompressionMethod::Stored)).unwrap();
    refused(
        "adapter .pth: shape [100000, 32] over 16 values",
        load_official(&path),
        &[
            "tensor 'adapter_query.weight' declares shape [100000, 32] of F32, more bytes than the whole file",
        ],
    );
    // The Meta loader takes the vocabulary from this very shape, so a lie there would become
    // the model's expected shape.
    let model = TempDir::copy_of(&fixtures().join("tiny-mha/meta"), "huge-vocab");
    let mut pickle = tensor_pickle(1_000_000_000, 32, 16);
    let key = b"adapter_query.weight";
    let at = pickle.windows(key.len()).position(|w| w == key).unwrap();
    pickle.splice(at - 4..at + key.len(), {
        let mut k = 21u32.to_le_bytes().to_vec();
        k.extend(b"tok_embeddings.weight");
        k
    });
    std::fs::write(
        model.join("consolidated.00.pth"),
        archive(&pickle, zip::CompressionMethod::Stored),
    )
    .unwrap();
    refused(
        "consolidated.00.pth: tok_embeddings [1e9, 32] over 16 values",
        load_model(model.path()),
        &["tensor 'tok_embeddings.weight' declares shape [1000000000, 32]"],
    );
}

#[test]
fn compressed_archive_entries_are_refused() {
    let dir = TempDir::new("deflated");
    let path = dir.join("adapter.pth");
    std::fs::write(
        &path,
        archive(&tensor_pickle(4, 4, 16), zip::CompressionMethod::Deflated),
    )
    .unwrap();
    refused(
        "adapter .pth: deflated entries",
        load_official(&path),
        &[
            "zip entry 'archive/data.pkl' is compressed (Deflated); torch.save stores entries uncompressed",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// NaN weights
// ---------------------------------------------------------------------------------------------

/// Every tensor of a `.pth`, as f32.
fn pth_tensors(path: &Path) -> Vec<NamedTensor> {
    let mut map = TensorMap::new("fixture");
    map.add_pth(path).unwrap();
    let keys: Vec<String> = map.keys().cloned().collect();
    keys.into_iter()
        .map(|key| {
            let shape = map.shape(&key).unwrap();
            let values = map.take_f32(&key, &shape).unwrap();
            NamedTensor { key, shape, values }
        })
        .collect()
}

#[test]
fn nan_in_an_official_checkpoint_or_a_meta_model_is_refused_naming_the_tensor() {
    // A decision: a NaN or infinite adapter or base weight makes every output it touches NaN,
    // so it is refused on load rather than trained or generated with.
    let dir = TempDir::new("nan-official");
    let path = dir.join("adapter.pth");
    let mut tensors =
        pth_tensors(&fixtures().join("tiny-mha/adapters/official_adapter/adapter.pth"));
    tensors
        .iter_mut()
        .find(|t| t.key == "adapter_query.weight")
        .unwrap()
        .values[3] = f32::NAN;
    std::fs::write(&path, state_dict_bytes(&tensors, &path).unwrap()).unwrap();
    refused(
        "adapter .pth: NaN",
        load_official(&path),
        &["tensor 'adapter_query.weight' contains non-finite values"],
    );

    let model = TempDir::copy_of(&fixtures().join("tiny-mha/meta"), "nan-meta");
    let path = model.join("consolidated.00.pth");
    let mut tensors = pth_tensors(&path);
    tensors
        .iter_mut()
        .find(|t| t.key == "layers.2.attention.wq.weight")
        .unwrap()
        .values[0] = f32::NEG_INFINITY;
    std::fs::write(&path, state_dict_bytes(&tensors, &path).unwrap()).unwrap();
    refused(
        "consolidated.00.pth: -inf",
        load_model(model.path()),
        &["tensor 'layers.2.attention.wq.weight' contains non-finite values"],
    );
}

#[test]
fn nan_in_peft_and_native_adapter_weights_is_refused_naming_the_tensor() {
    let dir = TempDir::copy_of(&fixtures().join("tiny-mha/adapters/lora"), "nan-peft");
    let weights = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<NamedTensor> = file
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
    tensors.sort_by(|a, b| a.key.cmp(&b.key));
    let key = tensors[0].key.clone();
    tensors[0].values[1] = f32::NAN;
    std::fs::write(&weights, safetensors_bytes(&tensors, &weights).unwrap()).unwrap();
    refused(
        "adapter_model.safetensors: NaN",
        load_adapter::<B>(
            dir.path(),
            &tiny_model(),
            &LoadOptions::default().with_adapter_len(4),
            &Default::default(),
        ),
        &[&format!("tensor '{key}' contains non-finite values")],
    );
}

// ---------------------------------------------------------------------------------------------
// Adapter configuration bytes
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_non_utf8_and_mistyped_adapter_configs_are_refused_naming_the_file() {
    let dir = TempDir::copy_of(&fixtures().join("tiny-mha/adapters/lora"), "config-bytes");
    let config = dir.join("adapter_config.json");
    let original = std::fs::read(&config).unwrap();
    let load = || {
        load_adapter::<B>(
            dir.path(),
            &tiny_model(),
            &LoadOptions::default().with_adapter_len(4),
            &Default::default(),
        )
    };
    std::fs::write(&config, b"").unwrap();
    refused(
        "adapter_config.json empty",
        load(),
        &["adapter_config.json", "malformed JSON", "EOF while parsing"],
    );
    let mut latin1 = original.clone();
    latin1.splice(1..1, *b"\"caf\xe9\": 1,");
    std::fs::write(&config, latin1).unwrap();
    refused(
        "adapter_config.json not UTF-8",
        load(),
        &["adapter_config.json", "malformed JSON", "invalid unicode"],
    );
    let mut json: serde_json::Value = serde_json::from_slice(&original).unwrap();
    json["r"] = "8".into();
    std::fs::write(&config, serde_json::to_vec(&json).unwrap()).unwrap();
    refused(
        "adapter_config.json r a string",
        load(),
        &["adapter_config.json", "r"],
    );
    std::fs::write(&config, b"[1, 2]").unwrap();
    refused(
        "adapter_config.json an array",
        load(),
        &["adapter_config.json"],
    );
}

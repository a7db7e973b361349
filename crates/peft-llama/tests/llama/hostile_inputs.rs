//! Hostile model directories: every malformed `config.json`, `params.json`, safetensors file,
//! sharded index and tokenizer tried here is refused with an error naming the file and what is
//! wrong, without a panic and without allocating what a file merely declares. Each case starts
//! from `fixtures/tiny-mha` (39K parameters) and breaks one thing; `docs/reliability.md` lists
//! them with the messages. Meta `.pth` cases live in `peft-core/tests/hostile_inputs.rs`, where
//! the `.pth` writer is.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::NdArray;
use common::{fixtures, stories260k};
use peft_llama::{Llama, LlamaConfig, LlamaError, LlamaLoader, LlamaTokenizer};
use safetensors::{Dtype, SafeTensors};

type B = NdArray<f32>;

/// A copy of a fixture directory, removed on drop.
struct ModelDir(PathBuf);

impl ModelDir {
    fn copy_of(source: &Path, name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "peft-llama-hostile-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        Self(dir)
    }

    fn tiny(name: &str) -> Self {
        Self::copy_of(&fixtures().join("tiny-mha/model"), name)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn write(&self, file: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.path(file), bytes).unwrap();
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    fn load(&self) -> Result<Llama<B>, LlamaError> {
        LlamaLoader::new(&self.0).load::<B>(&Default::default())
    }
}

impl Drop for ModelDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unwraps the error, prints it (for `docs/reliability.md`, with `--nocapture`) and checks that
/// it contains every fragment.
fn refused<T>(case: &str, result: Result<T, LlamaError>, fragments: &[&str]) -> String {
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
    message
}

fn edit_config(dir: &ModelDir, file: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value = serde_json::from_slice(&dir.read(file)).unwrap();
    edit(&mut json);
    dir.write(file, serde_json::to_vec(&json).unwrap());
}

/// The fixture's tensors, `edit`ed, written back as `model.safetensors`.
fn edit_weights(dir: &ModelDir, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = dir.read("model.safetensors");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    dir.write(
        "model.safetensors",
        safetensors::serialize(views, None).unwrap(),
    );
}

fn set_f32(tensors: &mut [(String, Dtype, Vec<usize>, Vec<u8>)], key: &str, index: usize, v: f32) {
    let tensor = tensors.iter_mut().find(|t| t.0 == key).unwrap();
    tensor.3[4 * index..4 * index + 4].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// config.json and params.json
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_truncated_and_non_utf8_config_json_are_refused_naming_the_file() {
    let dir = ModelDir::tiny("config-bytes");
    let original = dir.read("config.json");
    dir.write("config.json", b"");
    refused(
        "config.json empty",
        dir.load(),
        &["config.json", "malformed JSON", "EOF while parsing"],
    );
    dir.write("config.json", &original[..original.len() / 2]);
    refused(
        "config.json truncated",
        dir.load(),
        &["config.json", "malformed JSON", "EOF while parsing"],
    );
    let mut latin1 = original.clone();
    latin1.splice(1..1, *b"\"caf\xe9\": 1,");
    dir.write("config.json", latin1);
    refused(
        "config.json not UTF-8",
        dir.load(),
        &["config.json", "valid UTF-8"],
    );
}

#[test]
fn config_json_with_wrong_types_is_refused_naming_the_field() {
    let dir = ModelDir::tiny("config-types");
    edit_config(&dir, "config.json", |c| c["hidden_size"] = "32".into());
    refused(
        "config.json hidden_size a string",
        dir.load(),
        &["config.json", "invalid type: string \"32\", expected usize"],
    );
    edit_config(&dir, "config.json", |c| {
        c["hidden_size"] = 32.into();
        c["vocab_size"] = (-1).into();
    });
    refused(
        "config.json negative vocab_size",
        dir.load(),
        &["config.json", "invalid value: integer `-1`"],
    );
    edit_config(&dir, "config.json", |c| {
        c["vocab_size"] = 128.into();
        c["eos_token_id"] = (1u64 << 33).into();
    });
    refused(
        "config.json eos_token_id beyond u32",
        dir.load(),
        &["config.json", "`eos_token_id` must be a token id"],
    );
    edit_config(&dir, "config.json", |c| {
        c["eos_token_id"] = 2.into();
        c["rope_parameters"]["rope_theta"] = (-10000.0).into();
    });
    refused(
        "config.json negative rope_theta",
        dir.load(),
        &["config.json", "rope_theta must be positive, found -10000"],
    );
    edit_config(&dir, "config.json", |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 10000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
            "original_max_position_embeddings": 64});
    });
    refused(
        "config.json llama3 scaling with equal frequency factors",
        dir.load(),
        &["config.json", "distinct low and high frequency factors"],
    );
}

#[test]
fn config_json_with_huge_sizes_is_refused_before_allocating() {
    let dir = ModelDir::tiny("config-huge");
    // Overflowing products would wrap in release builds and panic in debug ones.
    edit_config(&dir, "config.json", |c| {
        c["num_attention_heads"] = (1u64 << 40).into();
        c["num_key_value_heads"] = (1u64 << 40).into();
        c["head_dim"] = (1u64 << 40).into();
    });
    refused(
        "config.json heads × head_dim overflows",
        dir.load(),
        &["config.json", "parameter count overflows"],
    );
    // Huge but representable: the file's tensors are checked against the shapes before any
    // tensor of that size would be made.
    let dir = ModelDir::tiny("config-large");
    edit_config(&dir, "config.json", |c| {
        c["vocab_size"] = 1_000_000_000_000u64.into()
    });
    refused(
        "config.json vocab_size 1e12",
        dir.load(),
        &[
            "tensor 'model.embed_tokens.weight' has shape [128, 32], the model expects [1000000000000, 32]",
        ],
    );
}

#[test]
fn params_json_with_wrong_types_or_huge_sizes_is_refused() {
    let meta = fixtures().join("tiny-mha/meta/params.json");
    let text = std::fs::read_to_string(meta).unwrap();
    refused(
        "params.json empty",
        LlamaConfig::from_meta_json("", "params.json", None, None),
        &["params.json", "EOF while parsing"],
    );
    refused(
        "params.json dim a string",
        LlamaConfig::from_meta_json(
            &text.replace("\"dim\": 32", "\"dim\": \"32\""),
            "params.json",
            None,
            None,
        ),
        &["params.json", "invalid type: string \"32\", expected usize"],
    );
    refused(
        "params.json dim 2^62",
        LlamaConfig::from_meta_json(
            &text.replace("\"dim\": 32", "\"dim\": 4611686018427387904"),
            "params.json",
            None,
            None,
        ),
        &["params.json", "dim is too large"],
    );
    refused(
        "params.json n_heads 0",
        LlamaConfig::from_meta_json(
            &text.replace("\"n_heads\": 4", "\"n_heads\": 0"),
            "params.json",
            None,
            None,
        ),
        &["params.json", "dim must be a multiple of n_heads"],
    );
}

// ---------------------------------------------------------------------------------------------
// model.safetensors
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_truncated_and_corrupt_safetensors_are_refused_naming_the_file() {
    let dir = ModelDir::tiny("weights-bytes");
    let original = dir.read("model.safetensors");
    dir.write("model.safetensors", b"");
    refused(
        "model.safetensors empty",
        dir.load(),
        &["model.safetensors", "0 bytes is too short"],
    );
    dir.write("model.safetensors", &original[..original.len() - 100]);
    refused(
        "model.safetensors truncated",
        dir.load(),
        &["model.safetensors", "unreadable weight file"],
    );
    // The header's declared length (first 8 bytes) far beyond the file.
    let mut huge_header = original.clone();
    huge_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    dir.write("model.safetensors", huge_header);
    refused(
        "model.safetensors header length 2^40",
        dir.load(),
        &["model.safetensors", "unreadable weight file"],
    );
    // A header that is not UTF-8.
    let mut latin1 = original.clone();
    latin1[9] = 0xe9;
    dir.write("model.safetensors", latin1);
    refused(
        "model.safetensors header not UTF-8",
        dir.load(),
        &["model.safetensors", "unreadable weight file"],
    );
}

#[test]
fn safetensors_declaring_a_huge_shape_is_refused_without_allocating_it() {
    let dir = ModelDir::tiny("weights-huge-shape");
    let original = dir.read("model.safetensors");
    let header_len = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(original[8..8 + header_len].to_vec()).unwrap();
    // The data offsets (relative to the end of the header) stay as they are; only the shape
    // claims 10^10 values.
    let patched = header.replacen("\"shape\":[128,32]", "\"shape\":[99999,99999]", 1);
    let mut bytes = original[..8].to_vec();
    bytes[..8].copy_from_slice(&(patched.len() as u64).to_le_bytes());
    bytes.extend(patched.as_bytes());
    bytes.extend(&original[8 + header_len..]);
    dir.write("model.safetensors", bytes);
    refused(
        "model.safetensors shape larger than its data",
        dir.load(),
        &["model.safetensors", "unreadable weight file"],
    );
}

#[test]
fn wrong_shapes_dtypes_and_missing_or_extra_tensors_are_named() {
    let dir = ModelDir::tiny("weights-shapes");
    edit_weights(&dir, |t| {
        let norm = t.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        norm.2 = vec![16];
        norm.3.truncate(16 * 4);
    });
    refused(
        "model.safetensors wrong shape",
        dir.load(),
        &["tensor 'model.norm.weight' has shape [16], the model expects [32]"],
    );
    let dir = ModelDir::tiny("weights-dtype");
    edit_weights(&dir, |t| {
        let norm = t.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        norm.1 = Dtype::I32;
    });
    refused(
        "model.safetensors integer dtype",
        dir.load(),
        &[
            "model.safetensors",
            "tensor 'model.norm.weight' has dtype I32, expected a float type",
        ],
    );
    let dir = ModelDir::tiny("weights-missing");
    edit_weights(&dir, |t| t.retain(|t| t.0 != "model.norm.weight"));
    refused(
        "model.safetensors missing tensor",
        dir.load(),
        &["missing tensor 'model.norm.weight' (expected shape [32])"],
    );
    let dir = ModelDir::tiny("weights-extra");
    edit_weights(&dir, |t| {
        t.push(("model.extra".into(), Dtype::F32, vec![1], vec![0; 4]))
    });
    refused(
        "model.safetensors unexpected tensor",
        dir.load(),
        &["unexpected tensor(s) not used by this model: [\"model.extra\"]"],
    );
}

#[test]
fn nan_and_infinite_weights_are_refused_naming_the_tensor() {
    // A decision: a base model with a non-finite weight cannot give finite logits anywhere it
    // is used, so loading refuses it rather than training on NaNs.
    for (value, case) in [(f32::NAN, "NaN"), (f32::INFINITY, "infinity")] {
        let dir = ModelDir::tiny("weights-nan");
        edit_weights(&dir, |t| {
            set_f32(t, "model.layers.1.mlp.up_proj.weight", 7, value)
        });
        refused(
            &format!("model.safetensors {case} weight"),
            dir.load(),
            &["tensor 'model.layers.1.mlp.up_proj.weight' contains non-finite values"],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// model.safetensors.index.json
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_sharded_index_is_refused_naming_the_entry() {
    let dir = ModelDir::copy_of(&fixtures().join("tiny-mha/model-sharded"), "index");
    let index = "model.safetensors.index.json";
    let original = dir.read(index);
    dir.write(index, b"");
    refused(
        "index empty",
        dir.load(),
        &[index, "malformed JSON", "EOF while parsing"],
    );
    dir.write(index, b"{\"weight_map\": [\"a\"]}");
    refused(
        "index weight_map not an object",
        dir.load(),
        &[index, "no `weight_map` object"],
    );
    dir.write(index, b"{\"weight_map\": {\"model.norm.weight\": 3}}");
    refused(
        "index entry not a string",
        dir.load(),
        &[
            index,
            "weight_map entry 'model.norm.weight' is not a file name",
        ],
    );
    dir.write(
        index,
        b"{\"weight_map\": {\"model.norm.weight\": \"../../etc/passwd\"}}",
    );
    refused(
        "index entry outside the directory",
        dir.load(),
        &[
            index,
            "points outside the model directory: ../../etc/passwd",
        ],
    );
    let text = String::from_utf8(original).unwrap();
    dir.write(
        index,
        text.replace("model-00004-of-00004", "model-00005-of-00004"),
    );
    refused(
        "index naming a missing shard",
        dir.load(),
        &["model-00005-of-00004.safetensors", "No such file"],
    );
    let mut latin1 = text.into_bytes();
    latin1.splice(1..1, *b"\"\xe9\": 1,");
    dir.write(index, latin1);
    refused("index not UTF-8", dir.load(), &[index, "valid UTF-8"]);
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json and tokenizer_config.json
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_tokenizer_files_are_refused_naming_the_file() {
    let dir = ModelDir::copy_of(&stories260k(), "tokenizer");
    let original = dir.read("tokenizer.json");
    let cases: [(&str, Vec<u8>); 4] = [
        ("tokenizer.json empty", vec![]),
        (
            "tokenizer.json truncated",
            original[..original.len() / 2].to_vec(),
        ),
        ("tokenizer.json wrong type", b"{\"model\": 3}".to_vec()),
        ("tokenizer.json not UTF-8", {
            let mut bytes = original.clone();
            bytes.splice(1..1, *b"\"\xe9\": 1,");
            bytes
        }),
    ];
    for (case, bytes) in cases {
        dir.write("tokenizer.json", bytes);
        refused(
            case,
            LlamaTokenizer::from_dir(&dir.0),
            &["tokenizer: ", "tokenizer.json"],
        );
    }
    dir.write("tokenizer.json", &original);
    dir.write("tokenizer_config.json", b"{\"bos_token\": ");
    refused(
        "tokenizer_config.json truncated",
        LlamaTokenizer::from_dir(&dir.0),
        &["tokenizer_config.json", "malformed JSON"],
    );
}

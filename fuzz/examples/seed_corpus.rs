//! Writes the starting corpus of every fuzz target into `fuzz/corpus/<target>/` from the
//! repository's fixtures (run once before fuzzing; see README.md):
//!
//! ```sh
//! cd fuzz && cargo run --example seed_corpus
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

use peft_core::native_format::{save_native, CONFIG_FILE as NATIVE_CONFIG};
use peft_io::torch_pickle::state_dict_bytes;
use peft_core::NamedTensor;
use peft_fuzz::{config_cases, fixtures, model, native_adapters};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn pickle_of(path: &Path) -> Vec<u8> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let name = archive
        .file_names()
        .find(|n| n.ends_with("/data.pkl"))
        .unwrap()
        .to_string();
    let mut bytes = Vec::new();
    archive
        .by_name(&name)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    bytes
}

fn main() {
    // GGUF headers: the block-type fixture whole, the models' first 64 KiB (header and metadata).
    for name in ["blocks", "stories-spm", "tiny-bpe"] {
        let bytes = std::fs::read(fixtures().join("gguf").join(format!("{name}.gguf"))).unwrap();
        write("gguf_header", name, &bytes[..bytes.len().min(1 << 16)]);
    }
    // Configurations: the selector byte is the index of the case in `config_cases()`.
    let cases = config_cases();
    for (index, case) in ["lora", "lora_all", "prefix", "adaption_prompt"]
        .iter()
        .enumerate()
    {
        let config = std::fs::read(
            fixtures()
                .join("tiny-mha/adapters")
                .join(case)
                .join("adapter_config.json"),
        )
        .unwrap();
        write(
            "adapter_config",
            &format!("peft-{case}"),
            &[&[index as u8][..], &config].concat(),
        );
    }
    let scratch = std::env::temp_dir().join(format!("peft-fuzz-seeds-{}", std::process::id()));
    for (offset, (name, adapter)) in native_adapters().into_iter().enumerate() {
        let dir = scratch.join(name);
        save_native(&adapter, model(), &dir).unwrap();
        let config = std::fs::read(dir.join(NATIVE_CONFIG)).unwrap();
        let index = 4 + offset;
        assert!(cases[index].native);
        write(
            "adapter_config",
            &format!("native-{name}"),
            &[&[index as u8][..], &config].concat(),
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);

    // Tensor files.
    let tiny = fixtures().join("tiny-mha");
    for case in [
        "lora",
        "lora_all",
        "prefix",
        "adaption_prompt",
        "official_adapter",
    ] {
        let dir = tiny.join("adapters").join(case);
        for file in [
            "adapter_model.safetensors",
            "adapter.safetensors",
            "expected.safetensors",
        ] {
            if let Ok(bytes) = std::fs::read(dir.join(file)) {
                write("safetensors_file", &format!("{case}-{file}"), &bytes);
            }
        }
    }
    write(
        "safetensors_file",
        "inputs",
        &std::fs::read(tiny.join("inputs.safetensors")).unwrap(),
    );

    let small = [
        NamedTensor {
            key: "a.weight".into(),
            shape: vec![4, 4],
            values: (0..16).map(|i| i as f32).collect(),
        },
        NamedTensor {
            key: "layers.0.attention.gate".into(),
            shape: vec![1, 4, 1, 1],
            values: vec![0.5; 4],
        },
        NamedTensor {
            key: "scalar".into(),
            shape: vec![],
            values: vec![1.0],
        },
    ];
    let ours = state_dict_bytes(&small, Path::new("seed.pth")).unwrap();
    let pth_files = [
        (
            "official",
            tiny.join("adapters/official_adapter/adapter.pth"),
        ),
        ("meta", tiny.join("meta/consolidated.00.pth")),
        (
            "bad-non-tensor",
            fixtures().join("bad/official_with_non_tensor_values.pth"),
        ),
        (
            "bad-string",
            fixtures().join("bad/official_string_instead_of_tensor.pth"),
        ),
    ];
    write("pth_file", "ours", &ours);
    let ours_path = scratch.with_extension("pth");
    std::fs::write(&ours_path, &ours).unwrap();
    write("pth_pickle", "ours", &pickle_of(&ours_path));
    let _ = std::fs::remove_file(&ours_path);
    for (name, path) in pth_files {
        write("pth_file", name, &std::fs::read(&path).unwrap());
        write("pth_pickle", name, &pickle_of(&path));
    }

    // Model configurations: selector byte 0 = Hugging Face config.json, 1 and 3 = Meta
    // params.json (3: with shapes from the weights).
    for name in ["tiny-mha", "tiny-gqa", "tiny-headdim"] {
        if let Ok(config) = std::fs::read(fixtures().join(name).join("model/config.json")) {
            write(
                "model_config",
                &format!("hf-{name}"),
                &[&[0u8][..], &config].concat(),
            );
        }
    }
    let stories = fixtures().join("../models/stories260k");
    write(
        "model_config",
        "hf-stories260k",
        &[
            &[0u8][..],
            &std::fs::read(stories.join("config.json")).unwrap(),
        ]
        .concat(),
    );
    let params = std::fs::read(tiny.join("meta/params.json")).unwrap();
    write(
        "model_config",
        "meta-params",
        &[&[1u8][..], &params].concat(),
    );
    write(
        "model_config",
        "meta-params-with-shapes",
        &[&[3u8][..], &params].concat(),
    );
    write(
        "sharded_index",
        "tiny-mha",
        &std::fs::read(tiny.join("model-sharded/model.safetensors.index.json")).unwrap(),
    );

    // Datasets.
    let records: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(fixtures().join("../data/alpaca_demo_small.json")).unwrap(),
    )
    .unwrap();
    let records = &records[..3];
    write(
        "alpaca_data",
        "array",
        serde_json::to_string_pretty(records).unwrap().as_bytes(),
    );
    let lines: String = records.iter().map(|r| format!("{r}\n")).collect();
    write("alpaca_data", "lines", lines.as_bytes());
    let long =
        serde_json::json!([{"instruction": "tell ".repeat(60), "input": "x", "output": "y"}]);
    write("alpaca_data", "long-prompt", long.to_string().as_bytes());
    write(
        "pretokenized_data",
        "lines",
        b"{\"input_ids\": [1, 2, 3], \"labels\": [-100, 2, 3]}\n{\"input_ids\": [5, 6], \"attention_mask\": [1, 1]}\n",
    );
    write(
        "pretokenized_data",
        "array",
        b"[{\"input_ids\": [1, 400, 3]}]",
    );
    println!(
        "corpus written to {}",
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .display()
    );
}

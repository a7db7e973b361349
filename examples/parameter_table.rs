//! The LLaMA-Adapter paper's efficiency table: trainable parameters and adapter size of each
//! method on the LLaMA-7B, 13B and 65B architectures, computed from the configurations alone
//! (no model is allocated), next to the paper's numbers. Then the same methods on the
//! built-in stories260k model, saved to disk, to show what a real adapter file adds (its
//! header and configuration).
//!
//! ```sh
//! cargo run --release --example parameter_table [-- --output runs/parameter_table]
//! ```

use std::path::PathBuf;

use clap::Parser;
use peft_core::{
    save_adapter, Adapter, AdaptionPromptConfig, AnyAdapter, LoraConfig, PrefixTuningConfig,
    TargetModules,
};
use peft_examples::{default_model_dir, machine_description, write_json, Inference, Result};
use peft_llama::{LlamaConfig, LlamaLoader};

/// The paper's setting: `K = 10` prompts in each of the top `L = 30` layers of LLaMA-7B,
/// per-head gates, gives this many trainable parameters ("1.2M").
const PAPER_ADAPTER_PARAMETERS: usize = 1_229_760;

#[derive(Parser)]
#[command(about = "Trainable parameters and adapter sizes of PEFT methods on LLaMA presets")]
struct Args {
    /// Folder for `parameters.json`.
    #[arg(long, default_value = "runs/parameter_table")]
    output: PathBuf,
}

/// One PEFT method's settings, able to count its parameters for any architecture.
struct Method {
    name: &'static str,
    count: Box<dyn Fn(&LlamaConfig) -> usize>,
}

fn methods() -> Vec<Method> {
    vec![
        Method {
            name: "adaption prompt (K=10, L=30)",
            count: Box::new(|model| {
                AdaptionPromptConfig::new()
                    .with_adapter_layers(30.min(model.num_hidden_layers))
                    .num_trainable_parameters(&model.geometry())
            }),
        },
        Method {
            name: "LoRA r=8, q_proj+v_proj",
            count: Box::new(|model| {
                LoraConfig::new()
                    .num_trainable_parameters(&model.linear_sites())
                    .expect("q_proj and v_proj are LLaMA sites")
            }),
        },
        Method {
            name: "LoRA r=8, all linear",
            count: Box::new(|model| {
                LoraConfig::new()
                    .with_target_modules(TargetModules::AllLinear)
                    .num_trainable_parameters(&model.linear_sites())
                    .expect("every LLaMA has linear sites")
            }),
        },
        Method {
            name: "prefix tuning (P=10)",
            count: Box::new(|model| {
                PrefixTuningConfig::new()
                    .with_num_virtual_tokens(10)
                    .num_trainable_parameters(&model.geometry())
            }),
        },
        Method {
            name: "full fine-tuning",
            count: Box::new(LlamaConfig::num_parameters),
        },
    ]
}

/// `1229760` → `1,229,760`.
fn thousands(value: usize) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// `1229760` → `1.2M`, `6738415616` → `6.7B`.
fn short(value: usize) -> String {
    let value = value as f64;
    if value >= 1e9 {
        format!("{:.1}B", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}K", value / 1e3)
    } else {
        format!("{value}")
    }
}

/// Bytes as MiB or GiB.
fn size(bytes: usize) -> String {
    let bytes = bytes as f64;
    let mib = bytes / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    println!("Trainable parameters, computed from the architectures (nothing allocated):\n");
    println!(
        "| model | method | trainable | share of model | weights f32 | weights f16 |\n| --- | --- | ---: | ---: | ---: | ---: |"
    );
    for preset in ["llama-7b", "llama-13b", "llama-65b"] {
        let model = LlamaConfig::preset(preset)?;
        let total = model.num_parameters();
        for method in methods() {
            let count = (method.count)(&model);
            println!(
                "| {preset} | {} | {} ({}) | {:.4}% | {} | {} |",
                method.name,
                thousands(count),
                short(count),
                100.0 * count as f64 / total as f64,
                size(4 * count),
                size(2 * count)
            );
            rows.push(serde_json::json!({
                "model": preset, "method": method.name, "trainable": count,
                "model_parameters": total, "bytes_f32": 4 * count, "bytes_f16": 2 * count,
            }));
        }
    }

    let llama_7b = LlamaConfig::preset("llama-7b")?;
    let adapter_7b = (methods()[0].count)(&llama_7b);
    let lora_7b = (methods()[1].count)(&llama_7b);
    println!("\nNext to the paper (LLaMA-Adapter, Zhang et al. 2023, efficiency comparison on LLaMA-7B):\n");
    println!("| model | paper: tuned parameters | paper: storage | here: trainable | here: f32 weights |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| Alpaca (full fine-tuning) | 7B | | {} ({}) | {} |",
        thousands(llama_7b.num_parameters()),
        short(llama_7b.num_parameters()),
        size(4 * llama_7b.num_parameters())
    );
    println!(
        "| Alpaca-LoRA (r=8, q,v) | 4.2M | | {} ({}) | {} |",
        thousands(lora_7b),
        short(lora_7b),
        size(4 * lora_7b)
    );
    println!(
        "| LLaMA-Adapter | 1.2M | 4.7M | {} ({}) | {} |",
        thousands(adapter_7b),
        short(adapter_7b),
        size(4 * adapter_7b)
    );
    if adapter_7b != PAPER_ADAPTER_PARAMETERS {
        return Err(format!(
            "LLaMA-Adapter on LLaMA-7B counts {adapter_7b} parameters, the paper's setting has {PAPER_ADAPTER_PARAMETERS}"
        )
        .into());
    }

    // A real file holds the weights plus a header and a configuration: save each method for
    // the small built-in model and compare with the bare weights.
    let device = Default::default();
    let base = LlamaLoader::new(default_model_dir()).load::<Inference>(&device)?;
    let small = &base;
    let adapters: Vec<(&str, AnyAdapter<Inference>)> = vec![
        (
            "adaption prompt (K=10, L=3)",
            AnyAdapter::AdaptionPrompt(
                AdaptionPromptConfig::new()
                    .with_adapter_layers(small.config.num_hidden_layers - 2)
                    .init(small, &device)?,
            ),
        ),
        (
            "LoRA r=8, q_proj+v_proj",
            AnyAdapter::Lora(LoraConfig::new().init(small, &device)?),
        ),
        (
            "LoRA r=8, all linear",
            AnyAdapter::Lora(
                LoraConfig::new()
                    .with_target_modules(TargetModules::AllLinear)
                    .init(small, &device)?,
            ),
        ),
        (
            "prefix tuning (P=10)",
            AnyAdapter::PrefixTuning(
                PrefixTuningConfig::new()
                    .with_num_virtual_tokens(10)
                    .init(small, &device)?,
            ),
        ),
    ];
    println!(
        "\nSaved adapters for stories260k ({} parameters), file sizes on disk:\n",
        thousands(small.config.num_parameters())
    );
    println!("| method | trainable | f32 weights | files on disk | format |\n| --- | ---: | ---: | ---: | --- |");
    let mut saved = Vec::new();
    for (index, (name, adapter)) in adapters.iter().enumerate() {
        let dir = args.output.join(format!("stories260k-adapter-{index}"));
        let format = save_adapter(adapter, small, &dir, None)?;
        let mut on_disk = 0;
        for entry in std::fs::read_dir(&dir)? {
            on_disk += entry?.metadata()?.len() as usize;
        }
        let count = adapter.num_trainable_parameters();
        println!(
            "| {name} | {} | {} B | {} B | {format:?} |",
            thousands(count),
            thousands(4 * count),
            thousands(on_disk)
        );
        saved.push(serde_json::json!({
            "method": name, "trainable": count, "bytes_f32": 4 * count,
            "bytes_on_disk": on_disk, "format": format!("{format:?}"), "dir": dir,
        }));
    }

    let path = args.output.join("parameters.json");
    write_json(
        &path,
        &serde_json::json!({
            "presets": rows,
            "paper_adapter_parameters": PAPER_ADAPTER_PARAMETERS,
            "stories260k_files": saved,
            "machine": machine_description(),
        }),
    )?;
    println!("\nwrote {}", path.display());
    Ok(())
}

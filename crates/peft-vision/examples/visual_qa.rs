//! Does the image help? A small visual question-answering set of rendered shapes, answered by
//! LLaMA-Adapter on the vendored stories260k LLaMA, trained with and without the image feature
//! from the same initial adapter (same seed), then scored on unseen images.
//!
//! ```sh
//! cargo run --release -p peft-vision --example visual_qa -- --out runs/visual_qa
//! ```
//!
//! Every image is 32 × 32: a red, green, blue or yellow circle, square or triangle at a jittered
//! position and size on a noisy grey background. Each image gets one question, "What colour is
//! the shape?" (4 choices) or "What shape is in the picture?" (3 choices), stored in ScienceQA's
//! layout (`question`, `choices`, `answer` index, `hint`, `image`) and read back through
//! `load_visual_qa`. The vision tower is the tiny random CLIP of `fixtures/clip/model` (image 32,
//! patch 8, width 32, 3 layers): untrained, so everything it passes on is what random features
//! of the pixels keep; the projection must learn to read them. Accuracy is multiple-choice by
//! likelihood (the choice whose answer tokens the model finds most probable).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use peft_core::AdaptionPromptConfig;
use peft_llama::{LlamaLoader, LlamaTokenizer};
use peft_train::{AdamWConfig, BatchingConfig, Quiet, TrainerConfig};
use peft_vision::{
    choice_accuracy, image_features, load_visual_qa, visual_examples, without_features,
    ClipVisionLoader, MultimodalAdaptionPromptConfig, PromptTemplate, VisualQaRecord,
};
use serde_json::json;

type Inner = NdArray<f32>;
type AD = Autodiff<Inner>;

const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [230, 210, 40]),
];
/// The short prompt form: a third of the Alpaca template's tokens, so the demo fits two cores.
const TEMPLATE: PromptTemplate = PromptTemplate::Short;
const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn render(colour: [u8; 3], shape: usize, rng: &mut Rng) -> Vec<u8> {
    let side = 32i64;
    let (cx, cy) = (12 + rng.below(9) as i64, 12 + rng.below(9) as i64);
    let r = 7 + rng.below(4) as i64;
    let mut pixels = Vec::with_capacity((side * side * 3) as usize);
    for y in 0..side {
        for x in 0..side {
            let (dx, dy) = (x - cx, y - cy);
            let inside = match shape {
                0 => dx * dx + dy * dy <= r * r,
                1 => dx.abs() * 10 <= r * 8 && dy.abs() * 10 <= r * 8,
                _ => dy >= -r && dy <= r && 2 * dx.abs() * r <= r * (dy + r),
            };
            for channel in colour {
                let noise = rng.below(21) as i64 - 10;
                let base = if inside { i64::from(channel) } else { 225 };
                pixels.push((base + noise).clamp(0, 255) as u8);
            }
        }
    }
    pixels
}

/// Writes `count` images and a ScienceQA-layout `{split}.json`; returns its path.
fn make_split(dir: &Path, split: &str, count: usize, seed: u64) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let colour = rng.below(4) as usize;
        let shape = rng.below(3) as usize;
        let pixels = render(COLOURS[colour].1, shape, &mut rng);
        let name = format!("images/{split}_{i:04}.png");
        image::RgbImage::from_raw(32, 32, pixels)
            .unwrap()
            .save(dir.join(&name))
            .unwrap();
        let record = if rng.below(2) == 0 {
            json!({"question": "What colour is the shape?", "choices": COLOURS.map(|c| c.0),
                   "answer": colour, "hint": "", "image": name})
        } else {
            json!({"question": "What shape is in the picture?", "choices": SHAPES,
                   "answer": shape, "hint": "", "image": name})
        };
        records.push(record);
    }
    let path = dir.join(format!("{split}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    path
}

fn accuracy_by_question(
    base: &peft_llama::Llama<Inner>,
    adapter: &peft_vision::MultimodalAdaptionPrompt<Inner>,
    records: &[VisualQaRecord],
    features: &[Option<Vec<f32>>],
    tokenizer: &LlamaTokenizer,
    use_image: bool,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let mut total = (0, 0);
    for (name, prefix) in [("colour", "What colour"), ("shape", "What shape")] {
        let (subset, feats): (Vec<VisualQaRecord>, Vec<Option<Vec<f32>>>) = records
            .iter()
            .zip(features)
            .filter(|(r, _)| r.question.starts_with(prefix))
            .map(|(r, f)| (r.clone(), f.clone()))
            .unzip();
        let (correct, counted) = choice_accuracy(
            base, adapter, &subset, &feats, TEMPLATE, tokenizer, use_image,
        )
        .unwrap();
        total = (total.0 + correct, total.1 + counted);
        out.insert(
            name.into(),
            json!({"correct": correct, "count": counted,
            "accuracy": correct as f64 / counted.max(1) as f64}),
        );
    }
    out.insert(
        "all".into(),
        json!({"correct": total.0, "count": total.1,
        "accuracy": total.0 as f64 / total.1.max(1) as f64}),
    );
    serde_json::Value::Object(out)
}

/// Mean training loss of each epoch, from the run's `metrics.jsonl`.
fn epoch_losses(run_dir: &Path, epochs: usize) -> Vec<f64> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let mut sums = vec![(0.0, 0usize); epochs];
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let (Some(loss), Some(epoch)) = (value["loss"].as_f64(), value["epoch"].as_f64()) else {
            continue;
        };
        // `epoch` is the fractional epoch reached after the step.
        let index = ((epoch - 1e-9).floor().max(0.0) as usize).min(epochs - 1);
        sums[index].0 += loss;
        sums[index].1 += 1;
    }
    sums.iter()
        .map(|(sum, n)| sum / (*n).max(1) as f64)
        .collect()
}

fn main() {
    let mut out = PathBuf::from("runs/visual_qa");
    let (mut train_size, mut test_size, mut epochs) = (320usize, 160usize, 12usize);
    let mut seeds = vec![1u64, 2];
    let mut lr = 1e-2;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--out" => out = value.into(),
            "--train" => train_size = value.parse().unwrap(),
            "--test" => test_size = value.parse().unwrap(),
            "--epochs" => epochs = value.parse().unwrap(),
            "--lr" => lr = value.parse().unwrap(),
            "--seeds" => seeds = value.split(',').map(|s| s.parse().unwrap()).collect(),
            other => panic!("unknown argument {other}"),
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data_dir = out.join("data");
    let train_path = make_split(&data_dir, "train", train_size, 1000);
    let test_path = make_split(&data_dir, "test", test_size, 2000);
    let train = load_visual_qa(&train_path).unwrap();
    let test = load_visual_qa(&test_path).unwrap();

    let device = Default::default();
    let model_dir = root.join("models/stories260k");
    let base = LlamaLoader::new(&model_dir).load::<AD>(&device).unwrap();
    let base_eval = LlamaLoader::new(&model_dir).load::<Inner>(&device).unwrap();
    let tokenizer = LlamaTokenizer::from_dir(&model_dir).unwrap();
    let vision = ClipVisionLoader::new(root.join("fixtures/clip/model"))
        .load::<Inner>(&device)
        .unwrap();
    let layers = base.config.num_hidden_layers;
    let config = MultimodalAdaptionPromptConfig::for_vision(
        AdaptionPromptConfig::new()
            .with_adapter_len(10)
            .with_adapter_layers(layers - 1),
        &vision.config,
        vec![1, 2, 3],
    );
    // Features once; the tower is frozen.
    let probe = config.init::<Inner>(&base_eval, &device).unwrap();
    let started = Instant::now();
    let train_features = image_features(&train, &vision, &probe, 64).unwrap();
    let test_features = image_features(&test, &vision, &probe, 64).unwrap();
    eprintln!("image features: {:.1} s", started.elapsed().as_secs_f64());
    let examples = visual_examples(&train, &train_features, TEMPLATE, &tokenizer, 256).unwrap();

    let mut results = Vec::new();
    for &seed in &seeds {
        for use_image in [false, true] {
            Inner::seed(&device, seed);
            AD::seed(&device, seed);
            let adapter = config.init::<AD>(&base, &device).unwrap();
            // The same trainer as every text run: one optimiser step per batch of 16, warm-up
            // over the first 10 steps, then cosine; the text-only run sees the same batches
            // without their features.
            let run_dir = out.join(format!(
                "run-seed{seed}-{}",
                if use_image { "image" } else { "text" }
            ));
            let _ = std::fs::remove_dir_all(&run_dir);
            let steps_per_epoch = examples.len().div_ceil(16) as f64;
            let config = TrainerConfig::new()
                .with_epochs(epochs)
                .with_batch_size(16)
                .with_grad_accum(1)
                .with_lr(Some(lr))
                .with_warmup_epochs(10.0 / steps_per_epoch)
                .with_optimizer(AdamWConfig::llama_adapter())
                // Windows of one batch: batches are drawn at random, not grouped by length
                // (which would put the colour and the shape questions, whose prompts differ in
                // length, in separate batches).
                .with_batching(
                    BatchingConfig::new(16)
                        .with_max_seq_len(256)
                        .with_group_batches(1),
                )
                .with_seed(seed)
                .with_output(Some(run_dir.clone()));
            let data = if use_image {
                examples.clone()
            } else {
                without_features(&examples)
            };
            let started = Instant::now();
            let (trained, summary) =
                peft_train::train(&base, adapter, &data, &[], &config, &mut Quiet).unwrap();
            let seconds = started.elapsed().as_secs_f64();
            let losses = epoch_losses(&run_dir, epochs);
            let trained = trained.valid();
            let _ = summary;
            let accuracy = accuracy_by_question(
                &base_eval,
                &trained,
                &test,
                &test_features,
                &tokenizer,
                use_image,
            );
            let result = json!({
                "seed": seed, "use_image": use_image, "epochs": epochs, "lr": lr,
                "train_examples": train.len(), "test_examples": test.len(),
                "train_seconds": seconds, "epoch_losses": losses, "test_accuracy": accuracy,
            });
            eprintln!("{result}");
            results.push(result);
        }
    }
    // The untrained adapter (zero gates: the base model) as the floor.
    let untrained = config.init::<Inner>(&base_eval, &device).unwrap();
    let floor = accuracy_by_question(
        &base_eval,
        &untrained,
        &test,
        &test_features,
        &tokenizer,
        true,
    );
    let summary = json!({"base_model_zero_gates": floor, "runs": results});
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&summary).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
}

//! Training and multiple-choice evaluation of a [`MultimodalAdaptionPrompt`] on visual
//! question answering, with the image features computed once (the vision tower is frozen).
//!
//! The loop is deliberately small: shuffled mini-batches, masked causal-LM loss on the answer
//! tokens, `peft-train`'s AdamW with LLaMA-Adapter's betas and decay rule, and a learning
//! rate with linear warm-up then cosine decay. Setting `use_image` to false trains the same
//! adapter through the text-only path (the projection then never receives a gradient), which
//! is the ablation the demonstration compares against.

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use peft_core::Adapter;
use peft_llama::{Llama, LlamaTokenizer, TokenBatch};
use peft_train::data::{tokenize_alpaca, Example, IGNORE_INDEX};
use peft_train::{causal_lm_loss, AdamWConfig};

use crate::clip::ClipVisionModel;
use crate::error::{Result, VisionError};
use crate::multimodal::MultimodalAdaptionPrompt;
use crate::preprocess::ClipImageProcessor;
use crate::visual_qa::{PromptTemplate, VisualQaRecord};

/// A tokenized visual question with its image features.
#[derive(Debug, Clone)]
pub struct VisualExample {
    /// Prompt and answer tokens; labels on the answer (and EOS) only.
    pub example: Example,
    /// The multi-scale image feature `[M·D_v]`, or `None` without an image.
    pub features: Option<Vec<f32>>,
}

/// Multi-scale features of every record's image, `[M·D_v]` each (`None` without an image),
/// computed in batches of `batch` images.
///
/// # Errors
/// Unreadable images, or a tower that does not match the adapter.
pub fn image_features<B: Backend>(
    records: &[VisualQaRecord],
    vision: &ClipVisionModel<B>,
    adapter: &MultimodalAdaptionPrompt<B>,
    batch: usize,
) -> Result<Vec<Option<Vec<f32>>>> {
    let processor = ClipImageProcessor::new(vision.config.image_size);
    let device = vision.patch_embedding.val().device();
    let paths: Vec<(usize, &std::path::PathBuf)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.image.as_ref().map(|p| (i, p)))
        .collect();
    let mut out = vec![None; records.len()];
    for chunk in paths.chunks(batch.max(1)) {
        let files: Vec<&std::path::PathBuf> = chunk.iter().map(|(_, p)| *p).collect();
        let pixels = processor.batch::<B, _>(&files, &device)?;
        let features = adapter.visual_features(vision, pixels)?;
        let width = features.dims()[1];
        let values = features
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| VisionError::Config {
                origin: "image features".into(),
                message: format!("{e:?}"),
            })?;
        for (row, (index, _)) in chunk.iter().enumerate() {
            out[*index] = Some(values[row * width..(row + 1) * width].to_vec());
        }
    }
    Ok(out)
}

fn tokenize(
    record: &VisualQaRecord,
    output: &str,
    template: PromptTemplate,
    tokenizer: &LlamaTokenizer,
    max_seq_len: usize,
) -> Result<Example> {
    let failed = |message: String| VisionError::Config {
        origin: "tokenizing a visual question".into(),
        message,
    };
    match template {
        PromptTemplate::Alpaca => {
            tokenize_alpaca(&record.alpaca_with_output(output), tokenizer, max_seq_len)
                .map_err(|e| failed(e.to_string()))
        }
        PromptTemplate::Short => {
            let encode = |text: &str| -> Result<Vec<u32>> {
                let mut ids = tokenizer
                    .encode(text, false)
                    .map_err(|e| failed(e.to_string()))?;
                if let Some(bos) = tokenizer.bos_id() {
                    ids.insert(0, bos);
                }
                Ok(ids)
            };
            let prompt = record.prompt(template);
            let prompt_len = encode(&prompt)?.len();
            let input_ids = encode(&format!("{prompt} {output}"))?;
            Ok(Example::response_only(
                input_ids,
                prompt_len,
                tokenizer.eos_id(),
                max_seq_len,
            ))
        }
    }
}

/// Tokenizes records with their answers and attaches their features.
///
/// # Errors
/// Tokenizer failures.
pub fn visual_examples(
    records: &[VisualQaRecord],
    features: &[Option<Vec<f32>>],
    template: PromptTemplate,
    tokenizer: &LlamaTokenizer,
    max_seq_len: usize,
) -> Result<Vec<VisualExample>> {
    records
        .iter()
        .zip(features)
        .map(|(record, features)| {
            Ok(VisualExample {
                example: tokenize(record, &record.answer, template, tokenizer, max_seq_len)?,
                features: features.clone(),
            })
        })
        .collect()
}

/// Settings of [`train_multimodal`].
#[derive(Debug, Clone)]
pub struct VisualTrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Shuffling seed.
    pub seed: u64,
    /// Condition on the image (false: the text-only ablation).
    pub use_image: bool,
}

/// A collated batch: tokens, labels, per-row image features and whether each row has an image.
type Collated<B> = (TokenBatch, Vec<i64>, Tensor<B, 2>, Vec<bool>);

/// Right-padded tokens, labels and per-row features of a batch.
fn collate<B: Backend>(
    examples: &[&VisualExample],
    width: usize,
    pad_id: u32,
    device: &B::Device,
) -> Result<Collated<B>> {
    let rows: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| e.example.input_ids.clone())
        .collect();
    let tokens = TokenBatch::right_padded(&rows, pad_id).map_err(|e| VisionError::Config {
        origin: "batch".into(),
        message: e.to_string(),
    })?;
    let mut labels = vec![IGNORE_INDEX; tokens.batch * tokens.seq];
    let mut features = vec![0.0f32; examples.len() * width];
    let mut present = Vec::with_capacity(examples.len());
    for (row, e) in examples.iter().enumerate() {
        labels[row * tokens.seq..row * tokens.seq + e.example.labels.len()]
            .copy_from_slice(&e.example.labels);
        if let Some(f) = &e.features {
            features[row * width..(row + 1) * width].copy_from_slice(f);
        }
        present.push(e.features.is_some());
    }
    let features = Tensor::from_data(TensorData::new(features, [examples.len(), width]), device);
    Ok((tokens, labels, features, present))
}

/// A deterministic permutation (xorshift64*, Fisher–Yates).
fn shuffled(len: usize, seed: u64) -> Vec<usize> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let j = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % (i + 1);
        order.swap(i, j);
    }
    order
}

/// Trains `adapter` on `examples`; returns it with the mean loss of every epoch.
///
/// # Errors
/// Invalid settings, a non-finite loss, or model errors.
pub fn train_multimodal<B: AutodiffBackend>(
    base: &Llama<B>,
    mut adapter: MultimodalAdaptionPrompt<B>,
    examples: &[VisualExample],
    config: &VisualTrainConfig,
) -> Result<(MultimodalAdaptionPrompt<B>, Vec<f64>)> {
    let config_error = |message: String| VisionError::Config {
        origin: "visual training".into(),
        message,
    };
    if examples.is_empty() || config.batch_size == 0 || config.epochs == 0 {
        return Err(config_error(
            "needs examples, a positive batch size and at least one epoch".into(),
        ));
    }
    let device = base.device();
    let width = adapter.config.feature_width();
    let mut optimizer = AdamWConfig::llama_adapter()
        .init::<B>()
        .map_err(|e| config_error(e.to_string()))?;
    let steps_per_epoch = examples.len().div_ceil(config.batch_size);
    let total = steps_per_epoch * config.epochs;
    let mut step = 0usize;
    let mut epoch_losses = Vec::with_capacity(config.epochs);
    for epoch in 0..config.epochs {
        let order = shuffled(examples.len(), config.seed.wrapping_add(epoch as u64));
        let mut sum = 0.0;
        for chunk in order.chunks(config.batch_size) {
            let batch: Vec<&VisualExample> = chunk.iter().map(|&i| &examples[i]).collect();
            let (tokens, labels, features, present) = collate::<B>(&batch, width, 0, &device)?;
            let hooks = if config.use_image {
                adapter.hooks_with_images(base, features, &present)?
            } else {
                adapter.hooks(base)
            };
            let logits = base.forward(&tokens, hooks.as_ref(), None)?;
            drop(hooks);
            let loss = causal_lm_loss(logits, &labels).map_err(|e| config_error(e.to_string()))?;
            let value: f64 = loss.loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(config_error(format!("non-finite loss at step {step}")));
            }
            sum += value;
            let grads = GradientsParams::from_grads(loss.loss.backward(), &adapter);
            let lr = learning_rate(config, step, total);
            adapter = optimizer.step(lr, adapter, grads).0;
            step += 1;
        }
        epoch_losses.push(sum / steps_per_epoch as f64);
    }
    Ok((adapter, epoch_losses))
}

fn learning_rate(config: &VisualTrainConfig, step: usize, total: usize) -> f64 {
    if step < config.warmup_steps {
        return config.lr * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let progress =
        (step - config.warmup_steps) as f64 / (total - config.warmup_steps).max(1) as f64;
    config.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Multiple-choice accuracy: for each record with choices, the choice whose answer tokens
/// (and EOS) have the highest total log-probability after the prompt is the prediction.
/// Returns `(correct, counted)`; records without choices are not counted.
///
/// # Errors
/// Tokenizer or model errors.
pub fn choice_accuracy<B: Backend>(
    base: &Llama<B>,
    adapter: &MultimodalAdaptionPrompt<B>,
    records: &[VisualQaRecord],
    features: &[Option<Vec<f32>>],
    template: PromptTemplate,
    tokenizer: &LlamaTokenizer,
    use_image: bool,
) -> Result<(usize, usize)> {
    let device = base.device();
    let width = adapter.config.feature_width();
    let (mut correct, mut counted) = (0, 0);
    for (record, feature) in records.iter().zip(features) {
        let Some(answer) = record.answer_index() else {
            continue;
        };
        let options: Vec<VisualExample> = record
            .choices
            .iter()
            .map(|choice| {
                Ok(VisualExample {
                    example: tokenize(record, choice, template, tokenizer, usize::MAX)?,
                    features: feature.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&VisualExample> = options.iter().collect();
        let (tokens, labels, features, present) = collate::<B>(&refs, width, 0, &device)?;
        let hooks = if use_image {
            adapter.hooks_with_images(base, features, &present)?
        } else {
            adapter.hooks(base)
        };
        let logits = base.forward(&tokens, hooks.as_ref(), None)?;
        let [rows, seq, vocab] = logits.dims();
        let log_probs = log_softmax(logits, 2)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| VisionError::Config {
                origin: "scoring".into(),
                message: format!("{e:?}"),
            })?;
        let scores: Vec<f64> = (0..rows)
            .map(|row| {
                (1..seq)
                    .filter(|&t| labels[row * seq + t] != IGNORE_INDEX)
                    .map(|t| {
                        let target = labels[row * seq + t] as usize;
                        f64::from(log_probs[(row * seq + t - 1) * vocab + target])
                    })
                    .sum()
            })
            .collect();
        let best = (0..rows)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap_or(0);
        counted += 1;
        if best == answer {
            correct += 1;
        }
    }
    Ok((correct, counted))
}

/// The adapter on the inner backend, for evaluation without an autodiff graph.
pub fn without_autodiff<B: AutodiffBackend>(
    adapter: &MultimodalAdaptionPrompt<B>,
) -> MultimodalAdaptionPrompt<B::InnerBackend> {
    adapter.valid()
}

//! Visual question answering with a [`MultimodalAdaptionPrompt`]: image features computed once
//! (the vision tower is frozen), examples that carry them, and multiple-choice evaluation.
//!
//! Training goes through `peft-train`'s trainer like every other adapter: an [`Example`] with
//! [`Example::features`] conditions the adapter through
//! [`Adapter::hooks_with_features`](peft_core::Adapter::hooks_with_features), so the multimodal
//! run has the same flags, schedule, checkpoints, exact resume and metrics as a text run.
//! Examples without features (or with them removed, [`without_features`]) train the same adapter
//! through the text-only path: the ablation the paper compares against.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use peft_llama::{Llama, LlamaTokenizer};
use peft_train::data::{tokenize_alpaca, Example, IGNORE_INDEX};
use peft_train::BatchingConfig;

use crate::clip::ClipVisionModel;
use crate::error::{Result, VisionError};
use crate::multimodal::MultimodalAdaptionPrompt;
use crate::preprocess::ClipImageProcessor;
use crate::visual_qa::{PromptTemplate, VisualQaRecord};

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
            // The tokenizer's own special tokens, as every command encodes (see
            // `peft_train::tokenize_alpaca`).
            let encode = |text: &str| -> Result<Vec<u32>> {
                tokenizer
                    .encode(text, true)
                    .map_err(|e| failed(e.to_string()))
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

/// Tokenizes records with their answers and attaches their features (records without an image
/// get none).
///
/// # Errors
/// Tokenizer failures.
pub fn visual_examples(
    records: &[VisualQaRecord],
    features: &[Option<Vec<f32>>],
    template: PromptTemplate,
    tokenizer: &LlamaTokenizer,
    max_seq_len: usize,
) -> Result<Vec<Example>> {
    records
        .iter()
        .zip(features)
        .map(|(record, features)| {
            let mut example = tokenize(record, &record.answer, template, tokenizer, max_seq_len)?;
            example.features = features.clone();
            Ok(example)
        })
        .collect()
}

/// The same examples without their image features: the text-only ablation.
pub fn without_features(examples: &[Example]) -> Vec<Example> {
    examples
        .iter()
        .map(|e| Example {
            features: None,
            ..e.clone()
        })
        .collect()
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
    let (mut correct, mut counted) = (0, 0);
    for (record, feature) in records.iter().zip(features) {
        let Some(answer) = record.answer_index() else {
            continue;
        };
        let options: Vec<Example> = record
            .choices
            .iter()
            .map(|choice| {
                let mut example = tokenize(record, choice, template, tokenizer, usize::MAX)?;
                if use_image {
                    example.features = feature.clone();
                }
                Ok(example)
            })
            .collect::<Result<_>>()?;
        let longest = options.iter().map(Example::len).max().unwrap_or(1);
        let refs: Vec<&Example> = options.iter().collect();
        let batch = BatchingConfig::new(refs.len().max(1))
            .with_max_seq_len(longest.max(1))
            .init()
            .and_then(|batcher| batcher.collate(&refs))
            .map_err(|e| VisionError::Config {
                origin: "scoring".into(),
                message: e.to_string(),
            })?;
        let hooks = batch
            .hooks(adapter, base, &device)
            .map_err(|e| VisionError::Config {
                origin: "scoring".into(),
                message: e.to_string(),
            })?;
        let (tokens, labels) = (&batch.tokens, &batch.labels);
        let logits = base.forward(tokens, hooks.as_ref(), None)?;
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

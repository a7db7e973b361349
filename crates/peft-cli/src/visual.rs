//! The multimodal LLaMA-Adapter from the command line: what `peft train --vision-model DIR`
//! adds before the shared trainer, and `peft generate --image FILE --vision-model DIR --adapter
//! DIR`.

use std::path::Path;

use burn::module::AutodiffModule;
use peft_llama::{generate, GenerationConfig, Llama, LlamaTokenizer};
use peft_train::{split_validation, Example};
use peft_vision::{
    choice_accuracy, image_features, load_multimodal, load_visual_qa, visual_examples,
    ClipImageProcessor, ClipVisionLoader, MultimodalAdaptionPrompt, MultimodalAdaptionPromptConfig,
    PromptTemplate, VisualQaRecord,
};

use crate::backend::{device, Inference, Training};
use crate::model_args::{AdapterChoice, Method};
use crate::AnyResult;

/// What `peft train --vision-model` needs besides the trainer's flags.
pub struct VisualData<'a> {
    pub vision_dir: &'a Path,
    pub data: &'a Path,
    pub choice: &'a AdapterChoice,
    pub feature_layers: Option<Vec<usize>>,
    pub max_seq_len: usize,
    pub val_size: usize,
    pub seed: u64,
    pub tokenizer: &'a LlamaTokenizer,
    pub base: &'a Llama<Training>,
}

/// The examples of a multimodal run, with their image features (computed once: the tower is
/// frozen).
pub struct Prepared {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    records: Vec<VisualQaRecord>,
    features: Vec<Option<Vec<f32>>>,
}

/// Loads the tower and the visual questions, builds the adapter the flags describe (the same
/// adaption-prompt rule as a text run) and splits the examples like a text run.
pub fn prepare(args: VisualData<'_>) -> AnyResult<(MultimodalAdaptionPrompt<Training>, Prepared)> {
    if args.choice.method != Method::AdaptionPrompt {
        return Err(format!(
            "--vision-model works with --method adaption-prompt, not {:?}",
            args.choice.method
        )
        .into());
    }
    let device = args.base.device();
    let vision = ClipVisionLoader::new(args.vision_dir).load::<Inference>(&device)?;
    let records = load_visual_qa(args.data)?;
    let feature_layers = args
        .feature_layers
        .clone()
        .unwrap_or_else(|| (1..=vision.config.num_hidden_layers).collect());
    let config = MultimodalAdaptionPromptConfig::for_vision(
        args.choice
            .adaption_prompt_config(args.base.config.num_hidden_layers)?,
        &vision.config,
        feature_layers,
    );
    config.check_vision(&vision.config)?;
    let base_eval = args.base.valid();
    let probe = config.init::<Inference>(&base_eval, &device)?;
    let features = image_features(&records, &vision, &probe, 64)?;
    let examples = visual_examples(
        &records,
        &features,
        PromptTemplate::Alpaca,
        args.tokenizer,
        args.max_seq_len,
    )?;
    let (train, validation) = split_validation(examples, args.val_size, args.seed)?;
    <Training as burn::tensor::backend::Backend>::seed(&device, args.seed);
    let adapter = config.init::<Training>(args.base, &device)?;
    Ok((
        adapter,
        Prepared {
            train,
            validation,
            records,
            features,
        },
    ))
}

impl Prepared {
    /// Prints the multiple-choice accuracy of `adapter` on the questions that have choices.
    pub fn report_accuracy(
        &self,
        base: &Llama<Inference>,
        adapter: &MultimodalAdaptionPrompt<Inference>,
        tokenizer: &LlamaTokenizer,
    ) -> AnyResult<()> {
        let (correct, counted) = choice_accuracy(
            base,
            adapter,
            &self.records,
            &self.features,
            PromptTemplate::Alpaca,
            tokenizer,
            true,
        )?;
        if counted > 0 {
            eprintln!("multiple-choice accuracy on the questions (training and validation): {correct}/{counted}");
        }
        Ok(())
    }
}

/// Greedy or sampled continuation of `prompts`, every one seeing `image`.
pub fn generate_with_image(
    model: &Llama<Inference>,
    adapter_dir: &Path,
    vision_dir: &Path,
    image: &Path,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> AnyResult<Vec<peft_llama::generate::Generation>> {
    let device = device();
    let vision = ClipVisionLoader::new(vision_dir).load::<Inference>(&device)?;
    let adapter = load_multimodal::<Inference>(adapter_dir, model, &device)?;
    let images = vec![image.to_path_buf(); prompts.len()];
    let pixels = ClipImageProcessor::new(vision.config.image_size)
        .batch::<Inference, _>(&images, &device)?;
    let features = adapter.visual_features(&vision, pixels)?;
    let hooks = adapter.hooks_with_image(model, features, prompts.len())?;
    Ok(generate(model, hooks.as_ref(), prompts, config)?)
}

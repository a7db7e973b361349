//! The multimodal LLaMA-Adapter from the command line: `peft train --vision-model DIR` and
//! `peft generate --image FILE --vision-model DIR --adapter DIR`.

use std::path::{Path, PathBuf};

use peft_core::AdaptionPromptConfig;
use peft_llama::{generate, GenerationConfig, Llama, LlamaLoader, LlamaTokenizer};
use peft_vision::visual_train::without_autodiff;
use peft_vision::{
    choice_accuracy, image_features, load_multimodal, load_visual_qa, save_multimodal,
    train_multimodal, visual_examples, ClipImageProcessor, ClipVisionLoader,
    MultimodalAdaptionPromptConfig, PromptTemplate, VisualTrainConfig,
};

use crate::backend::{device, Inference, Training};
use crate::AnyResult;

/// What `peft train --vision-model` needs from the command line.
pub struct VisualTrainArgs {
    pub model_dir: PathBuf,
    pub vision_dir: PathBuf,
    pub data: PathBuf,
    pub output: PathBuf,
    pub method: String,
    pub adapter_len: usize,
    pub adapter_layers: Option<usize>,
    pub feature_layers: Option<Vec<usize>>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    pub max_seq_len: usize,
}

/// Trains a multimodal adaption prompt on a visual QA file and saves it to `output/adapter`.
pub fn train(args: VisualTrainArgs) -> AnyResult<()> {
    if args.method != "adaption-prompt" {
        return Err(format!(
            "--vision-model works with --method adaption-prompt, not `{}`",
            args.method
        )
        .into());
    }
    let device = device();
    let base = LlamaLoader::new(&args.model_dir).load::<Training>(&device)?;
    let base_eval = LlamaLoader::new(&args.model_dir).load::<Inference>(&device)?;
    let tokenizer = LlamaTokenizer::from_dir(&args.model_dir)?;
    let vision = ClipVisionLoader::new(&args.vision_dir).load::<Inference>(&device)?;
    let records = load_visual_qa(&args.data)?;
    let layers = args
        .adapter_layers
        .unwrap_or(base.config.num_hidden_layers)
        .min(base.config.num_hidden_layers);
    let feature_layers = args
        .feature_layers
        .clone()
        .unwrap_or_else(|| (1..=vision.config.num_hidden_layers).collect());
    let config = MultimodalAdaptionPromptConfig::for_vision(
        AdaptionPromptConfig::new()
            .with_adapter_len(args.adapter_len)
            .with_adapter_layers(layers),
        &vision.config,
        feature_layers,
    );
    config.check_vision(&vision.config)?;
    let probe = config.init::<Inference>(&base_eval, &device)?;
    let features = image_features(&records, &vision, &probe, 64)?;
    let examples = visual_examples(
        &records,
        &features,
        PromptTemplate::Alpaca,
        &tokenizer,
        args.max_seq_len,
    )?;
    <Training as burn::tensor::backend::Backend>::seed(&device, args.seed);
    let adapter = config.init::<Training>(&base, &device)?;
    let settings = VisualTrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup_steps: examples.len().div_ceil(args.batch_size.max(1)),
        seed: args.seed,
        use_image: true,
    };
    let (adapter, losses) = train_multimodal(&base, adapter, &examples, &settings)?;
    for (epoch, loss) in losses.iter().enumerate() {
        eprintln!("epoch {}: mean loss {loss:.4}", epoch + 1);
    }
    let adapter = without_autodiff(&adapter);
    let (correct, counted) = choice_accuracy(
        &base_eval,
        &adapter,
        &records,
        &features,
        PromptTemplate::Alpaca,
        &tokenizer,
        true,
    )?;
    if counted > 0 {
        eprintln!("multiple-choice accuracy on the training data: {correct}/{counted}");
    }
    let dir = args.output.join("adapter");
    save_multimodal(&adapter, &base_eval, &dir)?;
    eprintln!("saved the multimodal adapter to {}", dir.display());
    Ok(())
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

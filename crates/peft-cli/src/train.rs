//! `peft train`: fine-tune an adapter (the paper's Alpaca recipe by default).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::AutodiffModule;
use peft_core::save_adapter;
use peft_llama::{LlamaLoader, LlamaTokenizer, Quantization, WeightDtype};
use peft_train::{
    load_alpaca, load_pretokenized, split_validation, tokenize_instruction_records,
    train_data_parallel, AdamWConfig, BatchStrategy, BatchingConfig, Example, InstructionFormat,
    StepMetrics, TrainObserver, TrainSummary, TrainableAdapter, TrainerConfig,
};

use crate::backend::{device, parse_devices, Training};
use crate::model_args::{default_model_dir, AdapterChoice};
use crate::template::{instruction_format, Template};
use crate::AnyResult;

/// The built-in demo data: instructions in the built-in model's own domain (see
/// `data/README.md`), so that a default run shows it learning.
pub fn default_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/story_instructions.json")
}

/// The settings of the built-in demo (`peft train` without `--model` and `--data`), each used
/// only where its flag is not given: the paper's learning-rate rule is made for LLaMA-7B and
/// moves the 1,944 adaption-prompt parameters of the 260K-parameter model too little to see
/// within a minute.
const DEMO_LR: f64 = 0.1;
const DEMO_GRAD_ACCUM: usize = 2;
const DEMO_MAX_STEPS: usize = 120;
/// Micro-batches per optimiser step unless --grad-accum says otherwise.
const GRAD_ACCUM: usize = 8;

/// Fine-tune an adapter on instruction data.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Model directory; defaults to the built-in stories260k.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Dtype of the frozen base weights (adapter and optimiser state stay f32).
    #[arg(long, default_value = "f32")]
    dtype: WeightDtype,
    #[arg(long, default_value = "none", help = crate::model_args::QUANTIZE_HELP)]
    quantize: Quantization,
    /// Training data: Alpaca `.json`/`.jsonl`, or pre-tokenized `.jsonl` (`input_ids`, `labels`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory (metrics, plot, checkpoints, final adapter).
    #[arg(long, default_value = "runs/latest")]
    output: PathBuf,
    #[command(flatten)]
    adapter: AdapterChoice,
    /// CLIP vision tower (a Hugging Face `CLIPVisionModel` directory): train the multimodal
    /// LLaMA-Adapter on visual questions (`--data` in ScienceQA layout or JSONL with `image`,
    /// `question`, `answer`); the adapter is saved with its projection in `OUTPUT/adapter`.
    #[arg(long)]
    vision_model: Option<PathBuf>,
    /// Vision hidden states whose class tokens are concatenated (default: every layer's).
    #[arg(long, value_delimiter = ',')]
    feature_layers: Option<Vec<usize>>,
    /// Passes over the data.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Stop after this many optimiser steps; the warm-up and the cosine are compressed into
    /// them in the same proportions.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Examples per micro-batch on each device.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Train data-parallel on these devices, comma-separated (`cuda:0,cuda:1,...`; `cpu,cpu` on
    /// the CPU build): one model replica each, the adapter's gradients summed over them.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Micro-batches per optimiser step (effective batch = batch size × this × devices);
    /// default 8 (2 in the built-in demo).
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Base learning rate: peak lr = blr · effective batch / 256.
    #[arg(long, default_value_t = 9e-3)]
    blr: f64,
    /// Absolute peak learning rate (overrides --blr).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up epochs: the rate rises linearly from 0, so the first step runs at rate 0 (as in
    /// the official LLaMA-Adapter code, with --lr too); 0 starts at the peak.
    #[arg(long, default_value_t = 2.0)]
    warmup_epochs: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.02)]
    weight_decay: f64,
    /// Clip the global gradient norm.
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// How records become examples: the Alpaca template (the paper's recipe) or the model's own
    /// chat template (`chat`: the record as a user turn and an assistant turn, loss on the
    /// assistant's turn only).
    #[arg(long, value_enum, default_value_t = Template::Alpaca)]
    template: Template,
    /// The system turn of every conversation with `--template chat` (without it, the template's
    /// own default).
    #[arg(long)]
    system: Option<String>,
    /// Pad every batch to --max-seq-len (the paper) instead of grouping by length.
    #[arg(long)]
    fixed_length: bool,
    /// Batches per length-sorting window: larger means less padding and less random batches;
    /// 1 draws batches at random (better when example kinds differ in length, e.g. visual
    /// questions of several kinds).
    #[arg(long, default_value_t = 64)]
    group_batches: usize,
    /// Records held out for validation.
    #[arg(long, default_value_t = 50)]
    val_size: usize,
    /// Validate every N optimiser steps.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Seed of initialisation, data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every N optimiser steps.
    #[arg(long)]
    save_every: Option<usize>,
    /// Continue from the newest checkpoint in --output.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Tokens of the sample completion generated for the first held-out record before and
    /// after training (0: none).
    #[arg(long, default_value_t = 48)]
    sample_tokens: usize,
}

struct ProgressBar {
    quiet: bool,
    started: Instant,
    projected: bool,
}

/// `1 h 05 min`, `4 min 10 s`, `12 s`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s} s"),
        (0, m, s) => format!("{m} min {s:02} s"),
        (h, m, _) => format!("{h} h {m:02} min"),
    }
}

impl TrainObserver for ProgressBar {
    fn on_step(&mut self, m: &StepMetrics, total: usize) {
        if m.step == 3.min(total) && !self.projected {
            // From the first steps (the very first pays for warming caches up).
            self.projected = true;
            eprintln!(
                "{}projected: {} for {total} steps ({:.2} s per step so far)",
                if self.quiet { "" } else { "\n" },
                duration(m.elapsed / m.step as f64 * total as f64),
                m.elapsed / m.step as f64
            );
        }
        if self.quiet {
            return;
        }
        let done = m.step as f64 / total.max(1) as f64;
        let filled = (done * 24.0) as usize;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done > 0.0 {
            elapsed / done - elapsed
        } else {
            0.0
        };
        eprint!(
            "\r[{}{}] step {}/{} loss {:.4} lr {:.2e} {:.0} tok/s ({:.0} with padding) ETA {:.0}s   ",
            "#".repeat(filled),
            ".".repeat(24 - filled),
            m.step,
            total,
            m.loss,
            m.lr,
            m.tokens_per_second(),
            m.padded_tokens_per_second(),
            eta
        );
        let _ = std::io::stderr().flush();
    }

    fn on_validation(&mut self, step: usize, loss: f64) {
        if !self.quiet {
            eprintln!("\nstep {step}: validation loss {loss:.4}");
        }
    }
}

/// Loads training examples from `path`: pre-tokenized JSONL when its first record has
/// `input_ids`, Alpaca records (in `format`) otherwise. Returns (train, validation).
#[allow(clippy::too_many_arguments)]
pub fn load_examples(
    path: &std::path::Path,
    tokenizer: &LlamaTokenizer,
    format: &InstructionFormat,
    vocab: usize,
    max_seq_len: usize,
    val_size: usize,
    seed: u64,
    save_validation_to: Option<&std::path::Path>,
) -> AnyResult<(Vec<Example>, Vec<Example>)> {
    let head = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let first_line = head
        .split(|&b| b == b'\n')
        .find(|l| !l.iter().all(u8::is_ascii_whitespace))
        .unwrap_or(&[]);
    let pretokenized = path.extension().is_some_and(|e| e == "jsonl")
        && serde_json::from_slice::<serde_json::Value>(first_line)
            .is_ok_and(|v| v.get("input_ids").is_some());
    if pretokenized {
        let dataset = load_pretokenized(path, vocab, max_seq_len)?;
        warn_skipped(path, "examples", &dataset, max_seq_len, true);
        Ok(split_validation(dataset.examples, val_size, seed)?)
    } else {
        let records = load_alpaca(path)?;
        let (train, validation) = split_validation(records, val_size, seed)?;
        if let Some(dir) = save_validation_to {
            // The held-out records, so `peft eval --data <output>/validation.json` scores the
            // same examples the run validated on.
            let json: Vec<serde_json::Value> = validation
                .iter()
                .map(|r| serde_json::json!({"instruction": r.instruction, "input": r.input, "output": r.output}))
                .collect();
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            peft_io::files::write_atomic(
                &dir.join("validation.json"),
                serde_json::to_string_pretty(&json)?.as_bytes(),
            )?;
        }
        let train = tokenize_instruction_records(&train, tokenizer, format, max_seq_len)?;
        let validation = tokenize_instruction_records(&validation, tokenizer, format, max_seq_len)?;
        if val_size == 0 {
            // Nothing held out (`peft eval`): the records in file order, indices listed.
            warn_skipped(path, "records", &train, max_seq_len, true);
            return Ok((train.examples, validation.examples));
        }
        // Their indices are within the split, not the file, so they are not listed.
        warn_skipped(path, "training records", &train, max_seq_len, false);
        warn_skipped(path, "validation records", &validation, max_seq_len, false);
        Ok((train.examples, validation.examples))
    }
}

/// Says how many examples were dropped because truncation to `max_seq_len` left them without
/// a single target token (a prompt at least that long): losing records silently would surprise.
fn warn_skipped(
    path: &std::path::Path,
    what: &str,
    dataset: &peft_train::TokenizedDataset,
    max_seq_len: usize,
    list: bool,
) {
    let skipped = &dataset.without_targets;
    if skipped.is_empty() {
        return;
    }
    let mut first: Vec<String> = skipped.iter().take(5).map(|l| l.to_string()).collect();
    if skipped.len() > 5 {
        first.push("...".into());
    }
    eprintln!(
        "warning: {}: {} of {} {what} have no response token within --max-seq-len {max_seq_len} \
         and are skipped{}",
        path.display(),
        skipped.len(),
        skipped.len() + dataset.examples.len(),
        if list {
            format!(" ({})", first.join(", "))
        } else {
            String::new()
        }
    );
}

/// Runs `peft train`: a text adapter, or with `--vision-model` the multimodal one; both through
/// the same trainer, flags, schedule, checkpoints and resume.
pub fn run(mut args: TrainArgs) -> AnyResult<()> {
    if args.model.is_none() && args.data.is_none() && args.vision_model.is_none() {
        args.lr = args.lr.or(Some(DEMO_LR));
        args.grad_accum = args.grad_accum.or(Some(DEMO_GRAD_ACCUM));
        args.max_steps = args.max_steps.or(Some(DEMO_MAX_STEPS));
        eprintln!(
            "built-in demo: stories260k on data/story_instructions.json with lr {}, grad-accum \
             {}, max-steps {} (flags override these; --model or --data leave the paper's recipe)",
            args.lr.unwrap_or(DEMO_LR),
            args.grad_accum.unwrap_or(DEMO_GRAD_ACCUM),
            args.max_steps.unwrap_or(DEMO_MAX_STEPS),
        );
    }
    let model_dir = args.model.clone().unwrap_or_else(default_model_dir);
    let devices = match &args.devices {
        Some(names) if names.is_empty() => return Err("--devices names no device".into()),
        Some(names) => parse_devices(names)?,
        None => vec![device()],
    };
    let data = match (&args.data, &args.vision_model) {
        (Some(data), _) => data.clone(),
        (None, None) => default_data(),
        (None, Some(_)) => return Err("--vision-model needs --data (visual questions)".into()),
    };
    // Not Copy on every backend (CUDA devices are not).
    let device = devices.first().cloned().ok_or("no device")?;
    let loader = LlamaLoader::new(&model_dir)
        .with_dtype(args.dtype)
        .with_quantization(args.quantize);
    let base = loader.load::<Training>(&device)?;
    if let Some(format) = base.quant_format() {
        eprintln!(
            "frozen base: decoder projections held as {} ({:.1} MiB; embeddings, norms and \
             output head dense in {:?})",
            format.name(),
            base.projection_bytes() as f64 / (1 << 20) as f64,
            base.dtype(),
        );
    }
    // The same frozen model on every further device.
    let replicas = devices[1..]
        .iter()
        .map(|d| loader.load::<Training>(d))
        .collect::<Result<Vec<_>, _>>()?;
    let tokenizer = LlamaTokenizer::load(&model_dir)?;
    if let Some(vision_dir) = &args.vision_model {
        let (adapter, prepared) = crate::visual::prepare(crate::visual::VisualData {
            vision_dir,
            data: &data,
            choice: &args.adapter,
            feature_layers: args.feature_layers.clone(),
            max_seq_len: args.max_seq_len,
            val_size: args.val_size,
            seed: args.seed,
            tokenizer: &tokenizer,
            base: &base,
        })?;
        let (adapter, summary) = fit(
            &args,
            &data,
            &devices,
            &base,
            replicas,
            adapter,
            &prepared.train,
            &prepared.validation,
        )?;
        let adapter = adapter.valid();
        let base_eval = base.valid();
        prepared.report_accuracy(&base_eval, &adapter, &tokenizer)?;
        let adapter_dir = args.output.join("adapter");
        peft_vision::save_multimodal(&adapter, &base_eval, &adapter_dir)?;
        report(&summary, &adapter_dir, "multimodal");
        return Ok(());
    }
    let format = instruction_format(
        args.template,
        args.system.as_deref(),
        &model_dir,
        &tokenizer,
    )?;
    let (train_examples, validation) = load_examples(
        &data,
        &tokenizer,
        &format,
        base.config.vocab_size,
        args.max_seq_len,
        args.val_size,
        args.seed,
        Some(&args.output),
    )?;
    <Training as burn::tensor::backend::Backend>::seed(&device, args.seed);
    let adapter = args.adapter.init_for(&base, &tokenizer)?;
    let before = Before::measure(&args, &base, &validation)?;
    let (adapter, summary) = fit(
        &args,
        &data,
        &devices,
        &base,
        replicas,
        adapter,
        &train_examples,
        &validation,
    )?;
    let adapter_dir = args.output.join("adapter");
    let format = save_adapter(&adapter, &base, &adapter_dir, None)?;
    report(&summary, &adapter_dir, &format!("{format:?}"));
    before.compare(&args, &base, &adapter, &summary, &validation, &tokenizer)?;
    Ok(())
}

/// What the run is measured against: the base model's held-out loss and its completion of the
/// first held-out prompt, before any step.
struct Before {
    /// Loss and response-token count of the base model on the held-out examples.
    loss: Option<(f64, usize)>,
    sample: Option<Vec<u32>>,
}

impl Before {
    fn batching(args: &TrainArgs) -> BatchingConfig {
        BatchingConfig::new(args.batch_size).with_max_seq_len(args.max_seq_len)
    }

    /// The prompt of the first held-out example: its tokens before the first target.
    fn sample_prompt(validation: &[Example]) -> Option<Vec<u32>> {
        let example = validation.first()?;
        let prompt = example
            .labels
            .iter()
            .take_while(|&&l| l == peft_train::IGNORE_INDEX)
            .count();
        (prompt > 0).then(|| example.input_ids[..prompt].to_vec())
    }

    fn complete<A: peft_core::Adapter<crate::backend::Inference>>(
        args: &TrainArgs,
        base: &peft_llama::Llama<crate::backend::Inference>,
        adapter: Option<&A>,
        prompt: &[u32],
    ) -> AnyResult<Vec<u32>> {
        let config = peft_llama::GenerationConfig {
            max_new_tokens: args.sample_tokens,
            eos_token_ids: base.config.eos_token_ids.clone(),
            ..Default::default()
        };
        let hooks: Box<dyn peft_core::LayerHooks<crate::backend::Inference> + '_> = match adapter {
            Some(adapter) => adapter.hooks(base),
            None => Box::new(peft_core::NoHooks),
        };
        let prompts = [prompt.to_vec()];
        let generated = peft_llama::generate(base, hooks.as_ref(), &prompts, &config)?;
        Ok(generated
            .into_iter()
            .next()
            .map(|g| g.generated_ids)
            .unwrap_or_default())
    }

    fn measure(
        args: &TrainArgs,
        base: &peft_llama::Llama<Training>,
        validation: &[Example],
    ) -> AnyResult<Self> {
        if args.resume || validation.is_empty() {
            return Ok(Self {
                loss: None,
                sample: None,
            });
        }
        let base = base.valid();
        let loss = peft_train::evaluate_base(&base, validation, &Self::batching(args))?;
        let sample = match (args.sample_tokens, Self::sample_prompt(validation)) {
            (0, _) | (_, None) => None,
            (_, Some(prompt)) => Some(Self::complete::<peft_core::AnyAdapter<_>>(
                args, &base, None, &prompt,
            )?),
        };
        Ok(Self {
            loss: Some(loss),
            sample,
        })
    }

    /// Prints the held-out loss before and after training (the trainer's final validation, on
    /// the same examples) and the sample completion before and after.
    fn compare<A>(
        &self,
        args: &TrainArgs,
        base: &peft_llama::Llama<Training>,
        adapter: &A,
        summary: &TrainSummary,
        validation: &[Example],
        tokenizer: &LlamaTokenizer,
    ) -> AnyResult<()>
    where
        A: AutodiffModule<Training>,
        A::InnerModule: peft_core::Adapter<crate::backend::Inference>,
    {
        let (Some((before, tokens)), Some(after)) = (self.loss, summary.val_loss) else {
            return Ok(());
        };
        println!(
            "held-out loss over {tokens} response tokens of {} records: {before:.4} before \
             training, {after:.4} after ({:+.1} %)",
            validation.len(),
            100.0 * (after - before) / before
        );
        if let (Some(sample), Some(prompt)) = (&self.sample, Self::sample_prompt(validation)) {
            let (base, adapter) = (base.valid(), adapter.valid());
            let after = Self::complete(args, &base, Some(&adapter), &prompt)?;
            let text = |ids: &[u32]| -> AnyResult<String> {
                Ok(tokenizer.decode(ids)?.trim().replace('\n', " "))
            };
            let example = &validation[0];
            println!("first held-out prompt: {}", text(&prompt)?);
            println!("  reference: {}", text(&example.input_ids[prompt.len()..])?);
            println!("  before:    {}", text(sample)?);
            println!("  after:     {}", text(&after)?);
        }
        Ok(())
    }
}

/// The trainer's configuration from the flags, and the run (one path for every adapter type).
#[allow(clippy::too_many_arguments)]
fn fit<A: TrainableAdapter<Training>>(
    args: &TrainArgs,
    data: &std::path::Path,
    devices: &[burn::tensor::Device<Training>],
    base: &peft_llama::Llama<Training>,
    replicas: Vec<peft_llama::Llama<Training>>,
    adapter: A,
    train_examples: &[Example],
    validation: &[Example],
) -> AnyResult<(A, TrainSummary)> {
    let config = TrainerConfig::new()
        .with_epochs(args.epochs)
        .with_max_steps(args.max_steps)
        .with_batch_size(args.batch_size)
        .with_devices(devices.len())
        .with_grad_accum(args.grad_accum.unwrap_or(GRAD_ACCUM))
        .with_blr(args.blr)
        .with_lr(args.lr)
        .with_warmup_epochs(args.warmup_epochs)
        .with_optimizer(
            AdamWConfig::llama_adapter()
                .with_weight_decay(args.weight_decay)
                .with_max_grad_norm(args.max_grad_norm),
        )
        .with_batching(
            BatchingConfig::new(args.batch_size)
                .with_max_seq_len(args.max_seq_len)
                .with_group_batches(args.group_batches)
                .with_strategy(if args.fixed_length {
                    BatchStrategy::FixedLength
                } else {
                    BatchStrategy::LengthGrouped
                }),
        )
        .with_seed(args.seed)
        .with_save_every(args.save_every)
        .with_eval_every(args.eval_every)
        .with_output(Some(args.output.clone()))
        .with_resume(args.resume);
    eprintln!(
        "training {} ({} trainable parameters) on {} examples ({} for validation) from {}; peak lr {:.3e}, effective batch {}{}",
        adapter.method(),
        adapter.num_trainable_parameters(),
        train_examples.len(),
        validation.len(),
        data.display(),
        config.peak_lr(),
        config.effective_batch(),
        if devices.len() > 1 {
            format!(" over {} devices", devices.len())
        } else {
            String::new()
        }
    );
    let plan = config.plan(train_examples)?;
    eprintln!(
        "plan: {} optimiser steps ({} per epoch{}), {} tokens; warm-up {:.1} steps, then cosine \
         to {}",
        plan.total_steps,
        plan.steps_per_epoch,
        match args.max_steps {
            Some(m) if m < plan.steps_per_epoch * args.epochs => {
                format!(", cut to --max-steps {m}, schedule compressed into them")
            }
            _ => String::new(),
        },
        plan.tokens,
        plan.warmup_steps,
        config.min_lr,
    );
    let mut progress = ProgressBar {
        quiet: args.quiet,
        started: Instant::now(),
        projected: false,
    };
    let result = train_data_parallel(
        base,
        replicas,
        adapter,
        train_examples,
        validation,
        &config,
        &mut progress,
    )?;
    if !args.quiet {
        eprintln!();
    }
    Ok(result)
}

fn report(summary: &TrainSummary, adapter_dir: &std::path::Path, format: &str) {
    println!(
        "{} steps in {:.1}s ({:.1}s in steps: {:.0} tokens/s, {:.0} with padding); final training loss {:.4}{}; adapter ({format} format) in {}",
        summary.steps,
        summary.seconds,
        summary.step_seconds,
        summary.tokens_per_second(),
        summary.padded_tokens_per_second(),
        summary.last_loss,
        summary.val_loss.map(|l| format!(", validation loss {l:.4}")).unwrap_or_default(),
        adapter_dir.display()
    );
}
